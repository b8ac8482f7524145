"""Cheap self-drafts: the model's own weights at lower precision and a narrow output head, used only to draft.

``make_draft`` builds a ``DraftParams`` copy once (attention's q/k/v and the MLP's gate/up fused into one matrix
each, int8 with a float32 scale per output channel or bfloat16; the head restricted to the most frequent tokens).
``draft_forward`` runs it over the same KV cache as the full model: it writes K/V at draft positions, which verify
overwrites, so verification (full model, checkpoint precision) keeps the output exactly the model's.

XLA:CPU's one-row path of bfloat16 and int8 dots is several times slower than its multi-row path, so on CPU every
draft dot pads its rows to ``DraftSpec.min_rows`` (2 by default there, 1 on GPU/TPU, where padding only costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import cpu_kernels
from jaxspec.config import Config, SkipMask
from jaxspec.model import KVCache, Params, _write, attend, forward, hidden, logits_of, pytree, rms_norm, rope

Array = jax.Array
PRECISIONS = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class DraftSpec:
    """How the draft is cheapened. Hashable: a static part of ``SpecDecoder``.

    precision: the draft's layer (and head) weights; float32 reuses the checkpoint's own layers.
    head: the draft head's vocabulary, the ``head`` most frequent tokens (0: the whole vocabulary).
    min_rows: pad every draft dot to at least this many rows (0: per backend, 2 on CPU and 1 elsewhere).
    """

    precision: str = "float32"
    head: int = 0
    min_rows: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"draft precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.head < 0 or self.min_rows < 0:
            raise ValueError(f"draft head ({self.head}) and min_rows ({self.min_rows}) must be >= 0")

    @property
    def rows(self) -> int:
        if self.min_rows:
            return self.min_rows
        return 2 if jax.default_backend() == "cpu" and self.precision != "float32" else 1

    @property
    def is_full(self) -> bool:
        """The checkpoint's own layers and head: no draft copy to make."""
        return self.precision == "float32" and not self.head

    def __str__(self) -> str:
        return f"{self.precision}, head {self.head or 'full'}"

    def to_json(self) -> dict[str, str | int]:
        return {"precision": self.precision, "head": self.head, "min_rows": self.min_rows}

    @classmethod
    def from_json(cls, d: dict[str, str | int]) -> DraftSpec:
        return cls(str(d.get("precision", "float32")), int(d.get("head", 0)), int(d.get("min_rows", 0)))


FULL = DraftSpec()  # the checkpoint's own layers and head


def rank_tokens(texts: list[list[int]], vocab_size: int) -> np.ndarray:
    """Every token id, most frequent in ``texts`` (token id lists, e.g. the model's own continuations of
    calibration prompts) first; ties and unseen tokens in id order (byte-pair merge order, roughly frequency)."""
    counts = np.bincount(np.concatenate([np.asarray(t, np.int64) for t in texts] + [np.zeros(0, np.int64)]),
                         minlength=vocab_size)[:vocab_size]
    return np.lexsort((np.arange(vocab_size), -counts)).astype(np.int32)


@pytree
class QWeight:
    """A (in, out) matrix: int8 with a float32 scale per output column, or bfloat16/float32 with ``scale`` None."""

    w: Array
    scale: Array | None = None


def quantize(w: Array, precision: str) -> QWeight:
    """Per-output-channel symmetric int8 (round to nearest), or a cast, of a (in, out) float matrix."""
    if precision != "int8":
        return QWeight(w.astype(precision))
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=0) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return QWeight(jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), scale)


