"""What one full-model pass costs to compile, to load from its serialized form, to run the first time and to run
warm, for three ways of writing the layer loop (SmolLM2-135M shapes, random weights, batch 1, a cache of 256 slots
or the chunk's length + 256):

- ``unrolled``: one executable with a Python loop over the 30 layers (what the decode loops use);
- ``scanned``: one executable, ``lax.scan`` over weights stacked on a layer axis;
- ``per-layer``: one small executable of one layer, dispatched once per layer (what prefill uses).

    python benchmarks/bench_exec_size.py [--tokens 1,5,32] [--runs 30]
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
from jax.experimental.serialize_executable import deserialize_and_load, serialize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxspec import model as M  # noqa: E402
from jaxspec.config import PRESETS  # noqa: E402

CFG = PRESETS["smollm2-135m"]


def head(embed: jax.Array, norm: jax.Array, x: jax.Array) -> jax.Array:
    x = M.rms_norm(x, norm, CFG.norm_eps).astype(embed.dtype)
    return jnp.einsum("btd,vd->btv", x[:, -1:], embed, preferred_element_type=jnp.float32)


def scanned(embed: jax.Array, norm: jax.Array, stacked: M.Layer, tokens: jax.Array, k: jax.Array, v: jax.Array,
            start: jax.Array) -> tuple[jax.Array, ...]:
    def body(x: jax.Array, lkv: tuple) -> tuple:
        x, k1, v1 = M.block(lkv[0], CFG, x, lkv[1], lkv[2], start)
        return x, (k1, v1)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,5,32")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    params = M.init_params(CFG, jax.random.key(0), 0.02)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers)
    print("| layer loop, tokens | MB | load ms | first run ms | load + first ms | warm run ms |")
    print("|---|---|---|---|---|---|")
    for T in map(int, args.tokens.split(",")):
        cache = M.KVCache.create(CFG, 1, 256 if T <= 32 else T + 256)
        k, v, start = jnp.stack(cache.k), jnp.stack(cache.v), cache.lengths
        tok = jnp.ones((1, T), jnp.int32)
        t = time.perf_counter()
        c = jax.jit(lambda p, t, c: M.forward(p, CFG, t, c)).lower(params, tok, cache).compile()
        print(f"<!-- unrolled T={T} compile {time.perf_counter() - t:.2f} s -->")
        report(f"unrolled, {T}", [c], lambda e, t=tok, c=cache: e[0](params, t, c), args.runs)
        sargs = (params.embed, params.norm, stacked, tok, k, v, start)
        report(f"scanned, {T}", [jax.jit(scanned).lower(*sargs).compile()], lambda e, a=sargs: e[0](*a), args.runs)
        x = params.embed[tok].astype(jnp.float32)
        layer = jax.jit(lambda ly, x, k, v, s: M.block(ly, CFG, x, k, v, s))
        compiled = [layer.lower(params.layers[0], x, cache.k[0], cache.v[0], start).compile(),
                    jax.jit(head).lower(params.embed, params.norm, x).compile()]

        def per_layer(e: list, x: jax.Array = x, cache: M.KVCache = cache, start: jax.Array = start) -> jax.Array:
            for i, ly in enumerate(params.layers):
                x = e[0](ly, x, cache.k[i], cache.v[i], start)[0]
            return e[1](params.embed, params.norm, x)

        report(f"per-layer, {T}", compiled, per_layer, args.runs)


if __name__ == "__main__":
    main()
