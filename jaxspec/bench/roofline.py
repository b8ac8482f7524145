"""Bandwidth limit of decoding: measured memory bandwidth and the bytes a full forward pass reads per token.

A minimal stand-in, private to the benchmark, for the project-wide ``jaxspec.roofline`` module (same two functions,
``bandwidth_gbs`` and ``bytes_per_token``); the benchmark switches to that module once it exists.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config
from jaxspec.model import param_shapes


def bandwidth_gbs(n_mats: int = 4, rows: int = 4096, repeats: int = 10) -> float:
    """Float32 read bandwidth (GB/s): ``n_mats`` independent 64 MiB matrix-vector products in one jitted call, so
    XLA runs them concurrently and every core streams weights (median of ``repeats`` after one warm-up)."""
    mats = [jnp.full((rows, 4096), 1.0 + i, jnp.float32) for i in range(n_mats)]
    x = jnp.ones((1, rows), jnp.float32)
    f = jax.jit(lambda ms, x: [x @ m for m in ms])
    jax.block_until_ready(f(mats, x))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(mats, x))
        ts.append(time.perf_counter() - t)
    return sum(m.nbytes for m in mats) / statistics.median(ts) / 1e9


def bytes_per_token(cfg: Config) -> int:
    """Weight bytes one decode step reads: every parameter, except an untied input embedding (one row is read)."""
    item = np.dtype(cfg.dtype).itemsize
    shapes = param_shapes(cfg)
    skip = {"embed"} if "lm_head" in shapes else set()
    return sum(int(np.prod(s)) * item for k, s in shapes.items() if k not in skip)
