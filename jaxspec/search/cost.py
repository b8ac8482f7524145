"""Cost model: draft-step and verify-pass times relative to an AR step, and the speedup it predicts for a mask."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.model import KVCache, Params, forward
from jaxspec.search.simulate import simulate

Array = jax.Array


@dataclass
class CostModel:
    """Step times relative to one AR decode step (= 1).

    A draft step costs ``base + attn * kept attention + mlp * kept MLP sublayers``; a verify pass of ``K`` drafts
    (a chunk of K + 1 tokens: the decode loop always verifies ``max_draft + 1`` positions) costs ``verify[K]``.
    """

    base: float
    attn: float
    mlp: float
    verify: dict[int, float]
    ar_step_s: float
    compile_s: float = 0.0
    raw_s: dict[str, float] = field(default_factory=dict)

    def draft(self, mask: SkipMask, n_layers: int) -> float:
        return self.base + self.attn * (n_layers - len(mask.attn)) + self.mlp * (n_layers - len(mask.mlp))


def measure_costs(params: Params, cfg: Config, cache_len: int, context: int, drafts: Sequence[int],
                  repeats: int = 15) -> CostModel:
    """Time a draft step (full / all attention skipped / all MLP skipped) and verify chunks, interleaved.

    Each function is compiled once with a ``cache_len`` cache filled to ``context``; then ``repeats`` rounds time
    every function once each (so noise from other processes hits them alike), and medians are kept.
    """
    L = cfg.n_layers

    def draft_fn(skip: SkipMask) -> Callable[..., Any]:
        def f(p: Params, tok: Array, cache: KVCache) -> tuple[Array, Array]:
            logits = forward(p, cfg, tok, cache, skip)[0][:, -1]
            return jnp.argmax(logits, -1), jnp.max(jax.nn.softmax(logits, -1), -1)
        return jax.jit(f)

    def verify_fn(p: Params, tok: Array, cache: KVCache) -> Array:
        return jnp.argmax(forward(p, cfg, tok, cache)[0], -1)

    cache = KVCache.create(cfg, 1, cache_len).replace(lengths=jnp.asarray([context], jnp.int32))
    jobs = {"full": (draft_fn(SkipMask()), 1), "no_attn": (draft_fn(SkipMask(attn=tuple(range(L)))), 1),
            "no_mlp": (draft_fn(SkipMask(mlp=tuple(range(L)))), 1)}
    jobs.update({f"verify{k}": (jax.jit(verify_fn), k + 1) for k in sorted(set(drafts))})
    t0 = time.perf_counter()
    compiled = {}
    for name, (fn, T) in jobs.items():
        args = (params, jnp.zeros((1, T), jnp.int32), cache)
        compiled[name] = (fn.lower(*args).compile(), args)
        jax.block_until_ready(compiled[name][0](*args))  # first run: lazy initialisation, not timed
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (fn, args) in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(v)) for name, v in times.items()}
    full = med["full"]
    attn = max(full - med["no_attn"], 0.0) / L / full
    mlp_ = max(full - med["no_mlp"], 0.0) / L / full
    return CostModel(base=max(1.0 - L * (attn + mlp_), 0.0), attn=attn, mlp=mlp_,
                     verify={k: med[f"verify{k}"] / full for k in sorted(set(drafts))}, ar_step_s=full,
                     compile_s=compile_s, raw_s=med)


@dataclass
class Prediction:
    speedup: float
    max_draft: int
    theta: float
    acceptance: float  # accepted / drafted
    tokens_per_cycle: float
    draft_cost: float  # one draft step, in AR steps


def predict(agree: np.ndarray, conf: np.ndarray, lengths: np.ndarray, mask: SkipMask, cost: CostModel,
            n_layers: int, drafts: Sequence[int], thetas: Sequence[float]) -> Prediction:
    """Best predicted speedup over ``max_draft`` in ``drafts`` and initial θ in ``thetas`` for one mask.

    Speedup = AR time / SSD time summed over the prompts (what aggregate tokens/s compares): AR spends one step
    per token, SSD per cycle its draft steps times the draft cost plus one verify pass.
    """
    d = cost.draft(mask, n_layers)
    nt = len(thetas)
    A, F, Ls = np.tile(agree, (nt, 1)), np.tile(conf, (nt, 1)), np.tile(lengths, nt)
    th = np.repeat(np.asarray(thetas, np.float64), len(lengths))
    best = None
    for K in drafts:
        sim = simulate(A, F, Ls, K, th)
        for j, theta in enumerate(thetas):
            sl = slice(j * len(lengths), (j + 1) * len(lengths))
            cyc, steps = sim.cycles[sl].sum(), sim.draft_steps[sl].sum()
            speed = lengths.sum() / max(steps * d + cyc * cost.verify[K], 1e-9)
            if best is None or speed > best.speedup:
                acc = sim.accepted[sl].sum() / max(sim.drafted[sl].sum(), 1)
                best = Prediction(float(speed), int(K), float(theta), float(acc), float(lengths.sum() / max(cyc, 1)),
                                  float(d))
    assert best is not None, "no max_draft values given"
    return best
