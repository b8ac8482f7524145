"""Decode benchmark on one checkpoint, everything measured side by side in one run (medians of repeats).

    python benchmarks/bench.py                                   # AR vs roofline (+ HF transformers with --hf-python)
    python benchmarks/bench.py --ssd light --ssd attn-half       # + self-speculative decoding for named masks

Prints a markdown report: AR tokens/s, the memory-bandwidth roofline, and for each skip mask the acceptance, the
draft-step and verify costs relative to one full decode step, the measured SSD speedup and the speedup those
costs and acceptances predict (so any gap is implementation overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec.checkpoint import load  # noqa: E402
from jaxspec.config import Config, SkipMask  # noqa: E402
from jaxspec.decode import MIN_WINDOW, Decoder, Result, generate, prefill  # noqa: E402
from jaxspec.model import KVCache, Params, forward  # noqa: E402
from jaxspec.profile import named_masks  # noqa: E402
from jaxspec.roofline import bandwidth_probe, bytes_per_token, median_s  # noqa: E402
from jaxspec.speculative import SpecDecoder  # noqa: E402


def step_cost(params: Params, cfg: Config, T: int, skip: SkipMask, n: int = 16, repeats: int = 5) -> float:
    """Seconds per forward pass of a T-token chunk at context ~128 (n passes in one jitted loop)."""

    @jax.jit
    def loop(params: Params, cache: KVCache) -> jax.Array:
        def body(i: int, c: tuple) -> tuple:
            logits, cache = forward(params, cfg, jnp.full((1, T), 7, jnp.int32), c[0], skip)
            return cache.replace(lengths=c[0].lengths), c[1] + logits[0, -1, 0]
        return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

    cache = KVCache.create(cfg, 1, 256).replace(lengths=jnp.asarray([128], jnp.int32))
    return median_s(lambda: loop(params, cache), repeats) / n


def run(decoder: Decoder, params: Params, prompts: list[list[int]], max_new: int, repeats: int) -> list[Result]:
    generate(decoder, params, prompts[:1], max_new)  # warm-up: compile and first-execution costs
    return [generate(decoder, params, [p], max_new) for _ in range(repeats) for p in prompts]


def contexts(params: Params, cfg: Config, ctxs: tuple[int, ...], capacity: int = 4352, n: int = 32,
             rounds: int = 5) -> None:
    """Decode steps at each context in a cache sized for ``capacity`` (window 0) vs one that grows with the live
    length (the default), and the bandwidth probe, in interleaved rounds in one process (medians); and prefill of a
    1k-token prompt."""
    dec, rng = Decoder(cfg), np.random.default_rng(0)
    states = {(c, w): prefill(params, dec, [rng.integers(100, cfg.vocab_size, c).tolist()], capacity - c - 256,
                              window=w) for c in ctxs for w in (0, MIN_WINDOW)}
    secs: dict[tuple[int, int], list[float]] = {k: [] for k in states}
    probes = []
    for r in range(rounds + 1):
        probes.append(bandwidth_probe(repeats=3)["concurrent"])
        for k, s in states.items():
            s = jax.block_until_ready(jax.tree.map(jnp.copy, s))
            t = time.perf_counter()
            jax.block_until_ready(dec.run(params, s, jnp.int32(n)))
            if r:  # round 0 compiles
                secs[k].append(time.perf_counter() - t)
    gbs = statistics.median(probes)
    print(f"\n- bandwidth probe in the same rounds: {gbs:.1f} GB/s (per round {[round(p, 1) for p in probes]})")
    print("\n| context | cache | capacity | ms/step | tokens/s | roofline tokens/s | % of roofline |")
    print("|---|---|---|---|---|---|---|")
    for (c, w), ts in secs.items():
        t, roof = statistics.median(ts), gbs * 1e9 / bytes_per_token(cfg, c)
        print(f"| {c} | {'whole request' if w == 0 else 'live window'} | {states[c, w].cache.max_len} | "
              f"{t / n * 1e3:.2f} | {n / t:.1f} | {roof:.1f} | {n / t / roof:.0%} |")
    prompt = rng.integers(100, cfg.vocab_size, 1001).tolist()
    t = median_s(lambda: prefill(params, dec, [prompt], 16, window=MIN_WINDOW), rounds)
    print(f"\n- prefill of a 1,000-token prompt: {t * 1e3:.0f} ms = **{1000 / t:.0f} tokens/s**")


def tps(results: list[Result]) -> float:
    return sum(r.new_tokens for r in results) / sum(r.decode_s for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ssd", action="append", default=[], help="named mask (light, attn-half, attn-mlp) or a "
                    "profile JSON path; repeatable")
    ap.add_argument("--contexts", default="", help="comma-separated contexts (e.g. 128,2000): decode steps in a "
                    "4k cache vs a live-length window, and 1k-token prefill")
    ap.add_argument("--hf-python", help="python of a venv with torch+transformers: also run benchmarks/bench_hf.py")
    args = ap.parse_args()

    cfg, params, tok = load(args.ckpt)
    texts = ["The history of the Roman Empire began when", "def fibonacci(n):",
             tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])
             if tok.chat_template else "Once upon a time"]
    prompts = [tok.encode(t) for t in texts]
    weight_bytes = bytes_per_token(cfg, context=len(prompts[0]) + args.max_new_tokens // 2)
    probe = bandwidth_probe()
    bw = probe["concurrent"]
    print(f"## {args.ckpt}: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, {cfg.dtype}, "
          f"{args.max_new_tokens} new tokens, {len(prompts)} prompts x {args.repeats} repeats\n")
    print(f"- bytes read per token: {weight_bytes / 1e6:.0f} MB; bandwidth {bw:.1f} GB/s ({probe['n_dots']} concurrent "
          f"{probe['mib']} MiB matrix-vector products; one alone: {probe['single']:.1f} GB/s) "
          f"→ roofline {bw * 1e9 / weight_bytes:.1f} tokens/s")
    if args.contexts:
        contexts(params, cfg, tuple(int(c) for c in args.contexts.split(",")))
    ar = run(Decoder(cfg), params, prompts, args.max_new_tokens, args.repeats)
    ar_tps = tps(ar)
    print(f"- AR decode: **{ar_tps:.1f} tokens/s** ({ar_tps / (bw * 1e9 / weight_bytes):.0%} of roofline); "
          f"per-run {[round(r.tokens_per_s, 1) for r in ar]}")
    if args.hf_python:
        out = subprocess.run([args.hf_python, str(Path(__file__).with_name("bench_hf.py")), "--max-new-tokens",
                              str(args.max_new_tokens)], capture_output=True, text=True, check=True).stdout
        hf = json.loads(out.strip().splitlines()[-1])
        print(f"- HF transformers (torch {hf.get('torch')}): {hf['hf_tokens_per_s']:.1f} tokens/s → jaxspec is "
              f"{ar_tps / hf['hf_tokens_per_s']:.2f}x")
    if not args.ssd:
        return
    c_ar = step_cost(params, cfg, 1, SkipMask())
    print(f"\n- full decode step {c_ar * 1e3:.1f} ms; verify chunk cost / decode step: " + ", ".join(
        f"T={t}: {step_cost(params, cfg, t, SkipMask()) / c_ar:.2f}" for t in (2, 4, 8, 13)))
    print("\n| mask | skipped attn+mlp | draft step / full | acceptance | mean accepted | AR tok/s | SSD tok/s |"
          " speedup | predicted | identical |\n|---|---|---|---|---|---|---|---|---|---|")
    masks = named_masks(cfg.n_layers)
    for name in args.ssd:
        if name in masks:
            mask = masks[name]
        else:
            from jaxspec.profile import load_profile
            mask = load_profile(name, cfg).mask
        dec = SpecDecoder(cfg, skip=mask)
        ar_again = run(Decoder(cfg), params, prompts, args.max_new_tokens, 1)
        ssd = run(dec, params, prompts, args.max_new_tokens, args.repeats)
        c_draft = step_cost(params, cfg, 1, mask) / c_ar
        c_verify = {t: step_cost(params, cfg, t, SkipMask()) / c_ar for t in dec.verify_sizes}
        # Predicted time in full-step units from each cycle's measured draft steps and verify chunk length.
        pred_cost, tokens = 0.0, 0
        for r in ssd:
            for nd in r.stats.drafted_trace[0][: r.stats.verify_calls[0]]:
                pred_cost += nd * c_draft + c_verify[min(t for t in dec.verify_sizes if t >= nd + 1)]
            tokens += r.new_tokens
        drafted, accepted, calls = (sum(r.stats.summary()[k] for r in ssd) for k in ("drafted", "accepted",
                                                                                       "verify_calls"))
        same = all(s.tokens == a.tokens for s, a in zip(ssd, ar_again * args.repeats, strict=False))
        ar_tps2 = tps(ar_again)
        print(f"| {name} | {len(mask.attn)}+{len(mask.mlp)} | {c_draft:.2f} | {accepted / drafted:.2f} | "
              f"{accepted / calls:.2f} | {ar_tps2:.1f} | {tps(ssd):.1f} | {tps(ssd) / ar_tps2:.2f}x | "
              f"{tokens / pred_cost:.2f}x | {same} |")


if __name__ == "__main__":
    main()
