"""The attention core alone at SmolLM2's shapes: 30 chained layer calls (each its own K/V, each query the previous
call's output, as in the model) of ``model.attend`` (the CPU kernel) and ``model.attend_jnp`` (XLA), per context
and query count, in interleaved rounds in one process (medians).

    python benchmarks/bench_attention.py                              # T = 1 and 5 at contexts 128 .. 3500
    python benchmarks/bench_attention.py --contexts 2000 --queries 1 --rounds 9

GB/s is the K/V read (each live key and value once per step) over the time: what the cores stream at best is
~30-40 GB/s here (``bench.py --probe-variants``). To compare two versions of the kernel, run this in each checkout
(a ``git worktree``), alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec import model  # noqa: E402

LAYERS, KV, G, D = 30, 3, 3, 64  # SmolLM2-135M


def chain(core):  # noqa: ANN001, ANN201 - a jitted function of (q, ks, vs, positions)
    def layers(q: jax.Array, ks: list[jax.Array], vs: list[jax.Array], pos: jax.Array) -> jax.Array:
        for k, v in zip(ks, vs, strict=True):
            q = core(q, k, v, pos)
        return q.sum()
    return jax.jit(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="128,1000,2000,3500")
    ap.add_argument("--queries", default="1,5", help="query tokens per call (1: a decode step; 5: a k=4 verify)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per round")
    args = ap.parse_args()
    cores = {"kernel": chain(model.attend), "xla": chain(model.attend_jnp)}
    rng = np.random.default_rng(0)
    print(f"| context | queries | {' | '.join(f'{c} ms | {c} GB/s' for c in cores)} | kernel / xla |")
    print("|---|---|" + "---|---|" * len(cores) + "---|")
    for n in (int(c) for c in args.contexts.split(",")):
        S = -(-(n + 8) // 256) * 256  # a cache window holding the context, as decode's windows do
        ks = [jax.device_put(rng.standard_normal((1, S, KV, D), np.float32)) for _ in range(LAYERS)]
        vs = [jax.device_put(rng.standard_normal((1, S, KV, D), np.float32)) for _ in range(LAYERS)]
        for T in (int(t) for t in args.queries.split(",")):
            q = jax.device_put(rng.standard_normal((1, T, KV, G, D), np.float32))
            pos = jax.device_put(np.arange(n - T, n, dtype=np.int32)[None])
            ms: dict[str, list[float]] = {c: [] for c in cores}
            for f in cores.values():
                f(q, ks, vs, pos).block_until_ready()
            for _ in range(args.rounds):
                for c, f in cores.items():
                    t = time.perf_counter()
                    for _ in range(args.calls):
                        f(q, ks, vs, pos).block_until_ready()
                    ms[c].append((time.perf_counter() - t) / args.calls * 1e3)
            med = {c: statistics.median(x) for c, x in ms.items()}
            mb = 2 * n * KV * D * 4 * LAYERS / 1e6
            print(f"| {n} | {T} | " + " | ".join(f"{m:.2f} | {mb / m:.1f}" for m in med.values())
                  + f" | {med['xla'] / med['kernel']:.2f}x faster |", flush=True)


if __name__ == "__main__":
    main()
