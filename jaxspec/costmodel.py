"""The speedup self-speculative decoding should give, from measured pass costs and an acceptance rate.

The one prediction formula used everywhere (Leviathan et al. 2023, eq. 1; per-token acceptance ``alpha``
treated as independent): a cycle that drafts ``k`` tokens emits on average

    E(k) = (1 - alpha^(k+1)) / (1 - alpha)            (accepted drafts + the full model's own token)

tokens and costs ``k * c_draft + c_verify(k+1)`` AR steps, where ``c_draft`` is one draft step's cost and
``c_verify(T)`` one T-token full-model pass's cost, both relative to one AR decode step. So

    speedup(k) = E(k) / (k * c_draft + c_verify(k+1))

and the prediction is the best ``k`` among the verify lengths measured. Host overhead and the adaptive θ rule's
early stops are not modelled: a measured end-to-end speedup below this is implementation overhead.

Depth extrapolation (``layer_costs`` / ``mask_seconds``): a pass costs ``fixed + Σ kept attention + Σ kept MLP``
(embedding, head and loop in ``fixed``; every layer alike), so passes timed on an ``n``-layer truncation of a
model scale to its full depth and to any skip mask.

Measured per component (``measure_costs``, what the skip search predicts with): a draft step at each precision of
``draft_model.PRECISIONS`` split into ``LayerCosts`` (no head), plus the draft head at each width, plus verify passes
per chunk length, all relative to one AR step and timed in interleaved rounds so machine noise hits them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.draft_model import FULL, DraftSpec, draft_head, draft_hidden, with_draft
from jaxspec.model import KVCache, Params, forward

Array = jax.Array


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens one cycle of ``k`` drafts emits at per-token acceptance ``alpha``."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, c_draft: float, c_verify: dict[int, float]) -> tuple[float, int]:
    """(best speedup over AR, its draft length k) for verify costs ``{T: cost}`` (T = k + 1 >= 2), all costs in
    AR-step units."""
    best = max((expected_tokens(alpha, t - 1) / ((t - 1) * c_draft + c), t - 1) for t, c in c_verify.items() if t >= 2)
    return best


@dataclass(frozen=True)
class LayerCosts:
    """Seconds of one pass split as ``fixed`` + per-layer ``attn`` + per-layer ``mlp``."""

    fixed: float
    attn: float
    mlp: float

    @classmethod
    def from_passes(cls, full: float, no_layers: float, attn_only: float, n_layers: int) -> LayerCosts:
        """From passes timed on ``n_layers`` layers: the full pass, every sublayer skipped, every MLP skipped."""
        attn = (attn_only - no_layers) / n_layers
        return cls(fixed=no_layers, attn=attn, mlp=(full - no_layers) / n_layers - attn)

    def seconds(self, n_layers: int, mask: SkipMask = SkipMask()) -> float:
        """A pass of an ``n_layers`` model whose draft skips ``mask``."""
        return self.fixed + (n_layers - len(mask.attn)) * self.attn + (n_layers - len(mask.mlp)) * self.mlp


@dataclass
class CostModel:
    """Per-component step costs relative to one AR decode step (= 1).

    A draft step at precision ``p`` with head width ``w`` skipping ``mask`` costs
    ``layers[p].seconds(L, mask) + head[p][w]``; a verify pass of ``K`` drafts (``K + 1`` tokens: the decode loop
    verifies ``max_draft + 1`` positions) costs ``verify[K]``.
    """

    layers: dict[str, LayerCosts]  # per precision; the head excluded (in AR steps despite the field names)
    head: dict[str, dict[int, float]]  # precision -> head width (0: whole vocabulary) -> cost
    verify: dict[int, float]
    ar_step_s: float
    compile_s: float = 0.0
    raw_s: dict[str, float] = field(default_factory=dict)

    def draft(self, mask: SkipMask, n_layers: int, spec: DraftSpec = FULL) -> float:
        return self.layers[spec.precision].seconds(n_layers, mask) + self.head[spec.precision][spec.head]

    def to_json(self) -> dict[str, Any]:
        r = lambda v: round(float(v), 5)  # noqa: E731
        return {"ar_step_s": r(self.ar_step_s), "compile_s": round(self.compile_s, 1),
                "layers": {p: {"fixed": r(c.fixed), "attn": r(c.attn), "mlp": r(c.mlp)}
                           for p, c in self.layers.items()},
                "head": {p: {str(w): r(v) for w, v in h.items()} for p, h in self.head.items()},
                "verify": {str(k): r(v) for k, v in self.verify.items()},
                "raw_s": {k: r(v) for k, v in self.raw_s.items()}}


def measure_costs(params: Params, cfg: Config, cache_len: int, context: int, drafts: Sequence[int],
                  precisions: Sequence[str] = ("float32",), heads: Sequence[int] = (0,),
                  ranking: np.ndarray | None = None, repeats: int = 15) -> CostModel:
    """Time every component in interleaved rounds: an AR step, the draft's layers at each precision (all kept, only
    attention kept, none kept: ``LayerCosts.from_passes``), its head at each precision and width, verify chunks.

    Each function is compiled once with a ``cache_len`` cache filled to ``context``; then ``repeats`` rounds time
    every function once each (so noise from other processes hits them alike), and medians are kept.
    """
    L = cfg.n_layers
    cache = KVCache.create(cfg, 1, cache_len).replace(lengths=jnp.asarray([context], jnp.int32))
    tok1 = jnp.zeros((1, 1), jnp.int32)
    x1 = jnp.zeros((1, 1, cfg.dim), jnp.float32)

    def verify_fn(p: Params, tok: Array, cache: KVCache) -> Array:
        return jnp.argmax(forward(p, cfg, tok, cache)[0], -1)

    jobs: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {"ar": (jax.jit(verify_fn), (params, tok1, cache))}
    masks = {"full": SkipMask(), "attn_only": SkipMask(mlp=tuple(range(L))),
             "none": SkipMask(attn=tuple(range(L)), mlp=tuple(range(L)))}
    for prec in precisions:
        for w in heads:
            spec = DraftSpec(prec, w)
            p = with_draft(params, cfg, spec, ranking)
            if w == heads[0]:
                for name, m in masks.items():
                    fn = jax.jit(lambda p, t, c, m=m, spec=spec: draft_hidden(p, cfg, t, c, m, spec)[0])
                    jobs[f"{prec}/{name}"] = (fn, (p, tok1, cache))

            def head_fn(p: Params, x: Array, spec: DraftSpec = spec) -> tuple[Array, Array]:
                logits = draft_head(p, cfg, x, spec)[:, -1]
                return jnp.argmax(logits, -1), jnp.max(jax.nn.softmax(logits, -1), -1)
            jobs[f"{prec}/head{w}"] = (jax.jit(head_fn), (p, x1))
    jobs.update({f"verify{k}": (jax.jit(verify_fn), (params, jnp.zeros((1, k + 1), jnp.int32), cache))
                 for k in sorted(set(drafts))})
    t0 = time.perf_counter()
    compiled = {}
    for name, (fn, args) in jobs.items():
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
    ar = med["ar"]
    layers = {}
    for prec in precisions:
        lc = LayerCosts.from_passes(med[f"{prec}/full"], med[f"{prec}/none"], med[f"{prec}/attn_only"], L)
        layers[prec] = LayerCosts(max(lc.fixed, 0.0) / ar, max(lc.attn, 0.0) / ar, max(lc.mlp, 0.0) / ar)
    return CostModel(layers=layers, head={p: {w: med[f"{p}/head{w}"] / ar for w in heads} for p in precisions},
                     verify={k: med[f"verify{k}"] / ar for k in sorted(set(drafts))}, ar_step_s=ar,
                     compile_s=compile_s, raw_s=med)
