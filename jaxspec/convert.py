"""Checkpoint conversion: HF LLaMA directories and GGUF files → jaxspec parameter names, tensor by tensor.

One name table maps every jaxspec parameter to its HF and GGUF names and a layout transform. Converters
yield ``(name, array)`` one tensor at a time so a caller can write each out before reading the next.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxspec.config import Config
from jaxspec.model import param_shapes

Transform = Callable[[np.ndarray, Config], np.ndarray]


def _t(w: np.ndarray, cfg: Config) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _same(w: np.ndarray, cfg: Config) -> np.ndarray:
    return w


def _q(w: np.ndarray, cfg: Config) -> np.ndarray:  # (h*hd, d) → (d, h, hd)
    return np.ascontiguousarray(w.T).reshape(cfg.dim, cfg.n_heads, cfg.head_dim)


def _kv(w: np.ndarray, cfg: Config) -> np.ndarray:  # (kv*hd, d) → (d, kv, hd)
    return np.ascontiguousarray(w.T).reshape(cfg.dim, cfg.n_kv_heads, cfg.head_dim)


def _o(w: np.ndarray, cfg: Config) -> np.ndarray:  # (d, h*hd) → (h, hd, d)
    return np.ascontiguousarray(w.T).reshape(cfg.n_heads, cfg.head_dim, cfg.dim)


def permute_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation, HF (out, in) → GGUF, as ``convert_hf_to_gguf.py`` applies it.

    Inverse of ``_unpermute_inv``; the converters only need the inverse, tests and writers use this one.
    """
    out, d = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d).swapaxes(1, 2).reshape(out, d)


def _gguf_q(w: np.ndarray, cfg: Config) -> np.ndarray:
    return _q(_unpermute_inv(w, cfg.n_heads), cfg)


def _gguf_k(w: np.ndarray, cfg: Config) -> np.ndarray:
    return _kv(_unpermute_inv(w, cfg.n_kv_heads), cfg)


def _unpermute_inv(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (GGUF interleaved rotary pairs → HF's rotate-half halves)."""
    out, d = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out, d)


# jaxspec name → (HF name, GGUF name, HF transform, GGUF transform); "{i}" is the layer index.
NAMES: dict[str, tuple[str, str, Transform, Transform]] = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight", _same, _same),
    "norm": ("model.norm.weight", "output_norm.weight", _same, _same),
    "lm_head": ("lm_head.weight", "output.weight", _t, _t),
    "layers.{i}.attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", _same, _same),
    "layers.{i}.wq": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", _q, _gguf_q),
    "layers.{i}.wk": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", _kv, _gguf_k),
    "layers.{i}.wv": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", _kv, _kv),
    "layers.{i}.wo": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", _o, _o),
    "layers.{i}.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
                            _same, _same),
    "layers.{i}.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", _t, _t),
    "layers.{i}.w_up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", _t, _t),
    "layers.{i}.w_down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", _t, _t),
}


def name_table(cfg: Config, fmt: str) -> dict[str, tuple[str, Transform]]:
    """Source tensor name → (jaxspec name, transform) for ``fmt`` in {"hf", "gguf"}, for every parameter."""
    col = {"hf": 0, "gguf": 1}[fmt]
    table = {}
    for ours in param_shapes(cfg):
        parts = ours.split(".")
        key, i = (f"layers.{{i}}.{parts[2]}", parts[1]) if parts[0] == "layers" else (ours, None)
        row = NAMES[key]
        table[row[col].format(i=i)] = (ours, row[2 + col])
    return table


class ConversionError(ValueError):
    """A checkpoint does not match the expected parameter set; the message names the tensor."""


