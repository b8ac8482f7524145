"""Memory-bandwidth roofline of decoding: what the device can stream, and how many bytes one token reads.

A decode step is a chain of matrix-vector products, so its speed limit is bytes read / bandwidth. The bandwidth is
measured as several *independent* large float32 matrix-vector products in one jitted function (what all cores can
stream together, the best case a decoder's weights can hope for), and reported beside one product alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxspec.config import Config


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn())  # compile and first-execution costs
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bandwidth_probe(n_dots: int = 6, mib: int = 48, repeats: int = 15) -> dict[str, float]:
    """GB/s of ``n_dots`` independent (rows x 1024) float32 matrix-vector products of ``mib`` MiB each run in one
    jitted function (``concurrent``), and of one alone (``single``). Matrices are distinct, so nothing is cached."""
    cols = 1024
    rows = mib * (1 << 20) // (4 * cols)
    keys = jax.random.split(jax.random.key(0), n_dots)
    ws = [jax.random.normal(k, (rows, cols), jnp.float32) for k in keys]
    x = jnp.ones((cols,), jnp.float32)
    many = jax.jit(lambda ws, x: [w @ x for w in ws])
    one = jax.jit(lambda w, x: w @ x)
    nbytes = ws[0].nbytes
    t_many = median_s(lambda: many(ws, x), repeats)
    t_one = median_s(lambda: [one(w, x) for w in ws[:1]], repeats)
    return {"concurrent": n_dots * nbytes / t_many / 1e9, "single": nbytes / t_one / 1e9,
            "n_dots": n_dots, "mib": mib}


def bandwidth_gbs(repeats: int = 15) -> float:
    """The decode roofline's bandwidth: GB/s of several concurrent large float32 matrix-vector products."""
    return bandwidth_probe(repeats=repeats)["concurrent"]


def bytes_per_token(cfg: Config, context: int = 0, itemsize: int | None = None) -> int:
    """Bytes one decode step must read: every weight matrix once (the embedding table once, as the tied output head,
    or twice counting a separate head; the input embedding reads one row), plus K and V of ``context`` positions."""
    item = itemsize or jnp.dtype(cfg.dtype).itemsize
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    weights = cfg.n_layers * layer + cfg.vocab_size * d + d + (0 if cfg.tie_embeddings else d)
    return item * (weights + 2 * cfg.n_layers * context * kv * hd)


def roofline_tokens_per_s(cfg: Config, context: int, gbs: float) -> float:
    """Decode tokens/s at ``gbs`` GB/s if every step only streamed ``bytes_per_token``."""
    return gbs * 1e9 / bytes_per_token(cfg, context)
