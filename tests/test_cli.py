"""Every entry point ends in a result or one ``error: ...`` line with exit 2: a table of bad inputs per script, run
in-process through ``cli.run`` (subprocesses only for Ctrl-C and a closed pipe). Tiny checkpoints are written here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import hf_config, hf_tensors, write_hf

from jaxspec import cli
from jaxspec.checkpoint import save_checkpoint
from jaxspec.config import PRESETS, SkipMask
from jaxspec.model import init_params, param_shapes
from jaxspec.profile import Profile, model_id, save_profile
from jaxspec.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / "tests" / "fixtures" / "llama2_vocab" / "ggml-vocab-llama-spm.gguf"
CFG = PRESETS["tiny"].replace(vocab_size=32000)


def script(name: str):  # noqa: ANN201 - the script's main
    return importlib.import_module(f"jaxspec.cli.{name}").main


def tensors(seed: int = 0):  # noqa: ANN201
    rng = np.random.default_rng(seed)
    for n, s in sorted(param_shapes(CFG).items()):
        yield n, (np.ones(s) if n.endswith("norm") else rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint with the LLaMA-2 vocabulary, damaged copies of it, profiles and JSONL files."""
    d = tmp_path_factory.mktemp("cli")
    ckpt = save_checkpoint(d / "tiny", CFG, tensors(), Tokenizer.from_gguf(VOCAB))
    f = {"ckpt": ckpt, "dir": d}
    f["corrupt"] = Path(shutil.copytree(ckpt, d / "corrupt"))
    chunk = max((p for p in (f["corrupt"] / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))
    for name, change in (("degenerate", {"n_kv_heads": 0}), ("huge", {"dim": 10**30}), ("ctx0", {"max_seq_len": 0})):
        f[name] = Path(shutil.copytree(ckpt, d / name))
        cfg = json.loads((f[name] / "config.json").read_text())
        (f[name] / "config.json").write_text(json.dumps({**cfg, **change}))
    for name, change in (("theta", {"threshold": 1.5}), ("draft", {"max_draft": 0}), ("nan", {"threshold": "NaN"}),
                         ("mask", {"mask": {"attn": [99]}}), ("type", {"max_draft": "12"})):
        f[name] = d / f"{name}.json"
        save_profile(f[name], Profile(mask=SkipMask(attn=(1,)), model_id=model_id(CFG)))
        prof = json.loads(f[name].read_text())
        f[name].write_text(json.dumps({**prof, **change}).replace('"NaN"', "NaN"))
    f["ngram_only"] = d / "ngram_only.json"  # a profile that won with n-gram drafting and has no self-draft
    save_profile(f["ngram_only"], Profile(mask=SkipMask(), drafter="ngram", model_id=model_id(CFG)))
    (d / "README.md").write_text("# my notes\n\nnot results\n")
    (d / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    (d / "surrogate.jsonl").write_text('{"id": 1, "prompt": "hi"}\n{"id": 2, "prompt": "bad \\ud800 text"}\n')
    (d / "a_file").write_text("x")
    (d / "outdir").mkdir()
    return f


# (script, argv with {placeholders} from ``files``, a fragment of the one error line)
BAD = [
    ("generate", [], "give --prompt or --input"),
    ("generate", ["--prompt", ""], "--prompt must not be empty"),
    ("generate", ["--prompt", "bad \udcff byte"], "--prompt is not valid Unicode"),
    ("generate", ["--prompt", "hi", "--temperature", "inf"], "--temperature must be a finite number"),
    ("generate", ["--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    ("generate", ["--prompt", "hi", "--temperature", "-1"], "--temperature must be in [0, 1e+06]"),
    ("generate", ["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("generate", ["--prompt", "hi", "--top-k", "-3"], "--top-k must be in 0..2147483647"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be in 1..16777216"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "9" * 50], "--max-new-tokens must be in 1..16777216, got 99"),
    ("generate", ["--prompt", "hi", "--max-draft", "65"], "--max-draft must be in 1..64"),
    ("generate", ["--prompt", "hi", "--threshold", "1.01"], "--threshold must be in [0, 1]"),
    ("generate", ["--prompt", "hi", "--seed", "-1"], "--seed must be in 0..4294967295"),
    ("generate", ["--prompt", "hi", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    ("generate", ["--prompt", "hi", "--mode", "fast"], "argument --mode: invalid choice"),
    ("generate", ["--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    ("generate", ["--input", "{dir}/in.jsonl"], "--input and --output go together"),
    ("generate", ["--prompt", "hi", "--ckpt", "no-such-model"], "unknown checkpoint 'no-such-model'"),
    ("generate", ["--prompt", "hi", "--ckpt", "{corrupt}"], "corrupt or truncated parameter data (ValueError: "),
    ("generate", ["--prompt", "hi", "--ckpt", "{degenerate}"], "n_kv_heads must be in 1..4096, got 0"),
    ("generate", ["--prompt", "hi", "--ckpt", "{huge}"], "dim must be in 1..1048576, got 1000000000000000"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{theta}"], "'threshold' must be in [0, 1]"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{nan}"], "'threshold' must be a finite"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{draft}"], "'max_draft' must be in 1..64"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{type}"], "'max_draft' must be an integer"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{mask}"], "layers [99] outside 0..3"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{dir}/none.json"], "not found"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-attn", "a,b"], "comma-separated layer indices"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-mlp", "9"], "layers [9] outside 0..3"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--mesh", "0x1"], "mesh '0x1' is not DATAxMODEL"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--drafter", "ngram", "--draft-precision", "int8"],
     "--draft-precision and --draft-head shape model drafts"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--skip-profile", "{ngram_only}", "--drafter", "skip"],
     "the skip drafter needs a skip mask"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--phrases", "{dir}/README.md"], "not a phrase table"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--drafter", "skip", "--skip-attn", "1", "--phrases",
                  "{dir}/README.md"], "--phrases adds drafts to the n-gram lookup"),
    ("generate", ["--prompt", "hi", "--ckpt", "{ckpt}", "--mode", "ar", "--phrases", "{dir}/README.md"],
     "--phrases adds drafts to the n-gram lookup"),
    ("generate", ["--input", "{dir}/in.jsonl", "--output", "{dir}/README.md", "--ckpt", "{ckpt}"],
     "line 1 is not a batch result"),
    ("generate", ["--input", "{dir}/in.jsonl", "--output", "{dir}/../{dirname}/in.jsonl", "--ckpt", "{ckpt}"],
     "is the input file"),
    ("generate", ["--input", "{dir}/in.jsonl", "--output", "{dir}/outdir", "--ckpt", "{ckpt}"], "Is a directory"),
    ("generate", ["--input", "{dir}/in.jsonl", "--output", "{dir}/a_file/out.jsonl", "--ckpt", "{ckpt}"],
     "a_file"),
    ("generate", ["--input", "{dir}/missing.jsonl", "--output", "{dir}/o.jsonl", "--ckpt", "{ckpt}"],
     "cannot read input"),
    ("generate", ["--input", "{dir}/surrogate.jsonl", "--output", "{dir}/o.jsonl", "--ckpt", "{ckpt}", "--on-error",
                  "reject"], "line 2: 'prompt' is not valid Unicode"),
    ("generate", ["--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--ckpt", "{ckpt}", "--batch-size", "0"],
     "--batch-size must be in 1..65536"),
    ("convert", ["--name", "x"], "one of the arguments --hf --gguf is required"),
    ("convert", ["--hf", "{dir}/nope", "--name", "x", "--out", "{dir}/c"], "no such HF model directory"),
    ("convert", ["--gguf", "{dir}/README.md", "--name", "x", "--out", "{dir}/c"], "not a readable GGUF file"),
    ("convert", ["--hf", "{dir}", "--name", "../escape"], "--name '../escape' is not a plain name"),
    ("convert", ["--hf", "{hf_bad}", "--name", "x", "--out", "{dir}/c"], "n_heads must be in 1..4096, got 0"),
    ("convert", ["--hf", "{hf}", "--name", "x", "--out", "{dir}/a_file"], "refusing to replace"),
    ("convert", ["--hf", "{hf}", "--name", "x", "--out", "/proc/jaxspec-none/c"], "No such file or directory"),
    ("convert", ["--hf", "{hf}", "--name", "x", "--out", "{dir}/c", "--dtype", "int8"], "invalid choice: 'int8'"),
    ("search_skip", ["--ckpt", "tiny", "--budget", "0"], "--budget must be in 1..100000"),
    ("search_skip", ["--ckpt", "tiny", "--margin", "nan"], "--margin must be a finite number"),
    ("search_skip", ["--ckpt", "tiny", "--repeats", "1" * 30], "--repeats must be in 1..10000"),
    ("search_skip", ["--ckpt", "tiny", "--calib", "{dir}/missing.jsonl"], "not found"),
    ("search_skip", ["--ckpt", "no-such-model"], "unknown checkpoint"),
    ("search_skip", ["--ckpt", "tiny", "--precisions", "int4"], "--precisions takes a comma-separated subset"),
    ("search_skip", ["--ckpt", "tiny", "--heads", "4k"], "--heads takes comma-separated token counts"),
    ("plan", ["--batch", "0"], "--batch must be in 1..65536, got 0"),
    ("plan", ["--max-len", "0"], "--max-len must be in 1..16777216, got 0"),
    ("plan", ["--mesh", "0x8"], "mesh '0x8' is not DATAxMODEL"),
    ("plan", ["--mesh", "axb"], "mesh 'axb' is not DATAxMODEL"),
    ("plan", ["--device-mem-gb", "inf"], "--device-mem-gb must be a finite number"),
    ("plan", ["--device-mem-gb", "0"], "--device-mem-gb must be in (0, 1e+09]"),
    ("plan", ["--max-draft", "0"], "--max-draft must be in 1..64"),
]


@pytest.fixture(scope="module")
def hf_dirs(files, tiny_cfg, tiny_params) -> dict[str, str]:
    hf = write_hf(files["dir"] / "hf", tiny_cfg, hf_tensors(tiny_cfg, tiny_params))
    bad = Path(shutil.copytree(hf, files["dir"] / "hf_bad"))
    (bad / "config.json").write_text(json.dumps({**hf_config(tiny_cfg), "num_attention_heads": 0}))
    return {"hf": str(hf), "hf_bad": str(bad)}


@pytest.mark.parametrize("name, argv, fragment", BAD, ids=[f"{n}:{' '.join(a)[:50]}" for n, a, _ in BAD])
def test_bad_input_gives_one_error_line(name, argv, fragment, files, hf_dirs, capsys, monkeypatch):
    monkeypatch.setenv("JAXSPEC_CHECKPOINTS", str(files["dir"]))  # registered names are not converted here
    monkeypatch.delenv("JAXSPEC_TRACEBACK", raising=False)
    subs = {**{k: str(v) for k, v in files.items()}, **hf_dirs, "dirname": files["dir"].name}
    before = {p: p.stat().st_mtime_ns for p in files["dir"].rglob("*") if p.is_file()}
    assert cli.run(script(name), [a.format(**subs) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not out
    after = {p: p.stat().st_mtime_ns for p in files["dir"].rglob("*") if p.is_file()}
    assert after == before, "a failed command changed or left files"


def test_one_row_runs_one_wide_and_a_closed_pipe_ends_quietly(files, tmp_path, capsys, monkeypatch):
    import jaxspec.batch as batch

    widths = []
    real = batch.generate
    monkeypatch.setattr(batch, "generate", lambda dec, params, ids, *a, **k: widths.append(len(ids)) or
                        real(dec, params, ids, *a, **k))
    out = tmp_path / "out.jsonl"
    # row 1 is fine, row 2 holds a lone surrogate: that row is skipped, the job runs one row, one row wide
    argv = ["--ckpt", str(files["ckpt"]), "--input", str(files["dir"] / "surrogate.jsonl"), "--output", str(out),
            "--batch-size", "256", "--max-new-tokens", "2"]
    assert cli.run(script("generate"), argv) == 0
    assert "skipping line 2: 'prompt' is not valid Unicode" in capsys.readouterr().err
    assert widths == [1] and [r["id"] for r in map(json.loads, out.read_text().splitlines())] == [1]
    assert cli.run(script("generate"), argv) == 0  # rerun: its own output, nothing left to do
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["already_done"] == 1
    # stdout closed by its reader after one byte: no traceback, no "Exception ignored", exit 0
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--ckpt", str(files["ckpt"]), "--prompt", "hi",
           "--max-new-tokens", "40"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and not err, err


def test_drafter_skip_uses_the_shipped_profiles_self_draft(files, tmp_path, capsys, monkeypatch):
    """No profile beside the checkpoint: the shipped one for its model decides. With no flags its winner (n-gram
    here) decodes; ``--drafter skip`` decodes with its best self-draft (mask, int8 draft, narrow head, max_draft),
    greedily identical to AR."""
    import jaxspec.profile as profile

    shipped = tmp_path / "profiles"
    self_draft = {"mask": {"attn": [1], "mlp": [2]}, "threshold": 0.5, "max_draft": 3, "speedup": 0.8,
                  "draft": {"precision": "int8", "head": 1000, "min_rows": 0}}
    save_profile(shipped / "tiny.json", Profile(mask=SkipMask(), drafter="ngram", ngram=(2, 3, 5), speedup=1.2,
                                                ngram_adaptive=True, model_id=model_id(CFG), self_draft=self_draft))
    monkeypatch.setattr(profile, "SHIPPED", shipped)
    base = ["--ckpt", str(files["ckpt"]), "--prompt", "one two one two one", "--max-new-tokens", "12", "--json",
            "--verbose"]
    assert cli.run(script("generate"), base) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["stats"]["drafter"] == "ngram" and "n-gram 2..3 tokens, k=2..5" in err
    assert cli.run(script("generate"), [*base, "--mode", "ssd", "--drafter", "skip", "--compare",
                                        "--no-ngram-adaptive"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out.splitlines()[-1])["stats"]
    assert stats["drafter"] == "skip" and stats["identical"] and "n-gram 2..3 tokens, k=5\n" in err, stats
    assert f"skip mask {SkipMask(attn=(1,), mlp=(2,))}" in err and "draft: int8, head 1000" in err, err


def test_generate_loads_lean_what_does_not_fit_twice(files, capsys, monkeypatch):
    """What ``generate.py`` does on CPU with a model whose float32 layers and packed copy would not share memory
    (LLaMA-2-7B on 24 GiB; here any size): packed layers only, the same tokens as the full load, AR and n-gram
    drafting alike, a long prompt's chunks read through the packed layers too."""
    from jaxspec import checkpoint, cpu_kernels

    argv = ["--ckpt", str(files["ckpt"]), "--prompt", " ".join(["one two three"] * 30), "--max-new-tokens", "8",
            "--json", "--compare"]
    assert cli.run(script("generate"), argv) == 0
    full = json.loads(capsys.readouterr().out.splitlines()[-1])
    monkeypatch.setattr(checkpoint, "LEAN_FROM_BYTES", 0)
    for _ in range(2):  # packs and writes its fast copy, then maps it
        assert cli.run(script("generate"), argv) == 0
        lean = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert lean["token_ids"] == full["token_ids"] and lean["stats"]["identical"], lean["stats"]
    assert lean["stats"]["prompt_tokens"] > cpu_kernels.MAX_PACKED_ROWS
    assert bool(list(checkpoint.fast_cache_dir().glob(f"*-{checkpoint.LEAN}.bin"))) == cpu_kernels.active()


def test_ctrl_c_mid_conversion_leaves_nothing(tmp_path):
    cfg = PRESETS["tiny"].replace(dim=256, hidden_dim=1024, n_layers=8, n_heads=4, n_kv_heads=2)
    import jax

    hf = write_hf(tmp_path / "hf", cfg, hf_tensors(cfg, init_params(cfg, jax.random.PRNGKey(0))))
    out = tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "scripts" / "convert.py"), "--hf", str(hf), "--name", "x", "--out", str(out)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(tmp_path.glob(".ckpt.tmp-*/params")) and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.005)  # interrupt once orbax is writing: its threads outlive the KeyboardInterrupt
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hf"]  # no checkpoint, no hidden temporary directory


def test_plan_refuses_a_context_of_zero(files):
    """plan.py simulates devices before importing jax, so it runs in a subprocess."""
    cmd = [sys.executable, str(ROOT / "scripts" / "plan.py"), "--ckpt", str(files["ctx0"]), "--mesh", "1x1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "max_seq_len must be in 1..16777216, got 0" in p.stderr and not p.stdout


def test_plan_uses_the_checkpoints_own_profile_without_a_self_draft(files, tmp_path):
    """A checkpoint whose own profile won with n-gram drafting (no self-draft): the plan's draft step is that
    profile's (empty) mask, not an attempt to read the checkpoint directory as a profile."""
    ckpt = Path(shutil.copytree(files["ckpt"], tmp_path / "ck"))
    shutil.copy(files["ngram_only"], ckpt / "skip_profile.json")
    cmd = [sys.executable, str(ROOT / "scripts" / "plan.py"), "--ckpt", str(ckpt), "--mesh", "1x1", "--max-len", "64"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"skip profile {ckpt / 'skip_profile.json'} (0 attention + 0 MLP" in p.stdout


@pytest.mark.parametrize("name", ["generate", "search_skip"])
def test_ctrl_c_while_importing(name):
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{p.pid}/maps")
    if not maps.parent.exists():
        pytest.skip("needs /proc to see when the child is importing")
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:  # numpy loads after exit_on_interrupt, before jax
        if "_multiarray_umath" in maps.read_text(errors="replace"):
            break
        time.sleep(0.02)
    if p.poll() is not None:
        pytest.skip("imports finished before the signal")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and not err, err[-2000:]


def test_exit_skips_teardown_but_not_threads_exit_handlers_or_buffered_output(tmp_path: Path) -> None:
    """``cli.exit`` ends with ``os._exit``: a running non-daemon thread's write, an ``atexit`` handler's and output
    still buffered in stdout must all survive it, and the status must come through."""
    code = f"""
import atexit, pathlib, sys, threading, time
from jaxspec import cli
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
sys.stdout.write("buffered, no newline")
cli.exit(3)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout a buffered pipe, as usual
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"


def test_import_jax_skips_etils_epath_yet_orbax_can_import_it() -> None:
    """``cli.import_jax``: jax comes up on ``pathlib`` (no ``etils.epath`` imported), and ``etils.epath`` still
    imports afterwards for orbax, which needs it; the narrowed ``importlib.metadata.distributions`` is restored."""
    code = """
import importlib.metadata as md
import sys
every = md.distributions
from jaxspec import cli
cli.import_jax()
import jax
assert md.distributions is every and jax.devices()
from jax._src import path
print("epath" if "etils.epath" in sys.modules else "none", path.epath_installed)
from etils import epath
import orbax.checkpoint
print(epath.Path("x").name)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["none", "False", "x"]


def test_generate_imports_with_the_collector_paused_and_leaves_it_on() -> None:
    """``generate``'s imports run with garbage collection paused, and it is on again afterwards, with the imported
    objects frozen out of its scans."""
    code = """
import gc
import jaxspec.cli.generate
print(gc.isenabled(), gc.get_freeze_count() > 10000)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"]
