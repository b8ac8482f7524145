"""Benchmark items from the *evaluation* halves of ``jaxspec.data``: the prompt each model sees and its reference.

- summarization: aclsum test abstracts, 1-shot (one calibration-split abstract and its summary as an earlier chat
  turn, as the paper's 1-shot prompts); reference = the aclsum summary (challenge, approach, outcome sentences);
- code: HumanEval odd tasks; reference = the problem (prompt, test, entry point) for the checker;
- chat: MT-Bench first turns (odd questions); no reference (speed and acceptance only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxspec import data

SHOT_MAX_CHARS = 700  # the 1-shot example: the first calibration abstract at most this long


@dataclass(frozen=True)
class Item:
    task: str
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content) chat turns, the last one the user's request
    reference: Any = None


def _records(task: str, split: str) -> dict[str, dict[str, Any]]:
    """Raw records of a task's data file by id (summaries, HumanEval tests)."""
    paths = list(data.fetch(task).values())
    path = paths[0] if task != "summarization" or split == "calibration" else paths[1]
    key = "id" if task == "summarization" else "task_id"
    return {str(r[key]): r for r in data._jsonl(path)}


def _summary(record: dict[str, Any]) -> str:
    return " ".join(record["summary"][k] for k in ("challenge", "approach", "outcome"))


def load(task: str, limit: int) -> list[Item]:
    """The first ``limit`` evaluation items of ``task``."""
    rows = data.prompts(task, "evaluation")[:limit]
    if task == "chat":
        return [Item(task, r["id"], (("user", r["text"]),)) for r in rows]
    recs = _records(task, "evaluation")
    if task == "code":
        return [Item(task, r["id"], (("user", r["text"]),), recs[r["id"]]) for r in rows]
    shot = next(p for p in data.prompts(task, "calibration") if len(p["text"]) <= SHOT_MAX_CHARS)
    shot_turns = (("user", shot["text"]), ("assistant", _summary(_records(task, "calibration")[shot["id"]])))
    return [Item(task, r["id"], (*shot_turns, ("user", r["text"])), _summary(recs[r["id"]])) for r in rows]


def prompt_ids(item: Item, tok: Any) -> list[int]:
    """Token ids of ``item``: through the chat template when the tokenizer has one, else the turns joined."""
    msgs = [{"role": r, "content": c} for r, c in item.messages]
    text = tok.apply_chat_template(msgs) if tok.chat_template else "\n\n".join(c for _, c in item.messages)
    return tok.encode(text)
