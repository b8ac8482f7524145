"""jaxspec: lossless self-speculative decoding (Draft & Verify) for LLaMA-family models in JAX.

The API a research fork calls (see the README's example)::

    cfg, params, tok = jaxspec.load("smollm2-135m")          # registered name or checkpoint directory
    dec = jaxspec.SpecDecoder(cfg, eos_ids=tok.eos_ids, skip=jaxspec.SkipMask(attn=(4, 8)))
    res = jaxspec.generate(dec, params, [tok.encode("Hello")], max_new=32)

Names are imported on first use, so ``import jaxspec`` stays cheap and does not initialise JAX (scripts set XLA
flags first). Reading order: ``cli/generate.py`` (the CLI) → ``decode.py`` (the decode loop) →
``speculative.py`` (the draft-verify cycle) → ``model.py`` (the transformer).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {  # public name → (module, attribute)
    "load": ("jaxspec.checkpoint", "load"),  # (cfg, params, tokenizer) from a registered name or a directory
    "load_checkpoint": ("jaxspec.checkpoint", "load_checkpoint"),
    "convert_checkpoint": ("jaxspec.checkpoint", "convert_checkpoint"),
    "Config": ("jaxspec.config", "Config"),
    "SkipMask": ("jaxspec.config", "SkipMask"),
    "Params": ("jaxspec.model", "Params"),
    "KVCache": ("jaxspec.model", "KVCache"),
    "init_params": ("jaxspec.model", "init_params"),
    "forward": ("jaxspec.model", "forward"),
    "Sampling": ("jaxspec.sampling", "Sampling"),
    "Decoder": ("jaxspec.decode", "Decoder"),
    "SpecDecoder": ("jaxspec.speculative", "SpecDecoder"),
    "generate": ("jaxspec.decode", "generate"),
    "Result": ("jaxspec.decode", "Result"),
    "Tokenizer": ("jaxspec.tokenizer", "Tokenizer"),
    "Profile": ("jaxspec.profile", "Profile"),
    "load_profile": ("jaxspec.profile", "load_profile"),
    "save_profile": ("jaxspec.profile", "save_profile"),
    "search_profile": ("jaxspec.search", "search"),  # finds a skip profile for a model on this device
    "load_phrases": ("jaxspec.phrases", "load"),  # a phrase table: params.replace(phrases=load_phrases(path, vocab))
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'jaxspec' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
