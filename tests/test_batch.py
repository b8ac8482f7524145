"""Batch jobs: malformed input lines are reported by line number (skipped, or the job rejected); a job killed mid-run
(even mid-line) and resumed writes every id exactly once, with the results of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxspec.batch import BatchInputError, done_ids, iter_results, read_rows, run_batch_job

GOOD = [{"id": f"r{i}", "prompt": "abcdefghijklmnopqrstuvwxyz"[: 2 + (7 * i) % 11]} for i in range(9)]
GOOD[4]["max_new_tokens"] = 3
GOOD[2]["temperature"] = GOOD[7]["temperature"] = 0.9  # a sampled group: resumed results must match too
GOOD.append({"id": 42, "prompt": "int id"})
BAD = ["{not json", '["a list"]', '{"id": "r1", "prompt": "duplicate"}', '{"id": "x", "prompt": ""}',
       '{"id": "y", "prompt": "p", "max_tokens": 5}', '{"id": "z", "prompt": "p", "top_p": 0}',
       '{"id": true, "prompt": "p"}', '{"id": "long", "prompt": "' + "a" * 600 + '"}']


def input_lines() -> list[str]:
    lines = [json.dumps(r) for r in GOOD]
    for k, bad in enumerate(BAD):  # interleaved, with a blank line (ignored, not an error)
        lines.insert(2 * k + 1, bad)
    lines.insert(5, "   ")
    return lines


BAD_LINES = [i + 1 for i, line in enumerate(input_lines()) if line in BAD]


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1, *text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i >= 3).decode("latin-1")


def job(inp: Path, out: Path, **kw) -> dict:  # noqa: ANN003
    """The job under test: random tiny model (numpy-initialised: no compiles), AR decoder, batches of 4, 6 new
    tokens by default."""
    from jaxspec.config import PRESETS
    from jaxspec.decode import Decoder
    from jaxspec.model import param_shapes, params_from_flat

    cfg = PRESETS["tiny"].replace(eos_ids=(0,))
    rng = np.random.default_rng(0)
    params = params_from_flat(cfg, {n: np.ones(s, np.float32) if n.endswith("norm") else
                                    (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
                                    for n, s in sorted(param_shapes(cfg).items())})
    dec = Decoder(cfg, eos_ids=cfg.eos_ids)
    return run_batch_job(inp, out, lambda s: dataclasses.replace(dec, sampling=s), params, ByteTokenizer(), 4, 6,
                         seed=7, progress=False, **kw)


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(input_lines()) + "\n")
    return path


def test_read_rows_reports_each_malformed_line(inp):
    rows, errors = read_rows(inp)
    assert sorted(map(str, (r.id for r in rows))) == sorted(map(str, [r["id"] for r in GOOD] + ["long"]))
    assert [n for n, _ in errors] == BAD_LINES[:-1]  # the too-long prompt is found once tokenized
    msgs = dict(errors)
    assert "invalid JSON" in msgs[BAD_LINES[0]] and "expected a JSON object" in msgs[BAD_LINES[1]]
    assert "duplicate id 'r1' (first on line 3)" in msgs[BAD_LINES[2]]
    assert "unknown key(s) ['max_tokens']" in msgs[BAD_LINES[4]] and "'top_p' must be in (0, 1]" in msgs[BAD_LINES[5]]


def test_reject_runs_nothing(inp, tmp_path):
    with pytest.raises(BatchInputError, match=f"8 malformed line\\(s\\).*line {BAD_LINES[-1]}: prompt"):
        job(inp, tmp_path / "out.jsonl", on_error="reject")
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()


def res(rid: str | int) -> str:
    return json.dumps({"id": rid, "text": "", "token_ids": [], "stats": {}})


def test_done_ids_cuts_a_truncated_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(f'{res("a")}\n{res(1)}\n{{"id": "b", "te')
    assert done_ids(out) == ({'"a"', "1"}, False)
    assert out.read_text() == f"{res('a')}\n{res(1)}\n"
    out.write_text(f'{res("a")}\n\n{res("a")}\n{res("c")}\n{{"i')
    assert done_ids(out) == ({'"a"', '"c"'}, True)
    assert out.read_text() == f"{res('a')}\n{res('c')}\n"


@pytest.mark.parametrize("text", [
    "# README\nsome notes\n",  # not JSON
    "notes without a newline",  # only a 'truncated' line, but not one of ours
    res("a") + '\n{"id": "b", "prompt": "an input line"}\n',  # JSON, not a result
    res("a") + "\n[1, 2]\n",
    res("a") + "\n" + res("b")[:-1] + "\xff}\n",  # not UTF-8
])
def test_foreign_output_is_refused_untouched(tmp_path, inp, text):
    out = tmp_path / "out.jsonl"
    out.write_bytes(text.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff"))
    before = out.read_bytes()
    with pytest.raises(BatchInputError, match="refusing to overwrite a file this job did not write"):
        job(inp, out)
    assert out.read_bytes() == before


def test_output_is_the_input(tmp_path, inp):
    before = inp.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(inp, tmp_path / "link.jsonl")
    for same in (inp, tmp_path / "sub" / ".." / inp.name, tmp_path / "link.jsonl"):
        with pytest.raises(BatchInputError, match="is the input file"):
            job(inp, same)
    assert inp.read_bytes() == before


def test_killed_and_resumed_job_writes_each_id_once_with_uninterrupted_results(inp, tmp_path):
    killed = tmp_path / "killed.jsonl"
    # The child dies by SIGKILL right after its 3rd durable line: mid-batch (batches are 4 rows).
    child = subprocess.Popen([sys.executable, __file__, str(inp), str(killed), "3"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    ref = job(inp, tmp_path / "ref.jsonl")  # meanwhile: the uninterrupted run
    log = child.communicate(timeout=300)[0]
    assert child.returncode == -signal.SIGKILL, log[-3000:]
    assert len(killed.read_text().splitlines()) == 3
    with open(killed, "a") as f:  # as if killed in the middle of writing a 4th line
        f.write('{"id": "r5", "text": "tru')
    logs: list[str] = []
    resumed = job(inp, killed, log=logs.append)
    assert resumed["already_done"] == 3 and resumed["written"] == len(GOOD) - 3
    assert any("dropping 1 incomplete" in m for m in logs)
    assert [m.split("skipping line ")[1].split(":")[0] for m in logs if "skipping" in m] == list(map(str, BAD_LINES))
    assert ref["written"] == len(GOOD) and ref["malformed"] == resumed["malformed"]

    def results(path: Path) -> dict:
        rows = list(iter_results(path))
        assert len(rows) == len({json.dumps(r["id"]) for r in rows}), "an id was written twice"
        for r in rows:
            r["stats"].pop("batch_tokens_per_s")
        return {json.dumps(r["id"]): r for r in rows}

    got, want = results(killed), results(tmp_path / "ref.jsonl")
    assert got == want and len(got) == len(GOOD)
    assert killed.read_text().endswith("}\n")
    assert want['"r4"']["stats"]["new_tokens"] == 3 and want['"r0"']["stats"]["new_tokens"] == 6
    assert want['"r2"']["stats"]["batch"] != want['"r0"']["stats"]["batch"]  # sampled rows batch apart


if __name__ == "__main__":  # the child: run the job, SIGKILL itself after N durable results
    n_kill = int(sys.argv[3])
    count = [0]

    def on_result(_: dict) -> None:
        count[0] += 1
        if count[0] == n_kill:
            os.kill(os.getpid(), signal.SIGKILL)

    job(Path(sys.argv[1]), Path(sys.argv[2]), on_result=on_result)