def qdot(x: Array, qw: QWeight, min_rows: int = 1) -> Array:
    """float32 ``x @ w`` for x (..., in), its rows padded to ``min_rows``. int8 weights take int8 activations
    (symmetric, one scale per row) and accumulate in int32."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in).astype(jnp.float32)
    m = x2.shape[0]
    if m < min_rows:
        x2 = jnp.pad(x2, ((0, min_rows - m), (0, 0)))
    if qw.scale is None:
        y = jnp.dot(x2.astype(qw.w.dtype), qw.w, preferred_element_type=jnp.float32)
    else:
        sx = jnp.max(jnp.abs(x2), axis=-1, keepdims=True) / 127.0
        sx = jnp.where(sx > 0, sx, 1.0)
        xq = jnp.clip(jnp.round(x2 / sx), -127, 127).astype(jnp.int8)
        y = jnp.dot(xq, qw.w, preferred_element_type=jnp.int32).astype(jnp.float32) * sx * qw.scale
    return y[:m].reshape(*lead, -1)


@pytree
class DraftLayer:
    attn_norm: Array
    qkv: QWeight  # (dim, (heads + 2 kv_heads) * head_dim)
    wo: QWeight  # (heads * head_dim, dim)
    mlp_norm: Array
    gate_up: QWeight  # (dim, 2 hidden)
    down: QWeight  # (hidden, dim)


@pytree
class DraftParams:
    layers: tuple[DraftLayer, ...] | None  # None: the checkpoint's own (float32) layers
    head: QWeight | None  # (dim, N); None: the model's own head
    head_ids: Array | None  # (N,) int32 token id of each head column; None with the full vocabulary


def _dense(w: Array | cpu_kernels.Packed) -> Array:
    """A weight as its float32 array (packed-only params, ``model.pack_streamed``, hold the layers as tiles)."""
    return w.matrix().reshape(w.shape) if isinstance(w, cpu_kernels.Packed) else w


def make_draft(params: Params, cfg: Config, spec: DraftSpec, ranking: np.ndarray | None = None) -> DraftParams:
    """The draft's copy of ``params`` for ``spec``; ``ranking`` lists token ids most frequent first (a narrow head
    takes its first ``spec.head``; default: token id order, which byte-pair merge order makes roughly frequency)."""
    layers = None
    if spec.precision != "float32":
        def one(ly) -> DraftLayer:  # noqa: ANN001 - model.Layer
            d, w = cfg.dim, {k: _dense(getattr(ly, k)) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
            qkv = jnp.concatenate([w["wq"].reshape(d, -1), w["wk"].reshape(d, -1), w["wv"].reshape(d, -1)], axis=1)
            return DraftLayer(attn_norm=ly.attn_norm, qkv=quantize(qkv, spec.precision),
                              wo=quantize(w["wo"].reshape(-1, d), spec.precision), mlp_norm=ly.mlp_norm,
                              gate_up=quantize(jnp.concatenate([w["w_gate"], w["w_up"]], axis=1), spec.precision),
                              down=quantize(w["w_down"], spec.precision))
        layers = tuple(one(ly) for ly in params.layers)
    head = head_ids = None
    if spec.head and spec.head < cfg.vocab_size:
        ids = np.arange(cfg.vocab_size) if ranking is None else np.asarray(ranking)
        if len(ids) < spec.head:
            raise ValueError(f"the token ranking has {len(ids)} tokens; the draft head needs {spec.head}")
        head_ids = jnp.asarray(np.sort(ids[: spec.head]), jnp.int32)
    if head_ids is not None or spec.precision != "float32":
        full = params.embed.T if params.lm_head is None else _dense(params.lm_head)  # (dim, vocab)
        head = quantize(full if head_ids is None else full[:, head_ids], spec.precision)
    return DraftParams(layers=layers, head=head, head_ids=head_ids)


def with_draft(params: Params, cfg: Config, spec: DraftSpec, ranking: np.ndarray | None = None) -> Params:
    """``params`` carrying the draft copy for ``spec`` (what ``SpecDecoder(draft_spec=spec)`` drafts with)."""
    return params.replace(draft=make_draft(params.replace(draft=None), cfg, spec, ranking))


def draft_bytes(draft: DraftParams) -> int:
    """Memory the draft copy adds."""
    return sum(x.nbytes for x in jax.tree.leaves(draft))


def _hidden(draft: DraftParams, params: Params, cfg: Config, tokens: Array, cache: KVCache, skip: SkipMask,
            rows: int) -> tuple[Array, KVCache]:
    """``model.hidden`` with the draft's layers (fused, low-precision dots)."""
    B, T = tokens.shape
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    start = cache.lengths
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    x = params.embed[tokens].astype(jnp.float32)
    ks, vs = cache.k, cache.v
    for i, ly in enumerate(draft.layers):
        if i not in skip.attn:
            qkv = qdot(rms_norm(x, ly.attn_norm, cfg.norm_eps), ly.qkv, rows)
            q = rope(qkv[..., : h * hd].reshape(B, T, h, hd), positions, cfg.rope_theta)
            k = rope(qkv[..., h * hd: (h + kv) * hd].reshape(B, T, kv, hd), positions, cfg.rope_theta)
            v = qkv[..., (h + kv) * hd:].reshape(B, T, kv, hd)
            ks = _write(ks, k.astype(ks.dtype), i, start)
            vs = _write(vs, v.astype(vs.dtype), i, start)
            out = attend(q.reshape(B, T, kv, h // kv, hd).astype(ks.dtype), ks, vs, positions, i)
            x = x + qdot(out.reshape(B, T, h * hd), ly.wo, rows)
        if i not in skip.mlp:
            gate, up = jnp.split(qdot(rms_norm(x, ly.mlp_norm, cfg.norm_eps), ly.gate_up, rows), 2, axis=-1)
            x = x + qdot(jax.nn.silu(gate) * up, ly.down, rows)
    x = rms_norm(x, params.norm, cfg.norm_eps)
    return x, KVCache(k=ks, v=vs, lengths=start + T)


def draft_forward(params: Params, cfg: Config, tokens: Array, cache: KVCache, skip: SkipMask = SkipMask(),
                  spec: DraftSpec | None = None) -> tuple[Array, KVCache]:
    """The draft's logits (B, T, vocab) of a chunk and the cache with its K/V written, like ``model.forward``.

    Uses ``params.draft`` (made by ``make_draft`` for ``spec``) when present, else the full-precision model with
    ``skip``. A narrow head's logits are scattered back to vocabulary ids; the tokens outside it get -inf, so the
    draft's argmax and distribution are over real token ids (verify keeps the whole vocabulary: still lossless).
    """
    if spec is None:
        return forward(params, cfg, tokens, cache, skip)
    x, cache = draft_hidden(params, cfg, tokens, cache, skip, spec)
    return draft_head(params, cfg, x, spec), cache


def draft_hidden(params: Params, cfg: Config, tokens: Array, cache: KVCache, skip: SkipMask,
                 spec: DraftSpec) -> tuple[Array, KVCache]:
    """The draft's final-norm hidden states (its layers at ``spec.precision``) and the cache with its K/V written."""
    draft = params.draft
    if draft is None:
        raise ValueError(f"a {spec} draft needs its copy in the params: draft_model.with_draft(params, cfg, spec)")
    if draft.layers is None:
        return hidden(params, cfg, tokens, cache, skip)
    return _hidden(draft, params, cfg, tokens, cache, skip, spec.rows)


def draft_head(params: Params, cfg: Config, x: Array, spec: DraftSpec) -> Array:
    """The draft head's float32 logits over the whole vocabulary (-inf outside a narrow head)."""
    draft = params.draft
    if draft is None or draft.head is None:
        return logits_of(params, x)
    logits = qdot(x, draft.head, spec.rows)
    if draft.head_ids is None:
        return logits
    full = jnp.full((*logits.shape[:-1], cfg.vocab_size), -jnp.inf, jnp.float32)
    return full.at[..., draft.head_ids].set(logits)
