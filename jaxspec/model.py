"""LLaMA-2-family transformer as pure functions over dataclass pytrees, with a functional KV cache.

The forward pass takes the cache in and returns it; a skip mask (static) turns sublayers into the identity.
Every parameter and cache array names its logical axes in ``AXES`` so ``sharding.py`` can place it on a mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import cpu_kernels
from jaxspec.config import Config, SkipMask

Array = jax.Array
T = TypeVar("T")


def pytree(cls: type[T]) -> type[T]:
    """A frozen dataclass that JAX treats as a pytree (every field a child) with ``.replace(**changes)``: what
    ``flax.struct.dataclass`` gives, without importing Flax (a quarter second of every command's start)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)  # type: ignore[attr-defined]
    return jax.tree_util.register_dataclass(cls)

# Logical axes of every parameter (per layer for Layer fields) and of the cache, named once.
AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("embed",),
    "attn_norm": ("embed",),
    "wq": ("embed", "heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "cache_kv": ("layers", "batch", "seq", "kv_heads", "head_dim"),
    "cache_lengths": ("batch",),
}


@pytree
class Layer:
    attn_norm: Array
    wq: Array
    wk: Array
    wv: Array
    wo: Array
    mlp_norm: Array
    w_gate: Array
    w_up: Array
    w_down: Array


@pytree
class Params:
    embed: Array
    layers: tuple[Layer, ...]
    norm: Array
    lm_head: Array | None  # None when the embeddings are tied
    draft: Any = None  # a cheap copy for speculative drafts only (``draft_model.DraftParams``), or None
    stacked: Layer | None = None  # the layers' weights as (n_layers, ...) arrays over the same memory, or None
    packed: PackedWeights | None = None  # ``pack``: the layers (then the head) for the CPU kernel's few-row products
    phrases: Any = None  # ``phrases.PhraseTable`` tuple: n-gram drafts where a row's context has none, or None


@pytree
class PackedWeights:
    """The weights again in ``cpu_kernels.Packed`` tiles, for products of few rows (decode steps, verifies)."""

    layers: tuple[Layer, ...]
    head: cpu_kernels.Packed  # the output head as (dim, vocab): the tied embedding transposed, or lm_head
    # The same layers stacked over the same memory (each weight a ``Packed`` of (n_layers, *its tiles), the norms
    # (n_layers, dim)): ``hidden`` then runs the model as one loop over the layers (``scan_layers``), or None
    stacked: Layer | None = None


_PACKED_N_IN = {"wo": 2}  # the weights whose first two axes are contracted; the others contract one
PACKED_PREFIX = "packed."


def pack(params: Params, flat: dict[str, Array] | None = None, stacked: dict[str, Array] | None = None,
         exact: bool = True) -> Params:
    """``params`` with a ``PackedWeights`` copy of its float32 weight matrices where the CPU kernels run (a second
    copy of the weights: decode steps and verifies read that one, long prompts' chunks the other); else unchanged.
    ``flat``: the packed arrays by ``packed_to_flat``'s names, as a fast-weights copy stored them, and ``stacked``:
    each kind's layers over the same memory (``packed.wq``: (n_layers, *its tiles)), as it maps them; else
    packed here (~3 s for SmolLM2, finding its exact blocks). ``exact``: each kind of weight in block-quantized
    storage where all its layers' float32 values are exactly such (``blockquant``: SmolLM2's layers 4-bit, its head
    8-bit), else in 2 bytes where they are all float16 or bfloat16 values (an HF checkpoint's), else float32."""
    if not cpu_kernels.active() or params.embed.dtype != jnp.float32 or params.packed is not None:
        return params
    kinds = [k for k in Layer.__dataclass_fields__ if not k.endswith("norm")]
    whole: dict[str, cpu_kernels.Packed | None] = {}  # per kind: all layers' packed weights stacked
    each: dict[str, list[cpu_kernels.Packed]] = {}  # per kind: each layer's, over the same memory
    for k in kinds:
        shape, n_in = tuple(getattr(params.layers[0], k).shape), _PACKED_N_IN.get(k, 1)
        names = [f"{PACKED_PREFIX}layers.{i}.{k}" for i in range(len(params.layers))]
        if flat is not None and all(name in flat for name in names):
            each[k] = [cpu_kernels.Packed(flat[name], shape, n_in) for name in names]
            data = (stacked or {}).get(PACKED_PREFIX + k)
            whole[k] = None if data is None else cpu_kernels.Packed(data, shape, n_in)
        else:
            whole[k], each[k] = cpu_kernels.pack_layers([getattr(ly, k) for ly in params.layers], n_in, exact)
    layers = tuple(Layer(**{k: getattr(ly, k) if k.endswith("norm") else each[k][i]
                            for k in Layer.__dataclass_fields__}) for i, ly in enumerate(params.layers))
    all_layers = None
    if params.layers and all(whole[k] is not None for k in kinds):
        norms = {k: getattr(params.stacked, k) if params.stacked is not None else
                 jax.device_put(np.stack([np.asarray(getattr(ly, k)) for ly in params.layers]))
                 for k in ("attn_norm", "mlp_norm")}
        all_layers = Layer(**norms, **whole)
    if flat is not None and PACKED_PREFIX + "head" in flat:
        head = cpu_kernels.Packed(flat[PACKED_PREFIX + "head"], tuple(params.embed.shape[::-1]) if params.lm_head
                                  is None else tuple(params.lm_head.shape))
    elif params.lm_head is None:  # tied: the head is the embedding transposed
        head = cpu_kernels.pack(np.asarray(params.embed).T, exact=exact)
    else:
        head = cpu_kernels.pack(params.lm_head, exact=exact)
    return params.replace(packed=PackedWeights(layers, head, all_layers))


def pack_streamed(cfg: Config, small: dict[str, Array], layer: Callable[[int], dict[str, Array]],
                  like: str | None = None) -> Params:
    """Packed params (``pack``) for a model whose float32 matrices are never all in memory at once: ``small`` holds
    the other parameters by name (float32 embeddings and norms, ``lm_head`` if untied), ``layer(i)`` reads layer i's
    matrices (by kind: ``wq``, ...), packed at once into per-kind buffers of all layers. Each kind is stored as its
    layer 0 packs exactly (``cpu_kernels.pack``), or as ``like`` (a 2-byte dtype's name: the checkpoint's own, in
    which the matrices may come), and every later layer must pack alike (ValueError). The result has no float32 copy
    of the layers: ``layers`` and ``stacked`` are the packed weights, which long chunks read through XLA's dots of
    their widened matrices, and a packed ``lm_head`` where it is untied. Host memory: the packed model plus one
    layer's matrices."""
    kinds = [k for k in Layer.__dataclass_fields__ if not k.endswith("norm")]
    shapes = param_shapes(cfg)
    host: dict[str, np.ndarray] = {}
    for i in range(cfg.n_layers):
        for k, w in layer(i).items():
            try:
                tiles = cpu_kernels.pack_like(w, _PACKED_N_IN.get(k, 1), host[k].dtype if k in host else like)
            except ValueError as e:
                raise ValueError(f"layers.{i}.{k}: {e}") from None
            if k not in host:
                host[k] = cpu_kernels.layers_buffer(cfg.n_layers, tiles)
            elif tiles.shape != host[k].shape[1:]:
                raise ValueError(f"layers.{i}.{k}: packs as {tiles.shape}, layer 0 as {host[k].shape[1:]}")
            host[k][i] = tiles
    whole, each = {}, {}
    for k in kinds:
        whole[k], each[k] = cpu_kernels.device_layers(host.pop(k), shapes[f"layers.0.{k}"], _PACKED_N_IN.get(k, 1))
    lm_head = small.get("lm_head")
    w = np.asarray(small["embed"]).T if lm_head is None else lm_head
    head = cpu_kernels.Packed(jax.device_put(cpu_kernels.pack_like(w, 1, like)), tuple(w.shape))
    norms = {k: jax.device_put(np.stack([np.asarray(small[f"layers.{i}.{k}"]) for i in range(cfg.n_layers)]))
             for k in ("attn_norm", "mlp_norm")}
    return _packed_only(cfg, small, each, Layer(**norms, **whole), head)


def _packed_only(cfg: Config, small: dict[str, Array], each: dict[str, list[cpu_kernels.Packed]], stacked: Layer,
                 head: cpu_kernels.Packed) -> Params:
    """Params whose layers are packed only: ``each`` kind's packed layers, ``stacked`` the same and the norms as
    (n_layers, ...) arrays, the per-layer norms, embeddings and final norm in ``small``."""
    layers = tuple(Layer(**{k: each[k][i] if k in each else small[f"layers.{i}.{k}"]
                            for k in Layer.__dataclass_fields__}) for i in range(cfg.n_layers))
    return Params(embed=small["embed"], layers=layers, norm=small["norm"], lm_head=None if cfg.tie_embeddings
                  else head, stacked=stacked, packed=PackedWeights(layers, head, stacked))


def packed_only_to_flat(params: Params) -> dict[str, Array]:
    """The arrays of ``pack_streamed``'s params by name (``packed_to_flat``'s, embeddings and norms) for a fast
    weight copy; ``packed_only_from_flat`` takes them back."""
    flat = packed_to_flat(params) | {"embed": params.embed, "norm": params.norm}
    for i, ly in enumerate(params.layers):
        flat |= {f"layers.{i}.attn_norm": ly.attn_norm, f"layers.{i}.mlp_norm": ly.mlp_norm}
    return flat


def packed_only_from_flat(cfg: Config, flat: dict[str, Array], stacked: dict[str, Array]) -> Params:
    """``pack_streamed``'s params from ``packed_only_to_flat``'s arrays, with each kind of layer array stacked over
    the same memory in ``stacked`` (as a fast weight copy maps them: ``packed.wq``, ``attn_norm``); KeyError if an
    array (or a kind's stacked one) is missing."""
    shapes = param_shapes(cfg)
    each, whole = {}, {}
    for k in (k for k in Layer.__dataclass_fields__ if not k.endswith("norm")):
        shape, n_in = shapes[f"layers.0.{k}"], _PACKED_N_IN.get(k, 1)
        each[k] = [cpu_kernels.Packed(flat[f"{PACKED_PREFIX}layers.{i}.{k}"], shape, n_in) for i in range(cfg.n_layers)]
        whole[k] = cpu_kernels.Packed(stacked[PACKED_PREFIX + k], shape, n_in)
    head = cpu_kernels.Packed(flat[PACKED_PREFIX + "head"], (cfg.dim, cfg.vocab_size))
    return _packed_only(cfg, flat, each, Layer(attn_norm=stacked["attn_norm"], mlp_norm=stacked["mlp_norm"], **whole),
                        head)


def packed_to_flat(params: Params) -> dict[str, Array]:
    """The packed arrays of ``params`` (none when it has none) by name: ``packed.layers.{i}.wq``, ``packed.head``."""
    if params.packed is None:
        return {}
    flat = {PACKED_PREFIX + "head": params.packed.head.data}
    for i, ly in enumerate(params.packed.layers):
        flat.update({f"{PACKED_PREFIX}layers.{i}.{k}": getattr(ly, k).data for k in Layer.__dataclass_fields__
                     if not k.endswith("norm")})
    return flat


def layers_for(params: Params, rows: int) -> tuple[Layer, ...]:
    """The layers' weights a chunk of ``rows`` rows (batch x tokens) reads: the packed ones where the kernel takes
    that many rows."""
    return params.packed.layers if params.packed is not None and cpu_kernels.takes(rows, packed=True) else params.layers


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Expected shape of every parameter, keyed ``embed``, ``layers.{i}.wq``, ... (used by converters)."""
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    layer = {
        "attn_norm": (d,), "wq": (d, h, hd), "wk": (d, kv, hd), "wv": (d, kv, hd), "wo": (h, hd, d),
        "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d),
    }
    shapes = {"embed": (cfg.vocab_size, d), "norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def params_from_flat(cfg: Config, flat: dict[str, Array]) -> Params:
    """Build ``Params`` from a flat name → array dict, checking every parameter is present with its shape."""
    shapes = param_shapes(cfg)
    missing = sorted(set(shapes) - set(flat))
    extra = sorted(set(flat) - set(shapes))
    if missing or extra:
        raise ValueError(f"parameter mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"extra {extra[:8]}{'...' if len(extra) > 8 else ''}")
    for name, shape in shapes.items():
        if tuple(flat[name].shape) != shape:
            raise ValueError(f"parameter {name}: shape {tuple(flat[name].shape)}, expected {shape}")
    layers = tuple(
        Layer(**{k: flat[f"layers.{i}.{k}"] for k in Layer.__dataclass_fields__}) for i in range(cfg.n_layers)
    )
    return Params(embed=flat["embed"], layers=layers, norm=flat["norm"], lm_head=flat.get("lm_head"))


def params_to_flat(params: Params) -> dict[str, Array]:
    flat = {"embed": params.embed, "norm": params.norm}
    if params.lm_head is not None:
        flat["lm_head"] = params.lm_head
    for i, layer in enumerate(params.layers):
        flat.update({f"layers.{i}.{k}": getattr(layer, k) for k in Layer.__dataclass_fields__})
    return flat


def init_params(cfg: Config, key: Array, scale: float = 1.0) -> Params:
    """Random parameters (normal, fan-in scaled) for tests and tiny trained models."""
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    flat = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True):
        if name.endswith("norm"):
            flat[name] = jnp.ones(shape, cfg.dtype)
        else:
            fan_in = shape[0] if not name.endswith("wo") else shape[0] * shape[1]
            if name == "embed":
                fan_in = 1
            flat[name] = (scale / math.sqrt(fan_in) * jax.random.normal(k, shape)).astype(cfg.dtype)
    return params_from_flat(cfg, flat)


@pytree
class KVCache:
    """Preallocated K/V of all layers, each (n_layers, batch, max_len, kv_heads, head_dim), and per-row lengths.

    Row b's valid entries are ``[0, lengths[b])``; rollback is resetting ``lengths``. One array for all layers lets
    a decode step loop over the layers (``scan_layers``) and each layer's kernels read its slice in place.
    """

    k: Array
    v: Array
    lengths: Array  # (batch,) int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def shape(cfg: Config, batch: int, max_len: int) -> tuple[int, int, int, int, int]:
        """K's (or V's) shape: (n_layers, batch, max_len, kv_heads, head_dim)."""
        return cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int) -> KVCache:
        shape = cls.shape(cfg, batch, max_len)
        return cls(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in HF's rotate-half layout. x: (B, T, heads, head_dim); positions: (B, T)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _write(cache_arr: Array, new: Array, layer: Array | int, start: Array) -> Array:
    """Write a (B, T, kv, hd) chunk into layer ``layer`` of the stacked (layers, B, S, kv, hd) cache at per-row
    offsets ``start`` (B,), in place."""
    if cache_arr.shape[1] == 1:
        return jax.lax.dynamic_update_slice(cache_arr, new[None], (layer, 0, start[0], 0, 0))
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n[None], (layer, s, 0, 0)), in_axes=(1, 0, 0),
                    out_axes=1)(cache_arr, new, start)


QUERY_BLOCK = 128  # chunks of at least two such blocks attend block by block, each to the keys it can see


def attend(q: Array, k_cache: Array, v_cache: Array, positions: Array, layer: Array | int) -> Array:
    """Causal attention core of q (B, T, kv, g, hd) over the keys of layer ``layer`` of the stacked k/v (layers, B,
    S, kv, hd); returns (B, T, kv, g, hd). A few float32 query tokens on CPU (decode, verify) go to
    ``cpu_kernels.attend``'s kernel (which reads the layer in place); the rest to ``attend_jnp``."""
    return cpu_kernels.attend(q, k_cache, v_cache, positions, layer, _attend_jnp_at)


