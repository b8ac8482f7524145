"""Memory-bandwidth roofline of decoding: what the device can stream, and how many bytes one token reads.

A decode step is a chain of matrix-vector products, so its speed limit is bytes read / bandwidth. The bandwidth is
measured as many *independent* float32 matrix-vector products in one jitted function, ~512 MiB in all (what all
cores can stream together from memory, the best case a decoder's weights can hope for), and, where the CPU kernels
run, as a plain read of 512 MiB on all their threads (no product at all: XLA's dots may stream less than the cores
can); ``VARIANTS`` holds the shapes tried (BENCHMARKS.md "Bandwidth limit"), ``FAST`` the ones the roofline takes the
best of.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import cpu_kernels
from jaxspec.config import Config


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    return statistics.median(times_s(fn, repeats))


def times_s(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after one warm-up call (compilation, first execution)."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return ts


_MiB = 1 << 20
# name -> (how, count, MiB each): every variant reads ~512 MiB per call (16x the 32 MiB L3), each byte once.
VARIANTS: dict[str, tuple[str, int, int]] = {
    "6 x 48 MiB W@x": ("dots", 6, 48),
    "32 x 16 MiB W@x": ("dots", 32, 16),
    "64 x 8 MiB W@x": ("dots", 64, 8),
    "32 x 16 MiB x@W, 576 rows (the model's layout)": ("xw", 32, 16),
    "one 512 MiB W@x": ("dots", 1, 512),
    "one 512 MiB W@x, 16 row blocks": ("blocked", 16, 32),
    "sum of 512 MiB": ("sum", 1, 512),
    "sum of 512 MiB on every core (cpu_kernels)": ("pool", 1, 512),  # where the kernels run; skipped elsewhere
}
FAST = ("32 x 16 MiB W@x", "64 x 8 MiB W@x", "32 x 16 MiB x@W, 576 rows (the model's layout)",
        "sum of 512 MiB on every core (cpu_kernels)")


def _variant(how: str, n: int, mib: int) -> tuple[Callable[[], object], int]:
    """A jitted call reading ``n`` distinct ``mib``-MiB float32 arrays once, and its byte count."""
    cols = 576 if how == "xw" else 1024
    rows = mib * _MiB // (4 * cols)
    if how == "pool":
        a = np.random.default_rng(0).standard_normal(rows * cols, np.float32)
        return (lambda: cpu_kernels.stream_sum(a)), a.nbytes
    keys = jax.random.split(jax.random.key(0), n)
    if how == "blocked":  # one matrix, its rows in n blocks: one batched product
        w = jax.random.normal(keys[0], (n, rows, cols), jnp.float32)
        x = jnp.ones((cols,), jnp.float32)
        f = jax.jit(lambda w, x: jnp.einsum("brc,c->br", w, x))
        return (lambda: f(w, x)), w.nbytes
    if how == "sum":
        a = jax.random.normal(keys[0], (rows * cols,), jnp.float32)
        f = jax.jit(jnp.sum)
        return (lambda: f(a)), a.nbytes
    ws = [jax.random.normal(k, (cols, rows) if how == "xw" else (rows, cols), jnp.float32) for k in keys]
    x = jnp.ones((cols,), jnp.float32)
    f = jax.jit((lambda ws, x: [x @ w for w in ws]) if how == "xw" else (lambda ws, x: [w @ x for w in ws]))
    return (lambda: f(ws, x)), sum(w.nbytes for w in ws)


def bandwidth_probe(names: tuple[str, ...] = FAST, repeats: int = 15) -> dict[str, object]:
    """GB/s each probe variant in ``names`` streams (``VARIANTS``; bytes / the *fastest* of ``repeats`` calls: load
    only ever slows a call down, and a roofline is the best case), and the best of them (``concurrent``, ``best``).
    Independent matrix-vector products in one jitted function let XLA run them on all cores at once; the plain read
    on the kernels' threads is left out where they do not run."""
    gbs = {}
    for name in names:
        if VARIANTS[name][0] == "pool" and not cpu_kernels.active():
            continue
        fn, nbytes = _variant(*VARIANTS[name])
        gbs[name] = round(nbytes / min(times_s(fn, repeats)) / 1e9, 2)
        del fn
    best = max(gbs, key=gbs.__getitem__)
    return {"concurrent": gbs[best], "best": best, "variants": gbs}


def bandwidth_gbs(repeats: int = 15) -> float:
    """The decode roofline's bandwidth: GB/s of the best of the ``FAST`` probe variants."""
    return float(bandwidth_probe(repeats=repeats)["concurrent"])


def bytes_per_token(cfg: Config, context: int = 0, itemsize: int | None = None, params: Any = None) -> int:
    """Bytes one decode step must read: every weight matrix once (the embedding table once, as the tied output head,
    or twice counting a separate head; the input embedding reads one row), plus K and V of ``context`` positions.
    ``params`` (``model.Params``) with packed weights: their bytes as stored instead (4-bit blocks where exact)."""
    item = itemsize or jnp.dtype(cfg.dtype).itemsize
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    cache = item * 2 * cfg.n_layers * context * kv * hd
    if params is not None and params.packed is not None:
        read = params.packed.layers, params.packed.head, params.norm  # the layers' leaves include their norms
        return sum(a.nbytes for a in jax.tree.leaves(read)) + cache
    layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    weights = cfg.n_layers * layer + cfg.vocab_size * d + d + (0 if cfg.tie_embeddings else d)
    return item * weights + cache


def roofline_tokens_per_s(cfg: Config, context: int, gbs: float) -> float:
    """Decode tokens/s at ``gbs`` GB/s if every step only streamed ``bytes_per_token``."""
    return gbs * 1e9 / bytes_per_token(cfg, context)
