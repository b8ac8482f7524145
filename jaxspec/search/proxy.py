"""The proxy: per-position draft agreement and confidence under any skip mask, from one compilation per draft
precision; every head width is read off one pass (a narrow head's logits are the full head's at its columns)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.draft_model import DraftLayer, DraftSpec, qdot, with_draft
from jaxspec.model import KVCache, Layer, Params, logits_of, mlp, rms_norm, rope
from jaxspec.search.calibrate import Calibration

Array = jax.Array


def _qkv(layer: Layer | DraftLayer, x: Array, pos: Array, cfg: Config) -> tuple[Array, Array, Array]:
    """Roped queries (B, C, heads, hd), roped keys and values (B, C, kv_heads, hd) of the full or draft layer."""
    B, C, _ = x.shape
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if isinstance(layer, DraftLayer):
        qkv = qdot(x, layer.qkv)
        q, k, v = (qkv[..., : h * hd].reshape(B, C, h, hd), qkv[..., h * hd: (h + kv) * hd].reshape(B, C, kv, hd),
                   qkv[..., (h + kv) * hd:].reshape(B, C, kv, hd))
    else:
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w) for w in (layer.wq, layer.wk, layer.wv))
    return rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta), v


def _attend(layer: Layer | DraftLayer, x: Array, k_ctx: Array, v_ctx: Array, pos: Array, cfg: Config) -> Array:
    """Attention of queries at ``pos`` (B, C) to the full model's keys at positions < pos, plus their own key."""
    B, C, _ = x.shape
    kv, g, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    q, k, v = _qkv(layer, x, pos, cfg)
    q = q.reshape(B, C, kv, g, hd)
    s_ctx = jnp.einsum("bckgd,bskd->bckgs", q, k_ctx, preferred_element_type=jnp.float32) / math.sqrt(hd)
    before = jnp.arange(k_ctx.shape[1])[None, None, :] < pos[:, :, None]  # (B, C, S)
    s_ctx = jnp.where(before[:, :, None, None], s_ctx, jnp.finfo(jnp.float32).min)
    s_self = jnp.einsum("bckgd,bckd->bckg", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    top = jnp.maximum(s_ctx.max(-1), s_self)
    e_ctx, e_self = jnp.exp(s_ctx - top[..., None]), jnp.exp(s_self - top)
    out = jnp.einsum("bckgs,bskd->bckgd", e_ctx.astype(v_ctx.dtype), v_ctx) + e_self[..., None] * v[:, :, :, None]
    out = (out / (e_ctx.sum(-1) + e_self)[..., None]).astype(x.dtype).reshape(B, C, cfg.n_heads, hd)
    if isinstance(layer, DraftLayer):
        return qdot(out.reshape(B, C, -1), layer.wo)
    return jnp.einsum("bthk,hkd->btd", out, layer.wo)


def _mlp(layer: Layer | DraftLayer, x: Array) -> Array:
    if isinstance(layer, DraftLayer):
        gate, up = jnp.split(qdot(x, layer.gate_up), 2, axis=-1)
        return qdot(jax.nn.silu(gate) * up, layer.down)
    return mlp(layer, x)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _proxy(params: Params, cfg: Config, every: int, tokens: Array, pos: Array, cache: KVCache, targets: Array,
           heads: Array, gates: Array, start: Array, x0: Array) -> tuple[Array, Array, Array]:
    """Draft top-1 == target and draft top-1 probability at every query position, for ``gates`` (2, L) bool keep,
    one row per head in ``heads`` (H, vocab) bool (the token ids each head width covers): (H, B, C) each.

    Layers before ``start`` are not computed: ``x0`` is the residual entering layer ``start`` (from an earlier mask
    that agrees on those layers). Also returns the residual entering every ``every``-th layer, for such reuse.
    """
    x = jnp.where(start == 0, params.embed[tokens].astype(x0.dtype), x0)
    saved = []
    draft = params.draft
    layers = params.layers if draft is None or draft.layers is None else draft.layers
    for i, layer in enumerate(layers):
        if i % every == 0:
            saved.append(x)

        def attn_res(x: Array, i: int = i, layer: Layer | DraftLayer = layer) -> Array:
            h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
            return x + _attend(layer, h, cache.k[i], cache.v[i], pos, cfg)

        def mlp_res(x: Array, layer: Layer | DraftLayer = layer) -> Array:
            return x + _mlp(layer, rms_norm(x, layer.mlp_norm, cfg.norm_eps))

        x = jax.lax.cond(gates[0, i] & (i >= start), attn_res, lambda x: x, x)  # on CPU only the taken branch runs
        x = jax.lax.cond(gates[1, i] & (i >= start), mlp_res, lambda x: x, x)
    xn = rms_norm(x, params.norm, cfg.norm_eps)
    logits = logits_of(params, xn) if draft is None or draft.head is None else qdot(xn, draft.head)

    def one(allowed: Array) -> tuple[Array, Array]:
        lg = jnp.where(allowed, logits, -jnp.inf)
        top = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        return top == targets, 1.0 / jnp.sum(jnp.exp(lg - lg.max(-1, keepdims=True)), axis=-1)

    agree, conf = jax.lax.map(one, heads)
    return agree, conf, jnp.stack(saved)


def _rows(cache: KVCache, idx: np.ndarray) -> KVCache:
    """Rows ``idx`` of ``cache`` (its batch axis is 1 in K and V)."""
    return KVCache(k=cache.k[:, idx], v=cache.v[:, idx], lengths=cache.lengths[idx])


class Proxy:
    """Evaluates masks on a ``Calibration`` with one compiled function, ``rows`` prompts per call, for a draft at
    ``precision`` (its copy made here, as ``draft_model.with_draft`` makes it) and each width in ``heads`` (0: the
    whole vocabulary; else the first ``w`` ids of ``ranking``, or of token id order without one).

    The residual streams entering every ``every``-th layer of the last ``keep`` masks are kept: a mask that agrees
    with one of them on the first layers starts from there (GP candidates are mostly small edits of good masks).
    """

    def __init__(self, params: Params, cfg: Config, calib: Calibration, rows: int = 8, keep: int = 16,
                 precision: str = "float32", heads: tuple[int, ...] = (0,), ranking: np.ndarray | None = None) -> None:
        self.cfg, self.calib, self.keep, self.heads = cfg, calib, keep, heads
        if precision != "float32":
            params = with_draft(params, cfg, DraftSpec(precision), ranking)
        order = np.arange(cfg.vocab_size) if ranking is None else np.asarray(ranking)
        allowed = np.zeros((len(heads), cfg.vocab_size), bool)
        for j, w in enumerate(heads):
            allowed[j, order[: w or cfg.vocab_size]] = True
        self.allowed = jnp.asarray(allowed)
        self.every = max(1, cfg.n_layers // 6)
        self.compile_s, self.eval_s, self.calls, self.layers_run = 0.0, 0.0, 0, 0
        B, rows = len(calib.prompts), min(rows, len(calib.prompts))
        toks, pos, tgt = calib.query_tokens, calib.query_pos, calib.targets
        self.chunks = []
        for s in range(0, B, rows):
            idx = np.arange(s, s + rows) % B  # the last chunk wraps around: one shape, one compilation
            self.chunks.append((min(rows, B - s), (params, jnp.asarray(toks[idx]), jnp.asarray(pos[idx]),
                                                   _rows(calib.cache, idx),
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
        """(agree, conf), each (H, B, C) for the H head widths: the draft's top-1 equals the target; the draft's
        top-1 probability."""
        L = self.cfg.n_layers
        keep = np.ones((2, L), bool)
        keep[0, list(mask.attn)] = False
        keep[1, list(mask.mlp)] = False
        start, src = self._resume(keep)
        g = jnp.asarray(keep)
        zero = jnp.zeros(self.chunks[0][1][1].shape + (self.cfg.dim,), jnp.float32)
        if self._fn is None:
            t0 = time.perf_counter()
            p, *rest = self.chunks[0][1]
            self._fn = _proxy.lower(p, self.cfg, self.every, *rest, self.allowed, g, jnp.int32(0), zero).compile()
            self.compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        agree, conf, saved = [], [], []
        j = start // self.every
        for c, (n, args) in enumerate(self.chunks):
            a, f, s = self._fn(*args, self.allowed, g, jnp.int32(start), zero if src is None else src[c][j])
            agree.append(np.asarray(a)[:, :n])
            conf.append(np.asarray(f)[:, :n])
            saved.append(s if src is None else jnp.concatenate([src[c][: j + 1], s[j + 1:]]))
        self.saved[keep.tobytes()] = (keep, saved)
        if len(self.saved) > self.keep:
            self.saved.pop(next(iter(self.saved)))
        self.eval_s += time.perf_counter() - t0
        self.calls += 1
        self.layers_run += L - start
        valid = self.calib.valid
        return np.concatenate(agree, axis=1) & valid, np.where(valid, np.concatenate(conf, axis=1), 0.0)
