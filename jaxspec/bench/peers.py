"""Peers on the same GGUF weights and prompts: HF transformers (torch CPU float32: plain greedy, prompt lookup,
``assistant_early_exit`` layer skipping) and llama.cpp (``llama-cpp-python``: plain greedy, prompt lookup).

Both are optional: a peer that is not installed gives rows with ``status: "not installed"`` and the benchmark goes
on. HF runs in a subprocess (``hf_peer.py``) under any Python that has it (``--hf-python``), so torch need not share
the benchmark's environment. Records have the shape of ``run.measure``'s, so ``run.summarize`` rates them against
jaxspec AR on the same prompts. Peers run after the jaxspec modes, not interleaved with them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxspec.bench.run import budget

HF_MODES = ("hf", "hf-prompt-lookup", "hf-early-exit")
LLAMA_MODES = ("llama.cpp", "llama.cpp-prompt-lookup")
Prompts = list[tuple[str, str, list[int]]]


def _records(name: str, prompts: Prompts, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peer outputs as run records (the first token, generated with the prefill, is not counted in ``decode_s``,
    which starts at it; ``ttft_s`` is the time to it)."""
    return [{"task": task, "id": pid, "mode": name, "prompt_tokens": len(ids), "tokens": row["tokens"],
             "new_tokens": max(len(row["tokens"]) - 1, 0), "decode_s": round(row["decode_s"], 5),
             "ttft_s": round(row["ttft_s"], 5)}
            for (task, pid, ids), row in zip(prompts, rows, strict=True)]


def hf(python: str | None, gguf: Path, prompts: Prompts, max_new: int | Mapping[str, int], early_exit: int,
       threads: int = 2, modes: tuple[str, ...] = HF_MODES) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the HF peer's ``modes``; (status per mode, records). ``max_new``: for all tasks or per task."""
    exe = python or sys.executable
    probe = subprocess.run([exe, "-c", "import torch, transformers, gguf"], capture_output=True)
    if probe.returncode:
        return dict.fromkeys(modes, "not installed"), []
    job = {"gguf": str(gguf), "prompts": [p[2] for p in prompts], "max_new": [budget(max_new, p[0]) for p in prompts],
           "threads": threads, "early_exit": early_exit, "modes": list(modes)}
    print(f"peers: HF transformers on {len(prompts)} prompts x {len(modes)} modes ...", file=sys.stderr)
    proc = subprocess.run([exe, str(Path(__file__).with_name("hf_peer.py"))], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
        tail = (lines or ["no output"])[-1][:200]  # the error, not a progress bar
        return dict.fromkeys(modes, f"failed (exit status {proc.returncode}): {tail}"), []
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    status, records = {"versions": out.get("versions", {})}, []
    for name in modes:
        if isinstance(out.get(name), list):
            status[name] = "ok"
            records += _records(name, prompts, out[name])
        else:
            status[name] = f"failed: {out.get(name, {}).get('error', 'missing')}"
    return status, records


def llama_cpp(gguf: Path, prompts: Prompts, max_new: int | Mapping[str, int], threads: int = 2,
              modes: tuple[str, ...] = LLAMA_MODES) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run llama.cpp's ``modes`` in process (its own GGUF quantization, not float32); (status per mode, records)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return dict.fromkeys(modes, "not installed"), []
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    status: dict[str, Any] = {"versions": {"llama_cpp": llama_cpp.__version__}}
    records = []
    drafts = {"llama.cpp": None, "llama.cpp-prompt-lookup": LlamaPromptLookupDecoding(10)}
    for name in modes:
        try:
            records += _llama_mode(llama_cpp, gguf, name, drafts[name], prompts, max_new, threads)
            status[name] = "ok"
        except Exception as e:  # a peer that breaks gives a "failed" row; the benchmark's own figures go on
            status[name] = f"failed: {type(e).__name__}: {e}"[:200]
    return status, records


def _llama_mode(llama_cpp: Any, gguf: Path, name: str, draft: Any, prompts: Prompts,
                max_new: int | Mapping[str, int], threads: int) -> list[dict[str, Any]]:
    """One llama.cpp mode's records. A draft model (prompt lookup) verifies several tokens per call, so the
    logits of every position are kept (``logits_all``; without it llama-cpp-python overruns its n_batch-row
    score buffer once a prompt passes ~500 tokens)."""
    llm = llama_cpp.Llama(str(gguf), n_ctx=4096, n_threads=threads, draft_model=draft, verbose=False,
                          logits_all=draft is not None)

    def gen(ids: list[int], n: int, llm: Any = llm) -> dict[str, Any]:
        """Greedy tokens, the time to the first one (prefill) and from there to the last one (decode)."""
        llm.reset()
        t, toks, first = time.perf_counter(), [], 0.0
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            toks.append(int(tok))
            first = first or time.perf_counter()
            if tok == llm.token_eos() or len(toks) == n:
                break
        end = time.perf_counter()
        return {"tokens": toks, "decode_s": max(end - first, 1e-9), "ttft_s": first - t}

    gen(prompts[0][2], 2)  # warm-up
    rows = [gen(ids, budget(max_new, task)) for task, _, ids in tqdm(prompts, desc=name, unit="prompt")]
    return _records(name, prompts, rows)