def _attend_jnp_at(q: Array, k_cache: Array, v_cache: Array, positions: Array, layer: Array) -> Array:
    """``attend_jnp`` over layer ``layer`` of the stacked caches (the kernel's reference and fallback)."""
    return attend_jnp(q, k_cache[layer], v_cache[layer], positions)


def attend_jnp(q: Array, k_cache: Array, v_cache: Array, positions: Array) -> Array:
    """Causal attention core of q (B, T, kv, g, hd) over the keys of k/v (B, S, kv, hd); returns (B, T, kv, g, hd).

    A KV head's g query heads and T tokens are one (g*T, hd) matrix, so both products are plain batched matrix
    products over (B, kv): the (b, k, g, t) einsums XLA:CPU ran before were about as fast for one token and 1.5x
    slower for a 9-token verify (with the query blocks below, 3x slower for a 384-token chunk; BENCHMARKS.md).
    A long chunk (a prompt's) is split into ``QUERY_BLOCK`` query blocks: the chunk starts at or before S - T, so
    block j sees no key past S - T + (j + 1) * QUERY_BLOCK, and keys after that (masked, worth exactly 0) are not
    computed: a 1024-token chunk in a 1280-slot cache computes 35% fewer scores."""
    B, T, kv, g, hd = q.shape
    S, n = k_cache.shape[1], T // QUERY_BLOCK
    if n >= 2 and T % QUERY_BLOCK == 0 and S >= T:
        blocks = []
        for j in range(n):
            a, end = j * QUERY_BLOCK, S - T + (j + 1) * QUERY_BLOCK
            blocks.append(attend_jnp(q[:, a : a + QUERY_BLOCK], k_cache[:, :end], v_cache[:, :end],
                                     positions[:, a : a + QUERY_BLOCK]))
        return jnp.concatenate(blocks, axis=1)
    qm = q.transpose(0, 2, 3, 1, 4).reshape(B, kv, g * T, hd)
    scores = jnp.einsum("bkmd,bskd->bkms", qm, k_cache, preferred_element_type=jnp.float32) / math.sqrt(hd)
    key_pos = jnp.arange(S)
    mask = key_pos[None, None, :] <= positions[:, :, None]  # (B, T, S)
    scores = jnp.where(mask[:, None, None], scores.reshape(B, kv, g, T, S), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype).reshape(B, kv, g * T, S)
    out = jnp.einsum("bkms,bskd->bkmd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(B, kv, g, T, hd).transpose(0, 3, 1, 2, 4)


def project(x: Array, *ws: Array, n_in: int = 1, layer: Array | None = None) -> list[Array]:
    """float32 ``x @ w`` for each weight, contracting x's last ``n_in`` axes with w's first ``n_in``
    (``cpu_kernels``: one kernel call for all of them on CPU at few rows). ``layer``: the weights are stacked
    ``Packed`` ones and layer ``layer`` of each is read."""
    lead, k = x.shape[:-n_in], math.prod(x.shape[-n_in:])
    outs = cpu_kernels.matmul(x.reshape(-1, k), *(w if isinstance(w, cpu_kernels.Packed) else w.reshape(k, -1)
                                                   for w in ws), layer=layer)
    return [y.reshape(*lead, *w.shape[n_in:]) for y, w in zip(outs, ws, strict=True)]


def attention(layer: Layer, x: Array, k_cache: Array, v_cache: Array, i: Array | int, positions: Array,
              start: Array, cfg: Config, stacked: bool = False) -> tuple[Array, Array, Array]:
    """Causal GQA attention of a T-token chunk against layer ``i`` of the stacked cache; returns (out, k_cache,
    v_cache). ``stacked``: ``layer`` holds every layer's weights (``PackedWeights.stacked``) and ``i`` picks one."""
    B, T, _ = x.shape
    kv, g, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    at = i if stacked else None
    q, k, v = project(x, layer.wq, layer.wk, layer.wv, layer=at)
    q = rope(q.astype(x.dtype), positions, cfg.rope_theta)
    k = rope(k.astype(x.dtype), positions, cfg.rope_theta)
    k_cache = _write(k_cache, k.astype(k_cache.dtype), i, start)
    v_cache = _write(v_cache, v.astype(v_cache.dtype), i, start)
    out = attend(q.reshape(B, T, kv, g, hd), k_cache, v_cache, positions, i)
    (o,) = project(out.reshape(B, T, cfg.n_heads, hd).astype(layer.wo.dtype), layer.wo, n_in=2, layer=at)
    return o, k_cache, v_cache


def mlp(layer: Layer, x: Array, at: Array | None = None) -> Array:
    """SwiGLU MLP of weight-dtype input ``x``; float32 output (for the float32 residual stream). ``at``: ``layer``
    is stacked and layer ``at`` of it is used."""
    gate, up = project(x, layer.w_gate, layer.w_up, layer=at)
    (down,) = project((jax.nn.silu(gate) * up).astype(layer.w_down.dtype), layer.w_down, layer=at)
    return down


def hidden(params: Params, cfg: Config, tokens: Array, cache: KVCache,
           skip: SkipMask = SkipMask()) -> tuple[Array, KVCache]:
    """Final-norm hidden states of a (B, T) chunk appended at each row's ``cache.lengths``.

    ``skip`` (static) removes sublayers from the computation.

    The residual stream is float32 whatever the weights' dtype: matmuls read weight-dtype inputs and accumulate and
    return float32, so a sublayer's output is rounded once, not per token-chunk shape. In bfloat16 this keeps the
    T-token verify pass within float32 noise of T one-token AR steps (greedy SSD == AR but at float32 near-ties).

    Where the CPU kernels take the chunk and the packed weights are also stacked, the layers run as one loop
    (``scan_layers``): a tenth of the unrolled layers' compiled code, so a warm start loads the decode loop in a
    fraction of the time, with bit for bit the same results (BENCHMARKS.md, "The layer loop as a scan").
    """
    x = params.embed[tokens].astype(jnp.float32)
    k, v = cache.k, cache.v
    stacked = None if params.packed is None else params.packed.stacked
    if not skip and stacked is not None and cpu_kernels.takes(tokens.size, packed=True):
        x, k, v = scan_layers(stacked, cfg, x, k, v, cache.lengths)
    else:
        for i, layer in enumerate(layers_for(params, tokens.size)):
            x, k, v = block(layer, cfg, x, k, v, i, cache.lengths, i not in skip.attn, i not in skip.mlp)
    x = rms_norm(x, params.norm, cfg.norm_eps).astype(params.embed.dtype)
    return x, KVCache(k=k, v=v, lengths=cache.lengths + tokens.shape[1])


def scan_layers(stacked: Layer, cfg: Config, x: Array, k_cache: Array, v_cache: Array, start: Array
                ) -> tuple[Array, Array, Array]:
    """Every layer on ``x`` as one loop over the layer index; ``stacked``: ``PackedWeights.stacked``, read in place
    by the kernels (a slice of stacked weights fed to a kernel would be a copy of them)."""
    def body(i: Array, c: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        return block(stacked, cfg, *c, i, start, stacked=True)

    return jax.lax.fori_loop(0, cfg.n_layers, body, (x, k_cache, v_cache))


def block(layer: Layer, cfg: Config, x: Array, k_cache: Array, v_cache: Array, i: Array | int, start: Array,
          attn: bool = True, ffn: bool = True, stacked: bool = False) -> tuple[Array, Array, Array]:
    """Layer ``i`` on the float32 residual stream ``x`` (B, T, dim) of a chunk written at per-row offsets ``start``
    (B,) into layer ``i`` of the stacked caches; ``attn``/``ffn`` False skip that sublayer. ``stacked``: ``layer``
    holds every layer's weights and ``i`` picks one. Returns (x, k_cache, v_cache)."""
    dt = layer.wq.dtype
    positions = start[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    attn_norm, mlp_norm = (layer.attn_norm[i], layer.mlp_norm[i]) if stacked else (layer.attn_norm, layer.mlp_norm)
    if attn:
        h, k_cache, v_cache = attention(layer, rms_norm(x, attn_norm, cfg.norm_eps).astype(dt), k_cache, v_cache,
                                        i, positions, start, cfg, stacked)
        x = x + h
    if ffn:
        x = x + mlp(layer, rms_norm(x, mlp_norm, cfg.norm_eps).astype(dt), i if stacked else None)
    return x, k_cache, v_cache


def logits_of(params: Params, x: Array) -> Array:
    """Project hidden states (..., dim) to float32 vocabulary logits."""
    lead = x.shape[:-1]
    if params.packed is not None and cpu_kernels.takes(math.prod(lead), packed=True):
        return project(x, params.packed.head)[0]
    if params.lm_head is None:
        return cpu_kernels.matmul_t(x.reshape(-1, x.shape[-1]), params.embed).reshape(*lead, -1)
    return project(x, params.lm_head)[0]


def forward(params: Params, cfg: Config, tokens: Array, cache: KVCache,
            skip: SkipMask = SkipMask()) -> tuple[Array, KVCache]:
    """Logits (B, T, vocab) of a chunk and the cache with the chunk appended (lengths advanced by T)."""
    x, cache = hidden(params, cfg, tokens, cache, skip)
    return logits_of(params, x), cache
