"""Calibration: greedy continuations of the calibration prompts and the full model's KV cache over them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config
from jaxspec.decode import Decoder, prefill
from jaxspec.model import KVCache, Params
from jaxspec.sampling import Sampling


@dataclass
class Calibration:
    """Greedy continuations of the calibration prompts and the full model's KV cache over prompt + continuation."""

    prompts: list[list[int]]
    targets: np.ndarray  # (B, C) continuation tokens (0 past ``lengths``)
    lengths: np.ndarray  # (B,) continuation lengths
    cache: KVCache  # full-model keys and values at every committed position
    compile_s: float
    run_s: float

    @property
    def query_pos(self) -> np.ndarray:
        """(B, C) position of the token whose successor is continuation token j: prompt length - 1 + j."""
        P = np.asarray([len(p) for p in self.prompts])
        return (P[:, None] - 1 + np.arange(self.targets.shape[1])[None]).astype(np.int32)

    @property
    def query_tokens(self) -> np.ndarray:
        """(B, C) tokens fed at ``query_pos``: the last prompt token, then the continuation."""
        last = np.asarray([p[-1] for p in self.prompts], np.int32)[:, None]
        return np.concatenate([last, self.targets[:, :-1]], axis=1)

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.targets.shape[1])[None] < self.lengths[:, None]


def calibrate(params: Params, cfg: Config, prompts: list[list[int]], max_new: int,
              eos_ids: tuple[int, ...]) -> Calibration:
    """Greedy AR decode of all prompts in one batch; keep the continuations and the final KV cache."""
    dec = Decoder(cfg, Sampling(), eos_ids)
    state = prefill(params, dec, prompts, max_new)
    t0 = time.perf_counter()
    state = jax.block_until_ready(dec.run(params, state, jnp.int32(0)))  # compiles
    t1 = time.perf_counter()
    state = jax.block_until_ready(dec.run(params, state, jnp.int32(max_new)))
    t2 = time.perf_counter()
    n = np.asarray(state.n_out)
    out = np.where(np.arange(max_new)[None] < n[:, None], np.asarray(state.out), 0).astype(np.int32)
    return Calibration(prompts=[list(p) for p in prompts], targets=out, lengths=n, cache=state.cache,
                       compile_s=t1 - t0, run_s=t2 - t1)


def fit_prompts(prompts: Sequence[Sequence[int]], max_new: int, max_draft: int) -> list[list[int]]:
    """Keep each prompt's last tokens so prompt + new tokens + draft scratch fit one 256-slot cache: every run of a
    decoder then has the same shapes, hence one compilation."""
    cap = 256 - max_new - max_draft - 1
    if cap < 8:
        raise ValueError(f"max_new {max_new} + max_draft {max_draft} leave fewer than 8 prompt tokens in 256")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("calibration needs at least one prompt and no empty prompt")
    return [list(p[-cap:]) for p in prompts]
