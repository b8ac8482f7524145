"""Decode benchmark on one checkpoint, everything measured side by side in one run (medians of repeats).

    python benchmarks/bench.py                                   # AR vs roofline, + peers when installed
    python benchmarks/bench.py --hf-python /path/to/venv-hf/bin/python   # HF transformers from another venv
    python benchmarks/bench.py --ssd light --ssd attn-half       # + self-speculative decoding for named masks
    python benchmarks/bench.py --probe-variants                  # every bandwidth probe variant, then exit
    python benchmarks/bench.py --rows-probe                      # the weights' products at 1-32 rows, XLA vs kernel
    python benchmarks/bench.py --prefill-lengths 39,65,257,1025  # prefill at those prompt lengths, two bucket sets

Prints a markdown report: AR tokens/s, the memory-bandwidth roofline, the peers (llama.cpp through
llama-cpp-python, HF transformers through ``--hf-python``; ``jaxspec.bench.peers``, same GGUF weights and prompts)
as decode rate, prefill rate and first-token latency beside jaxspec's and as ratios, and for each skip mask the
acceptance, the draft-step and verify costs relative to one full decode step, the measured SSD speedup and the
speedup those costs and acceptances predict (so any gap is implementation overhead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec.bench import peers  # noqa: E402
from jaxspec.checkpoint import fast_cache_dir, load, smollm2_gguf_path  # noqa: E402
from jaxspec.config import Config, SkipMask  # noqa: E402
from jaxspec.decode import MIN_WINDOW, Decoder, Result, generate, prefill  # noqa: E402
from jaxspec.model import KVCache, Params, forward, project  # noqa: E402
from jaxspec.profile import named_masks  # noqa: E402
from jaxspec.roofline import VARIANTS, bandwidth_probe, bytes_per_token, median_s  # noqa: E402
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
        t, roof = statistics.median(ts), gbs * 1e9 / bytes_per_token(cfg, c, params=params)
        print(f"| {c} | {'whole request' if w == 0 else 'live window'} | {states[c, w].cache.max_len} | "
              f"{t / n * 1e3:.2f} | {n / t:.1f} | {roof:.1f} | {n / t / roof:.0%} |")
    prompt = rng.integers(100, cfg.vocab_size, 1001).tolist()
    t = median_s(lambda: prefill(params, dec, [prompt], 16, window=MIN_WINDOW), rounds)
    print(f"\n- prefill of a 1,000-token prompt: {t * 1e3:.0f} ms = **{1000 / t:.0f} tokens/s**")


def tps(results: list[Result]) -> float:
    return sum(r.new_tokens for r in results) / sum(r.decode_s for r in results)


def rates(new: list[int], decode_s: list[float], prompt_tokens: list[int], ttft_s: list[float]
          ) -> tuple[float, float, float]:
    """(decode tokens/s, prefill tokens/s = prompt tokens / time to first token, median first-token seconds)."""
    return sum(new) / sum(decode_s), sum(prompt_tokens) / sum(ttft_s), statistics.median(ttft_s)


def peer_table(ckpt: str, prompts: list[list[int]], max_new: int, ar: list[Result], hf_python: str | None) -> None:
    """llama.cpp and HF transformers (plain greedy) on the same prompts and GGUF weights, beside jaxspec AR (its
    runs above) and as ratios; rows say why a peer is missing. Peers run after jaxspec, one prompt once each."""
    if ckpt != "smollm2-135m":
        print("\n- peers: only for smollm2-135m (its GGUF is the peers' weights)")
        return
    gguf, few = smollm2_gguf_path(), [("ar", str(i), p) for i, p in enumerate(prompts)]
    st_ll, rec_ll = peers.llama_cpp(gguf, few, max_new, modes=("llama.cpp",))
    st_hf, rec_hf = peers.hf(hf_python, gguf, few, max_new, early_exit=0, modes=("hf",))
    mine = rates([r.new_tokens for r in ar], [r.decode_s for r in ar], [r.prompt_tokens[0] for r in ar],
                 [r.ttft_s for r in ar])
    print(f"\n- peers after jaxspec, same {len(prompts)} prompts, {max_new} new tokens; prefill = prompt tokens / time "
          "to first token; ratios are peer / jaxspec (first token: jaxspec / peer, so > 1 means the peer is faster)")
    print("\n| decoder | decode tok/s | × jaxspec | prefill tok/s | × jaxspec | first token ms | × jaxspec |")
    print("|---|---|---|---|---|---|---|")
    print(f"| jaxspec AR | {mine[0]:.1f} | 1.00 | {mine[1]:.0f} | 1.00 | {mine[2] * 1e3:.0f} | 1.00 |")
    status = {**st_ll, **st_hf}
    for name in ("llama.cpp", "hf"):
        recs = [r for r in rec_ll + rec_hf if r["mode"] == name]
        if not recs:
            print(f"| {name} | {status.get(name)} | — | — | — | — | — |")
            continue
        d, p, f = rates(*([r[k] for r in recs] for k in ("new_tokens", "decode_s", "prompt_tokens", "ttft_s")))
        print(f"| {name} | {d:.1f} | {d / mine[0]:.2f} | {p:.0f} | {p / mine[1]:.2f} | {f * 1e3:.0f} | "
              f"{mine[2] / f:.2f} |")
    versions = {**st_ll.get("versions", {}), **st_hf.get("versions", {})}
    if versions:
        print("\n- peer versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def probe_table() -> None:
    """Every bandwidth probe variant (``roofline.VARIANTS``), GB/s of its fastest call; twice, interleaved."""
    rounds = [bandwidth_probe(tuple(VARIANTS))["variants"] for _ in range(2)]
    print(f"load average {os.getloadavg()}\n\n| probe (~512 MiB read per call) | GB/s (two rounds) |\n|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {' / '.join(f'{r[name]:.1f}' for r in rounds)} |")


def rows_table(params: Params, rows: tuple[int, ...] = (1, 2, 5, 9, 13, 16, 32), repeats: int = 10) -> None:
    """What verify pays per row on this backend: the model's weight products alone (every layer's seven matrices
    and the head, each read once, in the model's dependency order: no attention, norms or cache) at T rows, as ms
    and GB/s, through XLA's dots and through ``cpu_kernels``'s kernel (where it is built); medians, the T's and the
    two paths interleaved over two rounds."""
    from jaxspec import cpu_kernels

    def chain(p: Params, x: jax.Array) -> jax.Array:
        for ly in p.layers:
            q, k, v = project(x, ly.wq, ly.wk, ly.wv)
            (o,) = project(q, ly.wo, n_in=2)
            x = x + o + 1e-30 * (k.sum() + v.sum())
            g, u = project(x, ly.w_gate, ly.w_up)
            x = x + project(jax.nn.silu(g) * u, ly.w_down)[0]
        return cpu_kernels.matmul_t(x, p.embed) if p.lm_head is None else project(x, p.lm_head)[0]

    paths = {"XLA dots": False} | ({"kernel": True} if cpu_kernels.active() else {})
    fns = {}
    for name, on in paths.items():  # traced (and so compiled) under each setting
        with cpu_kernels.enabled(on):
            fns[name] = jax.jit(lambda p, x: chain(p, x))
            for t in rows:
                jax.block_until_ready(fns[name](params, jnp.ones((t, params.embed.shape[1]), params.embed.dtype)))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(params.layers)) + params.embed.nbytes
    times: dict[tuple[str, int], list[float]] = {(n, t): [] for n in fns for t in rows}
    for _ in range(2):
        for t in rows:
            x = jnp.ones((t, params.embed.shape[1]), params.embed.dtype)
            for n, f in fns.items():
                for _ in range(repeats // 2):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(params, x))
                    times[n, t].append(time.perf_counter() - t0)
    print(f"load average {os.getloadavg()}, {nbytes / 1e6:.0f} MB of weights, kernel threads "
          f"{cpu_kernels.threads()}\n\n| rows | " + " | ".join(f"{n}: ms, GB/s, × 1 row" for n in fns)
          + (" | XLA / kernel |" if len(fns) == 2 else " |") + "\n|---|" + "---|" * (len(fns) + (len(fns) == 2)))
    for t in rows:
        med = {n: statistics.median(times[n, t]) for n in fns}
        cells = [f"{m * 1e3:.1f}, {nbytes / m / 1e9:.1f}, {m / statistics.median(times[n, rows[0]]):.2f}"
                 for n, m in med.items()]
        ratio = [f"{med['XLA dots'] / med['kernel']:.2f}"] if len(fns) == 2 else []
        print(f"| {t} | " + " | ".join(cells + ratio) + " |")


def prefill_table(params: Params, cfg: Config, lengths: tuple[int, ...], max_new: int, rounds: int = 3,
                  coarse: tuple[int, ...] = (16, 64, 256, 1024)) -> None:
    """Prefill time (prompt written, first token sampled; a request for ``max_new`` more, which bounds the padding)
    at each prompt length with ``decode.PREFILL_BUCKETS``
    against the ``coarse`` bucket set, interleaved rounds after a compiling one; medians."""
    from jaxspec import decode

    fine = decode.PREFILL_BUCKETS
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(100, cfg.vocab_size, n).tolist() for n in lengths}
    times: dict[tuple, list[float]] = {(n, b): [] for n in lengths for b in (fine, coarse)}
    first: dict[tuple, int] = {}
    padded: dict[tuple, int] = {}
    try:
        for r in range(rounds + 1):
            for n in lengths:
                for b in (fine, coarse):
                    decode.PREFILL_BUCKETS = b
                    padded[n, b] = min(decode.bucket(n), decode.capacity(Decoder(cfg), n + max_new))
                    t0 = time.perf_counter()
                    state = prefill(params, Decoder(cfg), [prompts[n]], max_new, window=MIN_WINDOW)
                    first[n, b] = int(np.asarray(state.last)[0])
                    if r:
                        times[n, b].append(time.perf_counter() - t0)
    finally:
        decode.PREFILL_BUCKETS = fine
    print(f"load average {os.getloadavg()}\n\n| prompt tokens | padded (fine / coarse) | ms, buckets {fine[:6]}... | "
          f"ms, buckets {coarse} | tokens/s (fine) | coarse / fine | same first token |\n|---|---|---|---|---|---|---|")
    for n in lengths:
        tf, tc = statistics.median(times[n, fine]), statistics.median(times[n, coarse])
        print(f"| {n} | {padded[n, fine]} / {padded[n, coarse]} | {tf * 1e3:.0f} | {tc * 1e3:.0f} | "
              f"{n / tf:.0f} | {tc / tf:.2f}x | {first[n, fine] == first[n, coarse]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ssd", action="append", default=[], help="named mask (light, attn-half, attn-mlp) or a "
                    "profile JSON path; repeatable")
    ap.add_argument("--contexts", default="", help="comma-separated contexts (e.g. 128,2000): decode steps in a "
                    "4k cache vs a live-length window, and 1k-token prefill")
    ap.add_argument("--hf-python", help="python of a venv with torch + transformers + gguf for the HF peer row")
    ap.add_argument("--no-peers", action="store_true", help="skip llama.cpp and HF transformers")
    ap.add_argument("--probe-variants", action="store_true", help="print every bandwidth probe variant and exit")
    ap.add_argument("--rows-probe", action="store_true",
                    help="print the weight products' cost at 1-32 rows (XLA dots and the CPU kernel) and exit")
    ap.add_argument("--prefill-lengths", default="", help="comma-separated prompt lengths: prefill with the fine "
                    "and a coarse bucket set, then exit")
    args = ap.parse_args()
    if args.probe_variants:
        probe_table()
        return

    cfg, params, tok = load(args.ckpt, fast_cache=fast_cache_dir())  # the weights as generate.py loads them
    if args.rows_probe:
        rows_table(params)
        return
    if args.prefill_lengths:
        prefill_table(params, cfg, tuple(int(n) for n in args.prefill_lengths.split(",")), args.max_new_tokens)
        return
    texts = ["The history of the Roman Empire began when", "def fibonacci(n):",
             tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])
             if tok.chat_template else "Once upon a time"]
    prompts = [tok.encode(t) for t in texts]
    weight_bytes = bytes_per_token(cfg, context=len(prompts[0]) + args.max_new_tokens // 2, params=params)
    probe = bandwidth_probe()
    bw = probe["concurrent"]
    print(f"## {args.ckpt}: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, {cfg.dtype}, "
          f"{args.max_new_tokens} new tokens, {len(prompts)} prompts x {args.repeats} repeats\n")
    print(f"- bytes read per token: {weight_bytes / 1e6:.0f} MB; bandwidth {bw:.1f} GB/s (best probe: {probe['best']}; "
          f"all: {probe['variants']}) → roofline {bw * 1e9 / weight_bytes:.1f} tokens/s")
    if args.contexts:
        contexts(params, cfg, tuple(int(c) for c in args.contexts.split(",")))
    ar = run(Decoder(cfg), params, prompts, args.max_new_tokens, args.repeats)
    ar_tps = tps(ar)
    print(f"- AR decode: **{ar_tps:.1f} tokens/s** ({ar_tps / (bw * 1e9 / weight_bytes):.0%} of roofline); "
          f"per-run {[round(r.tokens_per_s, 1) for r in ar]}")
    if not args.no_peers:
        peer_table(args.ckpt, prompts, args.max_new_tokens, ar, args.hf_python)
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
