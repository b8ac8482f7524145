"""What one full-model pass costs to compile, to load from its serialized form, to run the first time and to run
warm, for the ways of writing the layer loop (SmolLM2-135M shapes, random weights, batch 1, a cache of 256 slots or
the chunk's length + 256, ``--context`` tokens cached before the chunk):

- ``scan, packed``: ``model.forward`` with ``model.pack``'s weights where the CPU kernels run: one loop over the
  layers, the kernels reading each layer's packed weights and cache in place (what the decode loops run);
- ``unrolled, packed``: the same weights with the layers unrolled in Python (the decode loops before session 17);
- ``unrolled``: plain weights (the kernels' (K, N) products at few rows, XLA's dots beyond);
- ``scanned``: ``lax.scan`` over plain weights stacked on a layer axis (what 1024-token prompt chunks run);
- ``per-layer``: one small executable of one layer, dispatched once per layer (what shorter prompt chunks run), its
  run including a copy of the cache (each layer updates it in place).

Then, with ``--decode-contexts``, the decode loop itself (``Decoder.run``, 32 AR steps from a prompt of that many
tokens) with the packed layers scanned vs unrolled, in interleaved rounds (medians).

    python benchmarks/bench_exec_size.py [--tokens 1,5,32] [--runs 30] [--decode-contexts 128,2000]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.serialize_executable import deserialize_and_load, serialize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxspec import cpu_kernels  # noqa: E402
from jaxspec import model as M  # noqa: E402
from jaxspec.config import PRESETS  # noqa: E402
from jaxspec.decode import MIN_WINDOW, Decoder, prefill  # noqa: E402

CFG = PRESETS["smollm2-135m"]


def head(embed: jax.Array, norm: jax.Array, x: jax.Array) -> jax.Array:
    x = M.rms_norm(x, norm, CFG.norm_eps).astype(embed.dtype)
    return jnp.einsum("btd,vd->btv", x[:, -1:], embed, preferred_element_type=jnp.float32)


def scanned(embed: jax.Array, norm: jax.Array, stacked: M.Layer, tokens: jax.Array, k: jax.Array, v: jax.Array,
            start: jax.Array) -> tuple[jax.Array, ...]:
    def body(x: jax.Array, lkv: tuple) -> tuple:
        x, k1, v1 = M.block(lkv[0], CFG, x, lkv[1][None], lkv[2][None], 0, start)
        return x, (k1[0], v1[0])

    x, (k, v) = jax.lax.scan(body, embed[tokens].astype(jnp.float32), (stacked, k, v))
    return head(embed, norm, x), k, v


def timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    jax.block_until_ready(f())
    return time.perf_counter() - t


def report(name: str, compiled: list, run: Callable[[list], object], runs: int) -> None:
    """Serialize, load back, then time the first and the warm runs of the loaded executables."""
    blobs = [pickle.dumps(serialize(c)) for c in compiled]
    t = time.perf_counter()
    loaded = [deserialize_and_load(*pickle.loads(b)) for b in blobs]
    load = time.perf_counter() - t
    first = timed(lambda: run(loaded))
    warm = statistics.median(timed(lambda: run(loaded)) for _ in range(runs))
    print(f"| {name} | {sum(map(len, blobs)) / 1e6:.2f} | {load * 1e3:.0f} | {first * 1e3:.0f} | "
          f"{(load + first) * 1e3:.0f} | {warm * 1e3:.1f} |", flush=True)


def passes(params: M.Params, packed: M.Params | None, tokens: list[int], context: int, runs: int) -> None:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers)
    print("| layer loop, tokens | MB | load ms | first run ms | load + first ms | warm run ms |")
    print("|---|---|---|---|---|---|")
    for T in tokens:
        cache = M.KVCache.create(CFG, 1, context + (256 if T <= 32 else T + 256))
        cache = cache.replace(lengths=jnp.asarray([context], jnp.int32))
        k, v, start = cache.k, cache.v, cache.lengths
        tok = jnp.ones((1, T), jnp.int32)
        whole = {"unrolled": params}
        if packed is not None:
            whole = {"scan, packed": packed, "unrolled, packed": packed.replace(
                packed=packed.packed.replace(stacked=None)), **whole}
        for name, p in whole.items():
            c = jax.jit(lambda p, t, c: M.forward(p, CFG, t, c)).lower(p, tok, cache).compile()
            report(f"{name}, {T}", [c], lambda e, t=tok, c=cache, p=p: e[0](p, t, c), runs)
        sargs = (params.embed, params.norm, stacked, tok, k, v, start)
        report(f"scanned, {T}", [jax.jit(scanned).lower(*sargs).compile()], lambda e, a=sargs: e[0](*a), runs)
        x = params.embed[tok].astype(jnp.float32)
        layer = jax.jit(lambda ly, x, k, v, i, s: M.block(ly, CFG, x, k, v, i, s), donate_argnums=(2, 3))
        ids = [jnp.int32(i) for i in range(CFG.n_layers)]
        compiled = [layer.lower(params.layers[0], x, cache.k, cache.v, ids[0], start).compile(),
                    jax.jit(head).lower(params.embed, params.norm, x).compile()]

        def per_layer(e: list, x: jax.Array = x, cache: M.KVCache = cache, start: jax.Array = start,
                      ids: list = ids) -> jax.Array:
            k, v = jnp.copy(cache.k), jnp.copy(cache.v)  # each layer updates the caches in place (donated)
            for i, ly in zip(ids, params.layers, strict=True):
                x, k, v = e[0](ly, x, k, v, i, start)
            return e[1](params.embed, params.norm, x)

        report(f"per-layer, {T}", compiled, per_layer, runs)


def decode(packed: M.Params, contexts: list[int], rounds: int, steps: int = 32) -> None:
    """ms per AR step of the decode loop, packed layers scanned vs unrolled, interleaved rounds."""
    dec, rng = Decoder(CFG), np.random.default_rng(0)
    ways = {"scan": packed, "unrolled": packed.replace(packed=packed.packed.replace(stacked=None))}
    states = {c: prefill(packed, dec, [rng.integers(100, CFG.vocab_size, c).tolist()], steps + 8, window=MIN_WINDOW)
              for c in contexts}
    ms: dict[tuple[int, str], list[float]] = {(c, w): [] for c in contexts for w in ways}
    for r in range(rounds + 1):
        for c, s in states.items():
            for w, p in ways.items():
                s2 = jax.block_until_ready(jax.tree.map(jnp.copy, s))
                t = timed(lambda p=p, s2=s2: dec.run(p, s2, jnp.int32(steps)))
                if r:  # round 0 compiles
                    ms[c, w].append(t / steps * 1e3)
    print("\n| context | scan ms/step | unrolled ms/step | unrolled / scan | per-round ratios |")
    print("|---|---|---|---|---|")
    for c in contexts:
        a, b = statistics.median(ms[c, "scan"]), statistics.median(ms[c, "unrolled"])
        ratios = [round(u / s, 2) for s, u in zip(ms[c, "scan"], ms[c, "unrolled"], strict=True)]
        print(f"| {c} | {a:.2f} | {b:.2f} | {b / a:.3f} | {ratios} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,5,32", help="chunk lengths of the pass table ('' for none)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--context", type=int, default=128, help="tokens cached before the chunk in the pass table")
    ap.add_argument("--decode-contexts", default="", help="e.g. 128,2000: the decode loop, scanned vs unrolled")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the decode comparison")
    args = ap.parse_args()
    params = M.init_params(CFG, jax.random.key(0), 0.02)
    packed = M.pack(params) if cpu_kernels.active() else None
    if args.tokens:
        passes(params, packed, [int(t) for t in args.tokens.split(",")], args.context, args.runs)
    if args.decode_contexts:
        if packed is None:
            sys.exit("error: --decode-contexts compares the CPU kernels' layer loops; they are not available here")
        decode(packed, [int(c) for c in args.decode_contexts.split(",")], args.rounds)


if __name__ == "__main__":
    main()
