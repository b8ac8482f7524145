"""Model configuration and skip masks: frozen, hashable values passed straight to ``jax.jit``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxspec import validate


@dataclass(frozen=True)
class Config:
    """LLaMA-family architecture. Hashable, so it can be a static argument of ``jax.jit``."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: str = "float32"
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:  # degenerate or absurd sizes fail here, not deep inside jit
        for k, v in validate.config(dataclasses.asdict(self)).items():
            object.__setattr__(self, k, v)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("eos_ids"), list):
            d["eos_ids"] = tuple(d["eos_ids"])
        return cls(**d)

    @classmethod
    def from_hf(cls, path: str | Path | dict[str, Any]) -> Config:
        """From a Hugging Face ``config.json`` (a path or the parsed dict) of a LLaMA model."""
        hf = path if isinstance(path, dict) else json.loads(Path(path).read_text())
        arch = hf.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise ValueError(f"model_type {arch!r} is not a LLaMA-family model")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {rope_scaling} is not supported")
        eos = hf.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            hidden_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=hf.get("bos_token_id"),
            eos_ids=eos_ids,
        )


def _llama(vocab: int, dim: int, layers: int, heads: int, kv: int, hidden: int, **kw: Any) -> Config:
    return Config(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, hidden_dim=hidden, **kw)


PRESETS: dict[str, Config] = {
    "llama2-7b": _llama(32000, 4096, 32, 32, 32, 11008),
    "llama2-13b": _llama(32000, 5120, 40, 40, 40, 13824),
    "llama2-70b": _llama(32000, 8192, 80, 64, 8, 28672),
    "codellama-7b": _llama(32016, 4096, 32, 32, 32, 11008, max_seq_len=16384, rope_theta=1e6),
    "codellama-13b": _llama(32016, 5120, 40, 40, 40, 13824, max_seq_len=16384, rope_theta=1e6),
    "codellama-34b": _llama(32000, 8192, 48, 64, 8, 22016, max_seq_len=16384, rope_theta=1e6),
    "smollm2-135m": _llama(
        49152, 576, 30, 9, 3, 1536, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
        bos_id=1, eos_ids=(2,),
    ),
    # Tiny configs for tests: run in seconds on a laptop CPU.
    "tiny": _llama(256, 64, 4, 4, 2, 128, max_seq_len=512, bos_id=1, eos_ids=(2,)),
    "tiny-tied": _llama(256, 64, 4, 4, 1, 128, max_seq_len=512, tie_embeddings=True, bos_id=1, eos_ids=(2,)),
}


@dataclass(frozen=True)
class SkipMask:
    """Which attention and which MLP sublayers the draft skips (0-based layer indices).

    A skipped sublayer is the identity on the residual stream and writes no KV. The empty mask is the full model.
    """

    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", tuple(sorted(set(int(i) for i in self.attn))))
        object.__setattr__(self, "mlp", tuple(sorted(set(int(i) for i in self.mlp))))

    def __bool__(self) -> bool:
        return bool(self.attn or self.mlp)

    def validate(self, n_layers: int) -> SkipMask:
        bad = [i for i in self.attn + self.mlp if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"skip mask names layers {bad} outside 0..{n_layers - 1}")
        return self

    def to_json(self) -> dict[str, list[int]]:
        return {"attn": list(self.attn), "mlp": list(self.mlp)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SkipMask:
        return cls(attn=tuple(d.get("attn", ())), mlp=tuple(d.get("mlp", ())))

    def __str__(self) -> str:
        return f"attn[{','.join(map(str, self.attn))}] mlp[{','.join(map(str, self.mlp))}]"
