"""Timing: every mode on every prompt in one process, interleaved per prompt, then per-task medians and ratios.

Each prompt runs once per mode, the modes in a rotated order per prompt (so no mode always runs first after
another); ``decode.generate`` excludes compilation and the first execution from ``decode_s``. Speedups are medians
over prompts of the per-prompt ratio to AR on the same prompt.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

from tqdm import tqdm

from jaxspec import phrases
from jaxspec.bench.modes import Mode
from jaxspec.decode import Result, generate
from jaxspec.draft_model import with_draft
from jaxspec.model import Params


def counters(r: Result) -> dict[str, Any]:
    """Speculative counters of a one-row ``Result`` ({} for AR): the one place that reads ``Result.stats``."""
    s = r.stats
    if s is None:
        return {}
    summary = s.summary(0)
    calls = summary["verify_calls"]
    return {"drafted": summary["drafted"], "accepted": summary["accepted"], "verify_calls": calls,
            "drafted_ngram": summary["drafted_ngram"], "accepted_ngram": summary["accepted_ngram"],
            "drafted_phrase": summary["drafted_phrase"], "accepted_phrase": summary["accepted_phrase"],
            "accepted_trace": [int(x) for x in s.accepted_trace[0][:calls]],
            "theta_trace": [round(float(x), 4) for x in s.theta_trace[0][:calls]]}


def budget(max_new: int | Mapping[str, int], task: str) -> int:
    """New tokens at most for ``task``: one figure for all tasks, or a per-task table."""
    return max_new if isinstance(max_new, int) else max_new[task]


def measure(modes: dict[str, Mode], params: Params, prompts: list[tuple[str, str, list[int]]],
            max_new: int | Mapping[str, int], desc: str = "decode", seed: int = 0) -> list[dict[str, Any]]:
    """Run every mode on every ``(task, id, token ids)`` prompt, interleaved; one raw record per (prompt, mode).
    ``max_new``: new tokens at most, for all tasks or per task."""
    names = list(modes)
    with_params = {n: params if m.draft is None else with_draft(params, m.decoder.cfg, m.draft, m.ranking)
                   for n, m in modes.items()}  # each draft copy made once
    for n, m in modes.items():
        if m.phrases is not None:
            with_params[n] = with_params[n].replace(phrases=phrases.load(m.phrases, m.decoder.cfg.vocab_size))
    records = []
    with tqdm(total=len(prompts) * len(names), desc=desc, unit="run", dynamic_ncols=True) as bar:
        for i, (task, pid, ids) in enumerate(prompts):
            for name in names[i % len(names):] + names[: i % len(names)]:
                m = modes[name]
                r = generate(m.decoder, with_params[name], [ids], budget(max_new, task), seed=seed, **m.init)
                records.append({"task": task, "id": pid, "mode": name, "seed": seed, "prompt_tokens": len(ids),
                                "tokens": r.tokens[0], "new_tokens": max(r.new_tokens - 1, 0),  # after the first,
                                "decode_s": round(r.decode_s, 5), "ttft_s": round(r.ttft_s, 5),  # as peers' records
                                "prefill_s": round(r.prefill_s, 5), "compile_s": round(r.compile_s, 3),
                                **counters(r)})
                bar.set_postfix_str(f"{task} {name} {r.tokens_per_s:.1f} tok/s")
                bar.update()
    return records


def _tps(rec: dict[str, Any]) -> float:
    return rec["new_tokens"] / rec["decode_s"] if rec["decode_s"] > 0 else float("nan")


def summarize(records: list[dict[str, Any]], texts: Callable[[list[int]], str] | None = None,
              quality: Callable[[str, list[str], list[Any]], dict[str, Any]] | None = None,
              references: dict[tuple[str, str], Any] | None = None) -> list[dict[str, Any]]:
    """Per (task, mode): median tokens/s, speedup vs AR, acceptance, mean accepted per verify, identical-to-AR,
    and the quality metric of the decoded ``texts`` (when ``quality`` is given)."""
    ar = {(r["task"], r["id"]): r for r in records if r["mode"] == "ar"}
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        for mode in dict.fromkeys(r["mode"] for r in records):
            rs = [r for r in records if r["task"] == task and r["mode"] == mode]
            if not rs:
                continue
            base = [ar[(task, r["id"])] for r in rs]
            row: dict[str, Any] = {
                "task": task, "mode": mode, "prompts": len(rs), "new_tokens": sum(r["new_tokens"] for r in rs),
                "tokens_per_s": round(statistics.median(_tps(r) for r in rs), 3),
                "speedup": round(statistics.median(_tps(r) / _tps(b) for r, b in zip(rs, base, strict=True)), 4),
                "identical": sum(r["tokens"] == b["tokens"] for r, b in zip(rs, base, strict=True)),
            }
            if "drafted" in rs[0]:
                drafted, accepted, calls = (sum(r[k] for r in rs) for k in ("drafted", "accepted", "verify_calls"))
                row.update(acceptance=round(accepted / drafted, 4) if drafted else 0.0,
                           mean_accepted=round(accepted / calls, 4) if calls else 0.0)
            if quality is not None and texts is not None:
                refs = [(references or {}).get((task, r["id"])) for r in rs]
                row["quality"] = quality(task, [texts(r["tokens"]) for r in rs], refs)
            rows.append(row)
    return rows


def lossless_failures(rows: list[dict[str, Any]]) -> list[str]:
    """Greedy modes must reproduce AR: every row's outputs identical and its quality equal to AR's on that task."""
    ar = {r["task"]: r for r in rows if r["mode"] == "ar"}
    bad = []
    for r in rows:
        q, q_ar = r.get("quality", {}), ar[r["task"]].get("quality", {})
        if r["identical"] != r["prompts"] or q != q_ar:
            bad.append(f"{r['task']}/{r['mode']}: {r['identical']}/{r['prompts']} outputs identical to AR, "
                       f"quality {q} vs AR {q_ar}")
    return bad
