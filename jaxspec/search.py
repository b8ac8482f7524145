"""Skip-mask search: Bayesian optimization (scikit-optimize, Gaussian process) of which sublayers the draft skips.

**Objective** (what users feel): end-to-end greedy SSD decode tokens/s on the calibration prompts, on this device,
with the adaptive threshold on, relative to autoregressive decoding measured in the same run. Compiling the decode
loop for one mask takes tens of seconds, so the GP optimizes a *proxy* of that objective that needs no compilation
per mask, and only the best few candidates are compiled and timed for real:

1. ``calibrate``: greedy AR continuations of the calibration prompts (one batched run) give the targets, and the
   final KV cache holds the full model's keys and values at every committed position.
2. ``Proxy``: one jitted function, with the mask as traced ``lax.cond`` gates, computes for every continuation
   position the draft's top-1 token and top-1 probability given the *full model's* KV for the context — exactly
   what the draft sees for its first token of a cycle (later drafts of a cycle see their own KV; ignored).
3. ``simulate``: replay the draft policy (stop below θ, at ``max_draft`` or at the budget; the adaptive θ rule)
   over those per-position agreements and confidences: drafts, accepted tokens and draft steps per cycle.
4. ``CostModel``: a draft step's time is linear in the sublayers kept (timed once: full step, all attention
   skipped, all MLP skipped) and a verify pass's time is timed per chunk length, all relative to an AR step and
   interleaved so machine noise hits them alike. Predicted speedup = AR step time × tokens / cycle time.
5. ``measure``: the top candidates are compiled and timed end to end against AR (warm-up excluded, interleaved
   repeats, medians) and the profile records those real numbers.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.decode import Decoder, Result, generate, prefill
from jaxspec.model import KVCache, Layer, Params, forward, logits_of, mlp, rms_norm, rope
from jaxspec.profile import ADOPT_MARGIN, PRESETS, Profile, adopt, model_id
from jaxspec.sampling import Sampling
from jaxspec.speculative import SpecDecoder

Array = jax.Array
OBJECTIVE = ("end-to-end greedy SSD decode tokens/s over AR decode tokens/s (prefill and compilation excluded), "
             "batch 1, adaptive threshold on, on the calibration prompts, on this device; each decoder warmed up "
             "once, then {repeats} interleaved repeats over the prompts; speedup = median over repeats of "
             "(AR decode time / SSD decode time), tokens/s = median over repeats")


# ---- masks as points -------------------------------------------------------------------------------------------

def mask_to_x(mask: SkipMask, n_layers: int) -> list[int]:
    """One binary coordinate per sublayer: attention 0..L-1, then MLP 0..L-1 (1 = skipped)."""
    return [int(i in mask.attn) for i in range(n_layers)] + [int(i in mask.mlp) for i in range(n_layers)]


def x_to_mask(x: Sequence[int]) -> SkipMask:
    n = len(x) // 2
    return SkipMask(attn=tuple(i for i in range(n) if x[i]), mlp=tuple(i for i in range(n) if x[n + i]))


def starting_points(n_layers: int) -> dict[str, SkipMask]:
    """No skipping; every other middle layer (attention + MLP, or attention only); the paper's masks that fit."""
    middle = tuple(range(2, n_layers - 2))[1::2] if n_layers > 4 else tuple(range(1, n_layers))[::2]
    starts = {"none": SkipMask(), "every-other-middle": SkipMask(attn=middle, mlp=middle),
              "every-other-middle-attn": SkipMask(attn=middle)}
    starts.update({f"preset:{k}": m for k, (n, m) in PRESETS.items() if n == n_layers})
    return starts


# ---- calibration: targets and the full model's KV ------------------------------------------------------------

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


# ---- the proxy: per-position draft agreement and confidence under any mask, one compilation --------------------

