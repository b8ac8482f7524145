"""Exact packed weights (4-bit blocks, ``blockquant``; or 2-byte tiles) vs float32 packed weights, in one process.

    python benchmarks/bench_exact.py                      # AR decode tokens/s, forward cost at 1-13 tokens
    python benchmarks/bench_exact.py --rounds 6 --widths 1,2,5,9
    python benchmarks/bench_exact.py --round float16      # the checkpoint's values rounded to float16 first

Both packs of the same checkpoint (SmolLM2: Q4_1 layers and a Q8_0 head as 4- and 8-bit blocks, or float32 tiles),
AR greedy decoding of a few prompts in interleaved rounds (medians), the output compared token for token, and the
cost of a T-token forward (a verify's width) at context ~128 in each. ``--round float16`` (or ``bfloat16``) first
rounds every weight to that dtype, as the float32 model of an HF float16 (bfloat16) checkpoint holds them (another
model than SmolLM2's GGUF one): its exact pack is then 2-byte tiles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench import step_cost  # noqa: E402

from jaxspec.checkpoint import load  # noqa: E402
from jaxspec.config import SkipMask  # noqa: E402
from jaxspec.decode import Decoder, generate  # noqa: E402
from jaxspec.model import pack  # noqa: E402
from jaxspec.roofline import bytes_per_token  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--widths", default="1,2,3,5,9,13", help="forward widths T to time (1: a decode step)")
    ap.add_argument("--round", choices=["float16", "bfloat16"], help="round every weight to this dtype first (an HF "
                    "checkpoint's values)")
    args = ap.parse_args()
    cfg, params, tok = load(args.ckpt)  # orbax's float32 arrays, not packed
    if args.round:
        params = jax.tree.map(lambda a: a.astype(args.round).astype(jnp.float32), params)
    packs = {}
    for name, exact in ((f"{args.round} tiles" if args.round else "exact blocks", True), ("float32", False)):
        t = time.perf_counter()
        packs[name] = jax.block_until_ready(pack(params, exact=exact))
        print(f"- pack ({name}): {time.perf_counter() - t:.1f} s, a decode step reads "
              f"{bytes_per_token(cfg, params=packs[name]) / 1e6:.0f} MB of weights")
    texts = ["The history of the Roman Empire began when", "def fibonacci(n):"]
    prompts = [tok.encode(t) for t in texts]
    dec = Decoder(cfg)
    tps: dict[str, list[float]] = {n: [] for n in packs}
    tokens: dict[str, list] = {n: [] for n in packs}
    for p in packs.values():
        generate(dec, p, prompts[:1], args.max_new_tokens)  # compile
    for r in range(args.rounds):
        for name in list(packs) if r % 2 == 0 else list(packs)[::-1]:
            for prompt in prompts:
                out = generate(dec, packs[name], [prompt], args.max_new_tokens)
                tps[name].append(out.tokens_per_s)
                if r == 0:
                    tokens[name].append(out.tokens)
    (ex, a), (fl, b) = ((n, statistics.median(tps[n])) for n in packs)
    print(f"\n- AR decode, {args.max_new_tokens} new tokens, {len(prompts)} prompts x {args.rounds} rounds: "
          f"{ex} **{a:.1f}** tokens/s, {fl} {b:.1f} (medians): **{a / b:.2f}x**; identical output: "
          f"{tokens[ex] == tokens[fl]}")
    widths = [int(w) for w in args.widths.split(",")]
    cost: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for name, p in packs.items():
            for w in widths:
                cost.setdefault((name, w), []).append(step_cost(p, cfg, w, SkipMask(), n=16, repeats=3))
    print("\n| forward of T tokens (context ~128) | " + " | ".join(f"T={w}" for w in widths) + " |")
    print("|---|" + "---|" * len(widths))
    for name in packs:
        one = statistics.median(cost[(name, 1)])
        print(f"| {name}: ms (x its decode step) | " + " | ".join(
            f"{statistics.median(cost[(name, w)]) * 1e3:.2f} ({statistics.median(cost[(name, w)]) / one:.2f})"
            for w in widths) + " |")


if __name__ == "__main__":
    main()