def convert_tensors(cfg: Config, fmt: str, source: Iterator[tuple[str, Callable[[], np.ndarray]]],
                    dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Map ``(source name, loader)`` pairs to ``(jaxspec name, array)``, checking shapes and completeness.

    Arrays are loaded one at a time. Unknown source names, duplicates, wrong shapes and missing names raise
    ``ConversionError`` naming the tensor. Tied-embedding models may carry an ``lm_head`` copy, which is skipped.
    """
    table, shapes = name_table(cfg, fmt), param_shapes(cfg)
    out_dtype = jnp.dtype(dtype or cfg.dtype)  # jnp.dtype also knows "bfloat16" (ml_dtypes)
    seen: set[str] = set()
    tied_head = NAMES["lm_head"][0 if fmt == "hf" else 1]
    for src, load in source:
        if src not in table:
            if cfg.tie_embeddings and src == tied_head:
                continue
            if src.endswith("rotary_emb.inv_freq"):
                continue
            raise ConversionError(f"unexpected tensor {src!r} in checkpoint (not a parameter of this config)")
        ours, fn = table[src]
        if ours in seen:
            raise ConversionError(f"tensor {src!r} appears twice")
        seen.add(ours)
        raw = np.asarray(load())
        try:
            arr = fn(raw, cfg)
        except ValueError:  # a wrongly sized source tensor fails the transform's reshape
            arr = None
        if arr is None or tuple(arr.shape) != shapes[ours]:
            raise ConversionError(f"tensor {src!r}: shape {tuple(raw.shape)} does not convert to {ours} "
                                  f"of shape {shapes[ours]}")
        yield ours, arr.astype(out_dtype, copy=False)
    missing = [src for src, (ours, _) in table.items() if ours not in seen]
    if missing:
        raise ConversionError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:6])}"
                              + (" ..." if len(missing) > 6 else ""))


# ---- GGUF -------------------------------------------------------------------------------------------------

def gguf_config(reader) -> Config:  # noqa: ANN001 - gguf.GGUFReader
    """Config from GGUF metadata (``llama`` architecture)."""

    def field(key: str, default=None):  # noqa: ANN001, ANN202
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not llama")
    n_vocab = field("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    eos = field("tokenizer.ggml.eos_token_id")
    return Config(
        vocab_size=int(n_vocab),
        dim=int(field("llama.embedding_length")),
        n_layers=int(field("llama.block_count")),
        n_heads=int(field("llama.attention.head_count")),
        n_kv_heads=int(field("llama.attention.head_count_kv", field("llama.attention.head_count"))),
        hidden_dim=int(field("llama.feed_forward_length")),
        max_seq_len=int(field("llama.context_length", 4096)),
        norm_eps=float(np.float32(field("llama.attention.layer_norm_rms_epsilon", 1e-5))),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        bos_id=field("tokenizer.ggml.bos_token_id"),
        eos_ids=() if eos is None else (int(eos),),
    )


def iter_gguf(reader) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:  # noqa: ANN001
    """``(name, loader)`` for every tensor of a GGUF file, dequantized to float32 in HF (out, in) layout."""
    for t in reader.tensors:
        yield t.name, (lambda t=t: _dequantize(t))


def _dequantize(t, block_bytes: int = 16 << 20) -> np.ndarray:  # noqa: ANN001 - gguf.ReaderTensor
    """One GGUF tensor as float32, dequantized a block of rows at a time (``dequantize`` of a whole large
    tensor holds several float temporaries of its size)."""
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in t.shape[::-1])
    rows = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data[None]
    out = np.empty((rows.shape[0], shape[-1]), np.float32)
    step = max(1, block_bytes // out[0].nbytes)
    for i in range(0, len(rows), step):
        out[i:i + step] = dequantize(rows[i:i + step], t.tensor_type)
    return out.reshape(shape)


# ---- HF ---------------------------------------------------------------------------------------------------

def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
            "BF16": np.dtype(ml_dtypes.bfloat16)}


def _iter_safetensors(f: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """``(name, loader)`` per tensor of one safetensors file, read with ``np.fromfile`` rather than a mapping:
    the mapping ``safetensors.safe_open`` keeps open holds every page read in RSS until the file is closed (a whole
    5-10 GB shard of a 70B checkpoint); a read buffer is freed with its tensor."""
    size, types = f.stat().st_size, _safetensors_dtypes()
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        entries = []
        for name, e in header.items():
            dt, shape, (a, b) = types.get(e["dtype"]), tuple(e["shape"]), e["data_offsets"]
            if dt is None:
                raise ValueError(f"tensor {name}: dtype {e['dtype']} is not a float type")
            if not 0 <= a <= b <= size - 8 - n or b - a != math.prod(shape) * dt.itemsize:
                raise ValueError(f"tensor {name}: offsets {a}..{b} do not hold shape {shape}")
            entries.append((name, dt, shape, 8 + n + a))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{f.name}: not a readable safetensors file ({e})") from e
    for name, dt, shape, off in entries:
        yield name, (lambda dt=dt, s=shape, off=off: np.fromfile(f, dt, math.prod(s), offset=off).reshape(s))


def iter_hf(path: str | Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """``(name, loader)`` for every tensor of an HF directory: safetensors (single or sharded), else torch .bin."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ConversionError(f"safetensors shard(s) listed in the index are missing: {', '.join(absent)}")
    if files:
        for f in files:
            yield from _iter_safetensors(f)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path} holds PyTorch .bin weights: install torch (pip install 'jaxspec[torch]') "
                              "or convert them to safetensors") from None
    for f in bins:
        state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        for name in list(state):
            yield name, (lambda s=state, n=name: s[n].float().numpy())