def _attend(layer: Layer, x: Array, k_ctx: Array, v_ctx: Array, pos: Array, cfg: Config) -> Array:
    """Attention of queries at ``pos`` (B, C) to the full model's keys at positions < pos, plus their own key."""
    B, C, _ = x.shape
    kv, g, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    q = rope(jnp.einsum("btd,dhk->bthk", x, layer.wq), pos, cfg.rope_theta).reshape(B, C, kv, g, hd)
    k = rope(jnp.einsum("btd,dhk->bthk", x, layer.wk), pos, cfg.rope_theta)
    v = jnp.einsum("btd,dhk->bthk", x, layer.wv)
    s_ctx = jnp.einsum("bckgd,bskd->bckgs", q, k_ctx, preferred_element_type=jnp.float32) / math.sqrt(hd)
    before = jnp.arange(k_ctx.shape[1])[None, None, :] < pos[:, :, None]  # (B, C, S)
    s_ctx = jnp.where(before[:, :, None, None], s_ctx, jnp.finfo(jnp.float32).min)
    s_self = jnp.einsum("bckgd,bckd->bckg", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    top = jnp.maximum(s_ctx.max(-1), s_self)
    e_ctx, e_self = jnp.exp(s_ctx - top[..., None]), jnp.exp(s_self - top)
    out = jnp.einsum("bckgs,bskd->bckgd", e_ctx.astype(v_ctx.dtype), v_ctx) + e_self[..., None] * v[:, :, :, None]
    out = (out / (e_ctx.sum(-1) + e_self)[..., None]).astype(x.dtype).reshape(B, C, cfg.n_heads, hd)
    return jnp.einsum("bthk,hkd->btd", out, layer.wo)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _proxy(params: Params, cfg: Config, every: int, tokens: Array, pos: Array, cache: KVCache, targets: Array,
           gates: Array, start: Array, x0: Array) -> tuple[Array, Array, Array]:
    """Draft top-1 == target and draft top-1 probability at every query position, for ``gates`` (2, L) bool keep.

    Layers before ``start`` are not computed: ``x0`` is the residual entering layer ``start`` (from an earlier mask
    that agrees on those layers). Also returns the residual entering every ``every``-th layer, for such reuse.
    """
    x = jnp.where(start == 0, params.embed[tokens], x0)
    saved = []
    for i, layer in enumerate(params.layers):
        if i % every == 0:
            saved.append(x)

        def attn_res(x: Array, i: int = i, layer: Layer = layer) -> Array:
            h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
            return x + _attend(layer, h, cache.k[i], cache.v[i], pos, cfg)

        def mlp_res(x: Array, layer: Layer = layer) -> Array:
            return x + mlp(layer, rms_norm(x, layer.mlp_norm, cfg.norm_eps))

        x = jax.lax.cond(gates[0, i] & (i >= start), attn_res, lambda x: x, x)  # on CPU only the taken branch runs
        x = jax.lax.cond(gates[1, i] & (i >= start), mlp_res, lambda x: x, x)
    logits = logits_of(params, rms_norm(x, params.norm, cfg.norm_eps))
    top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    conf = 1.0 / jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), axis=-1)
    return top == targets, conf, jnp.stack(saved)


