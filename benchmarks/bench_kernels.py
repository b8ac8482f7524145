"""The CPU kernels (`jaxspec/cpu_kernels.py`) against the jnp code on XLA, end to end: AR and n-gram decoding per task,
in one process.

    python benchmarks/bench_kernels.py                      # 2 prompts per task, phases kernel, XLA, kernel, XLA
    python benchmarks/bench_kernels.py --per-task 3 --phases 6
    python benchmarks/bench_kernels.py --only attention --context 2000  # attention kernel alone; + a 2k-token prompt

Each phase re-traces everything (``jax.clear_caches()``) with ``cpu_kernels`` on or off, warms up, then runs every
prompt with every decoder; a figure is the median over a setting's phases of tokens/s (decode only). Every output
must be token-identical to the first one seen for that prompt, across decoders and settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_tasks import task_prompts  # noqa: E402

from jaxspec import cpu_kernels, model  # noqa: E402
from jaxspec.checkpoint import load  # noqa: E402
from jaxspec.decode import Decoder, generate  # noqa: E402
from jaxspec.speculative import SpecDecoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--phases", type=int, default=4, help="alternating kernel / XLA phases (even)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--only", choices=["attention"], help="toggle only the attention kernel (products keep theirs)")
    ap.add_argument("--context", type=int, help="also a prompt of this many random tokens")
    args = ap.parse_args()
    if not cpu_kernels.active():
        sys.exit("error: the CPU kernels are not available here (no C++ compiler, or not on CPU)")
    cfg, params, tok = load(args.ckpt)
    eos = tuple(tok.eos_ids) or cfg.eos_ids
    tasks = task_prompts(tok, args.per_task)
    if args.context:
        rng = np.random.default_rng(0)
        tasks[f"random {args.context} tokens"] = [rng.integers(100, cfg.vocab_size, args.context).tolist()]
    decs = {"ar": Decoder(cfg, eos_ids=eos)} | {
        f"ngram k={k}": SpecDecoder(cfg, eos_ids=eos, drafter="ngram", ngram_k=k) for k in (4, 8)}
    print(f"## {args.ckpt}: {os.cpu_count()} cores, kernel threads {cpu_kernels.threads()}, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    tps: dict[tuple[str, str, str], list[float]] = {}
    first: dict[tuple[str, int], list[int]] = {}
    mismatches = 0
    off = "jnp attention" if args.only else "XLA dots"
    settings = ["kernel", off]
    kernel_attend = model.attend
    for phase in range(args.phases):
        setting = settings[phase % 2]
        jax.clear_caches()
        model.attend = model.attend_jnp if setting != "kernel" and args.only else kernel_attend
        with cpu_kernels.enabled(setting == "kernel" or args.only is not None):
            for d in decs.values():  # compilation and first runs
                generate(d, params, [next(iter(tasks.values()))[0]], args.max_new_tokens)
            for t, prompts in tasks.items():
                for i, p in enumerate(prompts):
                    for n, d in decs.items():
                        r = generate(d, params, [p], args.max_new_tokens)
                        tps.setdefault((setting, t, n), []).append(r.new_tokens / r.decode_s)
                        if first.setdefault((t, i), r.tokens[0]) != r.tokens[0]:
                            mismatches += 1
        print(f"phase {phase + 1}/{args.phases} ({setting}) done {time.strftime('%H:%M:%S')}, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n| task | decoder | kernel tok/s (× AR) | {off} tok/s (× AR) | kernel / {off} |\n|---|---|---|---|---|")
    for t in tasks:
        med = {(s, n): statistics.median(tps[s, t, n]) for s in settings for n in decs}
        for n in decs:
            k, x = med["kernel", n], med[off, n]
            print(f"| {t} | {n} | {k:.1f} ({k / med['kernel', 'ar']:.2f}) | {x:.1f} ({x / med[off, 'ar']:.2f}) "
                  f"| {k / x:.2f} |")
    print(f"\noutputs identical to the first for each prompt: {'yes' if not mismatches else f'NO ({mismatches})'}")


if __name__ == "__main__":
    main()