class Proxy:
    """Evaluates masks on a ``Calibration`` with one compiled function, ``rows`` prompts per call.

    The residual streams entering every ``every``-th layer of the last ``keep`` masks are kept: a mask that agrees
    with one of them on the first layers starts from there (GP candidates are mostly small edits of good masks).
    """

    def __init__(self, params: Params, cfg: Config, calib: Calibration, rows: int = 8, keep: int = 16) -> None:
        self.cfg, self.calib, self.keep = cfg, calib, keep
        self.every = max(1, cfg.n_layers // 6)
        self.compile_s, self.eval_s, self.calls, self.layers_run = 0.0, 0.0, 0, 0
        B, rows = len(calib.prompts), min(rows, len(calib.prompts))
        toks, pos, tgt = calib.query_tokens, calib.query_pos, calib.targets
        self.chunks = []
        for s in range(0, B, rows):
            idx = np.arange(s, s + rows) % B  # the last chunk wraps around: one shape, one compilation
            self.chunks.append((min(rows, B - s), (params, jnp.asarray(toks[idx]), jnp.asarray(pos[idx]),
                                                   jax.tree.map(lambda a, idx=idx: a[idx], calib.cache),
                                                   jnp.asarray(tgt[idx]))))
        self.saved: dict[bytes, tuple[np.ndarray, list[Array]]] = {}  # gates → per-chunk saved residuals
        self._fn: Callable[..., tuple[Array, Array, Array]] | None = None

    def _resume(self, keep: np.ndarray) -> tuple[int, list[Array] | None]:
        """The latest saved layer to start from, and the saved residuals it comes from."""
        best, src = 0, None
        for g, res in self.saved.values():
            diff = np.flatnonzero((g != keep).any(axis=0))
            first = int(diff[0]) if diff.size else self.cfg.n_layers
            start = min(first // self.every, (self.cfg.n_layers - 1) // self.every) * self.every
            if start > best:
                best, src = start, res
        return best, src

    def __call__(self, mask: SkipMask) -> tuple[np.ndarray, np.ndarray]:
        """(agree, conf), each (B, C): the draft's top-1 equals the target; the draft's top-1 probability."""
        L = self.cfg.n_layers
        keep = np.ones((2, L), bool)
        keep[0, list(mask.attn)] = False
        keep[1, list(mask.mlp)] = False
        start, src = self._resume(keep)
        g = jnp.asarray(keep)
        zero = jnp.zeros(self.chunks[0][1][1].shape + (self.cfg.dim,), self.cfg.dtype)
        if self._fn is None:
            t0 = time.perf_counter()
            p, *rest = self.chunks[0][1]
            self._fn = _proxy.lower(p, self.cfg, self.every, *rest, g, jnp.int32(0), zero).compile()
            self.compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        agree, conf, saved = [], [], []
        j = start // self.every
        for c, (n, args) in enumerate(self.chunks):
            a, f, s = self._fn(*args, g, jnp.int32(start), zero if src is None else src[c][j])
            agree.append(np.asarray(a)[:n])
            conf.append(np.asarray(f)[:n])
            saved.append(s if src is None else jnp.concatenate([src[c][: j + 1], s[j + 1:]]))
        self.saved[keep.tobytes()] = (keep, saved)
        if len(self.saved) > self.keep:
            self.saved.pop(next(iter(self.saved)))
        self.eval_s += time.perf_counter() - t0
        self.calls += 1
        self.layers_run += L - start
        valid = self.calib.valid
        return np.concatenate(agree) & valid, np.where(valid, np.concatenate(conf), 0.0)


# ---- the draft policy, replayed over per-position agreements ---------------------------------------------------

def threshold_step(theta: np.ndarray, m: np.ndarray, n_acc: np.ndarray, n_draft: np.ndarray, max_draft: int,
                   step: float = 0.01, target: float = 0.9, alpha: float = 0.5, beta: float = 0.9
                   ) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of ``speculative.update_threshold`` (the paper's adaptive θ rule)."""
    r = n_acc / np.maximum(n_draft, 1)
    m_new = alpha * m + (1 - alpha) * r
    goal = np.where(m_new < target, theta + step, np.where(n_draft >= max_draft, theta, theta - step))
    drafted = n_draft > 0
    return np.where(drafted, beta * theta + (1 - beta) * goal, theta), np.where(drafted, m_new, m)


@dataclass
class Sim:
    """Per-row totals of a replayed SSD run."""

    cycles: np.ndarray
    draft_steps: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray


def simulate(agree: np.ndarray, conf: np.ndarray, lengths: np.ndarray, max_draft: int, theta: float | np.ndarray,
             adaptive: bool = True) -> Sim:
    """Replay ``SpecDecoder``'s greedy cycles over teacher-forced draft agreements/confidences (B, C).

    Drafting stops after a token whose confidence is below θ, at ``max_draft``, or one token before the row's
    budget (then the loop still runs one idle step, as the real loop does); the longest agreeing prefix is accepted
    plus the full model's token. A drafted token's agreement and confidence are taken from the position it would
    fill, as if every earlier draft had been right (only the accepted prefix counts, so that is exact for it).
    """
    B, C = agree.shape
    K = max_draft
    A = np.concatenate([agree, np.zeros((B, K), bool)], axis=1)
    F = np.concatenate([conf, np.zeros((B, K))], axis=1)
    rows, ks = np.arange(B)[:, None], np.arange(K)[None]
    p = np.zeros(B, np.int64)
    th = np.broadcast_to(np.asarray(theta, np.float64), (B,)).copy()
    m = np.zeros(B)
    sim = Sim(*(np.zeros(B, np.int64) for _ in range(4)))
    while True:
        live = p < lengths
        if not live.any():
            return sim
        idx = p[:, None] + ks
        a, c = A[rows, idx], F[rows, idx]
        run = np.cumprod(c[:, : K - 1] >= th[:, None], axis=1).sum(axis=1)  # confident drafts before the last
        cap = np.maximum(lengths - p - 1, 0)
        n_draft = np.minimum(1 + run, np.minimum(K, cap))
        idle = (n_draft == cap) & (n_draft < K) & (run >= n_draft) & (n_draft > 0)
        n_acc = np.cumprod(a & (ks < n_draft[:, None]), axis=1).sum(axis=1)
        sim.cycles += live
        sim.draft_steps += live * (n_draft + idle)
        sim.drafted += live * n_draft
        sim.accepted += live * n_acc
        if adaptive:
            th2, m2 = threshold_step(th, m, n_acc, n_draft, K)
            th, m = np.where(live, th2, th), np.where(live, m2, m)
        p = p + live * (n_acc + 1)


# ---- cost model ------------------------------------------------------------------------------------------------

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


# ---- prediction ------------------------------------------------------------------------------------------------

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


# ---- the optimizer ---------------------------------------------------------------------------------------------

def random_masks(rng: np.random.Generator, n_dims: int, n: int) -> np.ndarray:
    """``n`` random points: the number of skipped sublayers uniform in 1..n_dims/2, then which ones uniformly."""
    X = np.zeros((n, n_dims), np.int8)
    for row in X:
        row[rng.choice(n_dims, size=rng.integers(1, max(n_dims // 2, 1) + 1), replace=False)] = 1
    return X


def _neighbours(rng: np.random.Generator, X: np.ndarray, y: np.ndarray, n_random: int = 300) -> np.ndarray:
    """Acquisition candidates: every 1-flip of the 5 best points, 2–3-flips of them, and fresh random points."""
    n_dims = X.shape[1]
    best = X[np.argsort(y)[:5]]
    flips = [b ^ np.eye(n_dims, dtype=np.int8) for b in best]
    for b in best:
        for _ in range(60):
            c = b.copy()
            c[rng.choice(n_dims, size=rng.integers(2, 4), replace=False)] ^= 1
            flips.append(c[None])
    return np.unique(np.concatenate([*flips, random_masks(rng, n_dims, n_random)]), axis=0)


def optimize(objective: Callable[[np.ndarray], float], n_dims: int, budget: int, starts: Sequence[Sequence[int]],
             method: str = "gp", n_initial: int = 8, seed: int = 0, refit_every: int = 5) -> float:
    """Minimize ``objective`` over {0, 1}^n_dims in ``budget`` evaluations (starting points first); returns the
    seconds spent in the optimizer itself.

    ``gp``: after the starts and ``n_initial`` random points, a scikit-optimize Gaussian process (Matern 5/2 with
    one length scale per sublayer, Gaussian noise; hyperparameters refit every ``refit_every`` points) scores
    candidates by expected improvement (``skopt.acquisition.gaussian_ei``) and the best unevaluated one is
    evaluated next. The candidates are neighbours of the best points so far plus random sparse masks: skopt's own
    acquisition optimizer samples uniform points, which in 2^n_dims almost never land near the good, sparse masks.
    ``random``: the starts, then ``random_masks`` points.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from skopt.acquisition import gaussian_ei
    from skopt.learning import GaussianProcessRegressor
    from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    if method not in ("gp", "random"):
        raise ValueError(f"unknown search method {method!r}: gp or random")
    rng = np.random.default_rng(seed)
    X: list[np.ndarray] = []
    y: list[float] = []
    seen: set[bytes] = set()
    opt_s = 0.0
    queue = [np.asarray(s, np.int8) for s in starts]
    kernel = ConstantKernel(1.0, (0.01, 1000.0)) * Matern(np.ones(n_dims), [(0.01, 100.0)] * n_dims, nu=2.5) \
        + WhiteKernel(1e-2, (1e-6, 1e1))
    while len(y) < budget:
        t0 = time.perf_counter()
        if queue:
            x = queue.pop(0)
        elif method == "random" or len(y) < len(starts) + n_initial:
            x = random_masks(rng, n_dims, 1)[0]
        else:
            refit = (len(y) - len(starts) - n_initial) % refit_every == 0
            gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, noise="gaussian", n_restarts_optimizer=0,
                                          optimizer="fmin_l_bfgs_b" if refit else None, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gp.fit(np.asarray(X, float), np.asarray(y))
            if refit:  # keep the fitted hyperparameters, noise included, for the next fits
                kernel = gp.kernel_.k1 + WhiteKernel(max(gp.noise_ or 0.0, 1e-6), (1e-6, 1e1))
            cands = _neighbours(rng, np.asarray(X), np.asarray(y))
            cands = cands[[c.tobytes() not in seen for c in cands]]
            ei = gaussian_ei(cands.astype(float), gp, y_opt=float(np.min(y)))
            x = cands[int(np.argmax(ei))]
        opt_s += time.perf_counter() - t0
        if x.tobytes() in seen:
            continue
        seen.add(x.tobytes())
        X.append(x)
        y.append(objective(x))
    return opt_s


# ---- real end-to-end timings -----------------------------------------------------------------------------------

@dataclass
class Candidate:
    label: str
    mask: SkipMask
    max_draft: int = 12
    theta: float = 0.6
    predicted: float | None = None  # the proxy's speedup


@dataclass
class Timing:
    """Real end-to-end numbers of one candidate against AR, from ``measure``."""

    label: str
    mask: SkipMask
    max_draft: int
    theta: float
    predicted: float | None
    tokens_per_s: float  # median over repeats
    speedup: float  # median over repeats of SSD tokens/s over AR tokens/s in the same repeat
    speedups: list[float]
    acceptance_rate: float
    mean_accepted: float  # accepted drafts per verify pass
    compile_s: float  # decode-loop compilation (generate's compile_s)
    warmup_s: float  # the whole warm-up run, compilation included (excluded from the figures)
    lossless: bool  # greedy SSD produced exactly AR's tokens

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "mask"}
        d = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
        return {"mask": self.mask.to_json(), **d, "speedups": [round(s, 4) for s in self.speedups]}


def robust_speedup(ar_tps: Sequence[float], ssd_tps: Sequence[float]) -> float:
    """Median over repeats of the per-repeat ratio (SSD and AR of one repeat ran interleaved, under like noise)."""
    return float(np.median(np.asarray(ssd_tps) / np.asarray(ar_tps)))


def measure(params: Params, cfg: Config, prompts: list[list[int]], max_new: int, eos_ids: tuple[int, ...],
            candidates: Sequence[Candidate], repeats: int = 3,
            run: Callable[..., Result] = generate) -> list[Timing]:
    """Time AR and every candidate end to end on ``prompts`` (batch 1, greedy, adaptive θ): one ``Timing`` for AR
    (label ``ar``, speedup 1 by definition) followed by one per candidate.

    Noise handling: each decoder first runs once on the first prompt (compilation and first-run initialisation;
    excluded). Then ``repeats`` rounds each run every prompt with every decoder back to back, in an order rotated
    per prompt and round; a round's tokens/s is its tokens over its decode seconds (prefill and compilation
    excluded), and a speedup is the median over rounds of SSD tokens/s / AR tokens/s within the round.
    """
    sampling = Sampling()
    cands = [Candidate("ar", SkipMask(), 0, 0.0), *candidates]
    decs: list[tuple[Decoder, dict[str, float]]] = [(Decoder(cfg, sampling, eos_ids), {})]
    decs += [(SpecDecoder(cfg, sampling, eos_ids, skip=c.mask, max_draft=c.max_draft, adaptive=True),
              {"theta": c.theta}) for c in candidates]
    n = len(decs)
    warm = [run(d, params, [prompts[0]], max_new, **kw) for d, kw in decs]
    secs, toks = np.zeros((n, repeats)), np.zeros((n, repeats))
    counts = np.zeros((n, 3))  # drafted, accepted, verify calls (first round)
    outputs: list[list[list[int]]] = [[[] for _ in prompts] for _ in range(n)]
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            for j in np.roll(np.arange(n), -(i + r)):
                d, kw = decs[j]
                res = run(d, params, [prompt], max_new, **kw)
                secs[j, r] += res.decode_s
                toks[j, r] += res.new_tokens
                if r == 0:
                    outputs[j][i] = res.tokens[0]
                    if j:
                        s = res.stats.summary()
                        counts[j] += [s["drafted"], s["accepted"], s["verify_calls"]]
    tps = toks / np.maximum(secs, 1e-9)
    out = []
    for j, c in enumerate(cands):
        drafted, accepted, calls = counts[j]
        out.append(Timing(c.label, c.mask, c.max_draft, c.theta, c.predicted, float(np.median(tps[j])),
                          robust_speedup(tps[0], tps[j]), (tps[j] / tps[0]).tolist(),
                          float(accepted / drafted) if drafted else 0.0, float(accepted / calls) if calls else 0.0,
                          warm[j].compile_s, warm[j].prefill_s + warm[j].compile_s + warm[j].decode_s,
                          outputs[j] == outputs[0]))
    return out


# ---- the search ------------------------------------------------------------------------------------------------

@dataclass
class SearchOptions:
    budget: int = 60  # proxy evaluations (masks scored)
    method: str = "gp"  # or "random"
    max_new: int = 48  # new tokens per calibration prompt (targets and real timings)
    drafts: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)  # max_draft values the proxy chooses from, per mask
    thetas: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # initial θ values the proxy chooses from
    n_initial: int = 8  # random points before the GP takes over
    top: int = 3  # best distinct masks (by the proxy) timed end to end
    real_prompts: int = 6  # calibration prompts timed end to end (the first ones)
    repeats: int = 3  # interleaved rounds of real timing
    margin: float = ADOPT_MARGIN  # SSD is used only if its lowest per-round speedup is at least 1 + margin
    seed: int = 0
    bench: bool = False  # also: random search at the same budget, and the starting points timed for real


def fit_prompts(prompts: Sequence[Sequence[int]], max_new: int, max_draft: int) -> list[list[int]]:
    """Keep each prompt's last tokens so prompt + new tokens + draft scratch fit one 256-slot cache: every run of a
    decoder then has the same shapes, hence one compilation."""
    cap = 256 - max_new - max_draft - 1
    if cap < 8:
        raise ValueError(f"max_new {max_new} + max_draft {max_draft} leave fewer than 8 prompt tokens in 256")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("calibration needs at least one prompt and no empty prompt")
    return [list(p[-cap:]) for p in prompts]


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if
                line.startswith("model name")), platform.processor() or platform.machine())
    return {"platform": dev.platform, "kind": dev.device_kind, "cpu": cpu, "cores": os.cpu_count()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


@dataclass
class SearchResult:
    profile: Profile
    trace: list[dict[str, Any]]
    timings: list[Timing]
    report: dict[str, Any]


def search(params: Params, cfg: Config, prompts: Sequence[Sequence[int]], eos_ids: tuple[int, ...],
           opts: SearchOptions | None = None, progress: bool = True, calib_name: str = "builtin") -> SearchResult:
    """Find a skip profile for ``cfg``/``params`` on this device (see the module docstring for the method)."""
    from tqdm import tqdm

    opts = opts or SearchOptions()
    if opts.budget < 1 or opts.top < 1 or opts.repeats < 1 or opts.real_prompts < 1:
        raise ValueError("budget, top, repeats and real_prompts must be >= 1")
    t_start = time.perf_counter()
    L = cfg.n_layers
    toks = fit_prompts(prompts, opts.max_new, max(opts.drafts))
    calib = calibrate(params, cfg, toks, opts.max_new, eos_ids)
    proxy = Proxy(params, cfg, calib)
    context = int(np.median([len(p) for p in toks])) + opts.max_new // 2
    cost = measure_costs(params, cfg, 256, context, opts.drafts)
    starts = starting_points(L)

    def run_search(method: str, label: str) -> tuple[list[dict[str, Any]], float]:
        trace: list[dict[str, Any]] = []
        names = {tuple(mask_to_x(m, L)): name for name, m in starts.items()}
        bar = tqdm(total=opts.budget, desc=f"{label} search", disable=not progress, leave=True)

        def objective(x: np.ndarray) -> float:
            mask = x_to_mask(x)
            agree, conf = proxy(mask)
            pred = predict(agree, conf, calib.lengths, mask, cost, L, opts.drafts, opts.thetas)
            trace.append({"i": len(trace), "source": names.get(tuple(int(v) for v in x), method),
                          **mask.to_json(), "skipped": len(mask.attn) + len(mask.mlp),
                          "predicted_speedup": round(pred.speedup, 4), "acceptance": round(pred.acceptance, 4),
                          "tokens_per_cycle": round(pred.tokens_per_cycle, 3), "max_draft": pred.max_draft,
                          "theta": pred.theta})
            bar.update(1)
            bar.set_postfix_str(f"best predicted speedup {max(t['predicted_speedup'] for t in trace):.3f}x")
            return -pred.speedup

        opt_s = optimize(objective, 2 * L, opts.budget, [mask_to_x(m, L) for m in starts.values()], method,
                         opts.n_initial, opts.seed)
        bar.close()
        return trace, opt_s

    trace, opt_s = run_search(opts.method, opts.method.upper())

    def best_of(trace: list[dict[str, Any]], k: int, label: str) -> list[Candidate]:
        ranked = sorted(trace, key=lambda t: -t["predicted_speedup"])[:k]
        return [Candidate(f"{label}#{n + 1}" if k > 1 else label, SkipMask.from_json(t), t["max_draft"], t["theta"],
                          t["predicted_speedup"]) for n, t in enumerate(ranked)]

    cands = best_of(trace, opts.top, opts.method)
    bench: dict[str, Any] = {}
    if opts.bench:
        other = "random" if opts.method == "gp" else "gp"
        t0 = time.perf_counter()
        other_trace, _ = run_search(other, other.upper())

        def top_pred(tr: list[dict[str, Any]], skipping: bool = False) -> float:
            return max((t["predicted_speedup"] for t in tr if t["skipped"] or not skipping), default=0.0)

        bench = {"other_method": other, "other_search_s": round(time.perf_counter() - t0, 1),
                 "best_predicted": top_pred(trace), "other_best_predicted": top_pred(other_trace),
                 "best_predicted_skipping": top_pred(trace, True),
                 "other_best_predicted_skipping": top_pred(other_trace, True), "other_trace": other_trace}
        cands += best_of(other_trace, 1, other) + best_of([t for t in other_trace if t["skipped"]], 1,
                                                          f"{other}-skipping")
        for name in ("none", "every-other-middle"):
            t = next(t for t in trace if t["source"] == name)
            cands.append(Candidate(name, starts[name], t["max_draft"], t["theta"], t["predicted_speedup"]))
    unique: dict[tuple[SkipMask, int, float], Candidate] = {}
    for c in cands:  # one timing per distinct decoder; labels of duplicates are joined
        key = (c.mask, c.max_draft, c.theta)
        if key in unique:
            unique[key].label += f"={c.label}"
        else:
            unique[key] = c
    t_real = time.perf_counter()
    timings = measure(params, cfg, toks[: opts.real_prompts], opts.max_new, eos_ids, list(unique.values()),
                      opts.repeats)
    real_s = time.perf_counter() - t_real
    wall_s = time.perf_counter() - t_start
    ar, ours = timings[0], timings[1: 1 + opts.top]
    best = max(ours, key=lambda t: t.speedup)
    use = adopt([1.0] * len(best.speedups), best.speedups, opts.margin) and best.lossless
    compile_s = calib.compile_s + proxy.compile_s + cost.compile_s + sum(t.compile_s for t in timings)
    warm_s = sum(t.warmup_s for t in timings)
    search_s = wall_s - (bench.get("other_search_s", 0.0) if opts.bench else 0.0)
    report = {
        "wall_s": round(wall_s, 1), "search_s": round(search_s, 1), "compile_s": round(compile_s, 1),
        "compile_share": round(compile_s / search_s, 4), "warmup_s": round(warm_s, 1),
        "compile_and_warmup_share": round((compile_s - sum(t.compile_s for t in timings) + warm_s) / search_s, 4),
        "calibrate_s": round(calib.run_s, 1), "proxy_eval_s": round(proxy.eval_s, 1),
        "proxy_per_mask_s": round(proxy.eval_s / max(proxy.calls, 1), 3), "optimizer_s": round(opt_s, 1),
        "real_timing_s": round(real_s, 1),
    }
    info = {
        "objective": OBJECTIVE.format(repeats=opts.repeats),
        "proxy": "teacher-forced draft top-1 agreement/confidence with the full model's KV as context, replayed "
                 "through the adaptive-θ draft policy, times a measured cost model (see jaxspec/search.py)",
        "device": device_info(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget": opts.budget, "method": opts.method,
        "ar_tokens_per_s": round(ar.tokens_per_s, 3), "ssd_tokens_per_s": round(best.tokens_per_s, 3),
        "speedup": round(best.speedup, 4), "predicted_speedup": best.predicted,
        "acceptance_rate": round(best.acceptance_rate, 4), "mean_accepted": round(best.mean_accepted, 3),
        "calibration": {"set": calib_name, "prompts": len(toks), "real_timing_prompts": min(opts.real_prompts,
                        len(toks)), "max_new": opts.max_new, "repeats": opts.repeats},
        "search_time": report,
        "cost_model": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in cost.__dict__.items()},
        "candidates": [t.to_json() for t in timings],
        "trace": trace,
    }
    if not use:
        info["note"] = (f"no mask beat autoregressive decoding on this device (best real speedup "
                        f"{best.speedup:.3f}x{'' if best.lossless else ', output differed from AR'}): use AR")
    if bench:
        info["bench"] = bench
    prof = Profile(mask=best.mask, threshold=best.theta, max_draft=best.max_draft, model_id=model_id(cfg),
                   use_ssd=bool(use), info=info)
    return SearchResult(prof, trace, timings, report)


def plot(profile: Profile, path: str | Path) -> str:
    """PNG of a search from its profile (predicted speedup per evaluation with the measured ones as stars;
    predicted acceptance vs skipped sublayers); returns a note. Needs matplotlib (the optional ``plot`` extra);
    without it the plot is skipped and the note says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'jaxspec[plot]')"
    info = profile.info
    traces = {info["method"]: info["trace"]}
    if "bench" in info:
        traces[info["bench"]["other_method"]] = info["bench"]["other_trace"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, tr in traces.items():
        s = [t["predicted_speedup"] for t in tr]
        ax1.plot(s, ".", alpha=0.5, label=f"{name}: predicted")
        ax1.plot(np.maximum.accumulate([v if t["skipped"] else 0.0 for v, t in zip(s, tr, strict=True)]), "-",
                 label=f"{name}: best so far, >= 1 sublayer skipped")
        ax2.plot([t["skipped"] for t in tr], [t["acceptance"] for t in tr], ".", alpha=0.6, label=name)
    for c in info["candidates"][1:]:
        idx = next((t["i"] for t in info["trace"] if SkipMask.from_json(t) == SkipMask.from_json(c["mask"])), None)
        if idx is not None:
            ax1.plot([idx], [c["speedup"]], "k*", ms=10)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xlabel="evaluation", ylabel="speedup over AR (stars: measured)", title="search")
    ax2.set(xlabel="skipped sublayers", ylabel="predicted acceptance rate", title="acceptance vs skipping")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
