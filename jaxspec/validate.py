"""Validation of every value a user can give, shared by every entry point, so a value is checked the same way
wherever it comes from: a command-line flag, a JSONL row, a profile file, a checkpoint config, a plan argument.

Each checker returns the (normalised) value or raises ``ValueError`` with one line naming the value and the rule.
Numbers must be finite and in range (integers too: no unbounded sizes reach an allocation), text must be valid
Unicode (no lone surrogates, e.g. from undecodable ``--prompt`` bytes or ``"\\ud800"`` in JSON). Standard library only:
``plan.py`` validates its arguments before jax may be imported.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

INT32_MAX = 2**31 - 1
MAX_TOKENS = 1 << 24  # context lengths and token budgets
MAX_DIM = 1 << 20  # model widths, heads, layers


def show(v: Any, limit: int = 40) -> str:
    """``repr(v)`` cut to ``limit`` characters (a 4,000-digit integer is not echoed whole)."""
    r = repr(v)
    return r if len(r) <= limit else f"{r[: limit - 3]}..."


def number(name: str, v: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
           lo_open: bool = False) -> int | float:
    """A finite real (``integer``: an int, or a float with an integral value) in ``[lo, hi]`` (``(lo, hi]``)."""
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {show(v)}")
    if isinstance(v, numbers.Integral):
        v = int(v)
    else:
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
        if integer and not v.is_integer():
            raise ValueError(f"{name} must be {kind}, got {v}")
        v = int(v) if integer else v
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        if hi is None:
            rule = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rule = f"in {lo}..{hi}" if integer else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be {rule}, got {show(v)}")
    return v


def text(name: str, v: Any, *, empty: bool = False) -> str:
    """A string that encodes as UTF-8 (and, unless ``empty``, is not empty)."""
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {show(v)}")
    if not v and not empty:
        raise ValueError(f"{name} must not be empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode (undecodable byte or lone surrogate at character {e.start})"
                         ) from None
    return v


def layers(spec: str | None, name: str) -> tuple[int, ...]:
    """Comma-separated layer indices (``--skip-attn 3,5,7``) → a tuple (range-checked by ``SkipMask.validate``)."""
    if not spec:
        return ()
    try:
        return tuple(number(name, int(t), 0, MAX_DIM, integer=True) for t in spec.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{name} takes comma-separated layer indices, got {show(spec)}") from None


def parse_mesh(spec: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"2x4"`` (data x model) → ``(2, 4)``; a single number ``"8"`` means ``1x8``."""
    if not isinstance(spec, str):
        data, model = spec
        return int(data), int(model)
    try:
        parts = [int(p) for p in spec.lower().split("x")]
    except ValueError:
        raise ValueError(f"mesh {show(spec)} is not DATAxMODEL, e.g. 1x8") from None
    if len(parts) == 1:
        parts = [1, parts[0]]
    if len(parts) != 2 or min(parts) < 1 or max(parts) > 1 << 16:
        raise ValueError(f"mesh {show(spec)} is not DATAxMODEL with sizes in 1..65536, e.g. 2x4")
    return parts[0], parts[1]


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    return partial(number, lo=lo, hi=hi, integer=True)


def _real(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str, Any], float]:
    return partial(number, lo=lo, hi=hi, lo_open=lo_open)


# One rule per value, by name: the same rule for a flag (``--top-p``), a JSONL row key and a profile field.
RULES: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _int(1, MAX_TOKENS),
    "max_new": _int(1, MAX_TOKENS),
    "temperature": _real(0.0, 1e6),
    "top_k": _int(0, INT32_MAX),
    "top_p": _real(0.0, 1.0, lo_open=True),
    "threshold": _real(0.0, 1.0),
    "max_draft": _int(1, 64),
    "ngram_min": _int(1, 64),
    "ngram_max": _int(1, 64),
    "ngram_k": _int(1, 64),
    "draft_head": _int(0, MAX_TOKENS),
    "seed": _int(0, 2**32 - 1),
    "batch_size": _int(1, 1 << 16),
    "batch": _int(1, 1 << 16),
    "max_len": _int(1, MAX_TOKENS),
    "device_mem_gb": _real(0.0, 1e9, lo_open=True),
    "budget": _int(1, 100_000),
    "top": _int(1, 10_000),
    "real_prompts": _int(1, 10_000),
    "repeats": _int(1, 10_000),
    "margin": _real(0.0, 1e6),
    "prompt": text,
}


def value(name: str, v: Any, label: str | None = None) -> Any:
    """``v`` checked by ``RULES[name]``; messages call it ``label`` (default ``name``)."""
    return RULES[name](label or name, v)


def flags(args: argparse.Namespace) -> argparse.Namespace:
    """Check every flag that has a rule (by its dest name), in place; flags left unset (None) are not checked."""
    for name, v in vars(args).items():
        if name in RULES and v is not None:
            setattr(args, name, value(name, v, f"--{name.replace('_', '-')}"))
    return args


ROW_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p")


def row(obj: Any) -> tuple[str | int, str, dict[str, Any]]:
    """One parsed JSONL input row → ``(id, prompt, settings)``; ``ValueError`` says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"id", "prompt", *ROW_SETTINGS})
    if unknown:
        allowed = ", ".join(("id", "prompt", *ROW_SETTINGS))
        raise ValueError(f"unknown key(s) {show(unknown, 200)} (allowed: {allowed})")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {show(rid)}")
    if isinstance(rid, str):
        text("'id'", rid)
    else:
        number("'id'", rid, -(2**63), 2**63 - 1, integer=True)
    prompt = text("'prompt'", obj.get("prompt"))
    settings = {k: value(k, obj[k], repr(k)) for k in ROW_SETTINGS if k in obj}
    return rid, prompt, settings


def profile(d: Any) -> dict[str, Any]:
    """A skip-profile file's parsed JSON: the fields the command line also takes obey the command line's rules."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    mask = d.get("mask")
    if not isinstance(mask, dict) or set(mask) - {"attn", "mlp"}:
        raise ValueError(f"'mask' must be an object with 'attn' and 'mlp' lists, got {show(mask)}")
    for k, ids in mask.items():
        if not isinstance(ids, list):
            raise ValueError(f"mask {k!r} must be a list of layer indices, got {show(ids)}")
        for i in ids:
            number(f"mask {k!r} index", i, 0, MAX_DIM, integer=True)
    for k in ("threshold", "max_draft"):
        if k in d:
            value(k, d[k], repr(k))
    for k in ("use_ssd", "ngram_adaptive"):
        if not isinstance(d.get(k, True), bool):
            raise ValueError(f"{k!r} must be true or false, got {show(d[k])}")
    if not isinstance(d.get("model_id"), str | None):
        raise ValueError(f"'model_id' must be a string, got {show(d['model_id'])}")
    if not isinstance(d.get("phrases"), str | None):
        raise ValueError(f"'phrases' must be a phrase table's file name, got {show(d['phrases'])}")
    if d.get("drafter", "skip") not in ("skip", "ngram", "hybrid"):
        raise ValueError(f"'drafter' must be skip, ngram or hybrid, got {show(d['drafter'])}")
    ngram = d.get("ngram", [2, 4, 8])
    if not isinstance(ngram, list) or len(ngram) != 3:
        raise ValueError(f"'ngram' must be [min, max, k], got {show(ngram)}")
    for name, v in zip(("ngram_min", "ngram_max", "ngram_k"), ngram, strict=True):
        value(name, v, f"'ngram' {name.split('_')[1]}")
    draft = d.get("draft", {})
    if not isinstance(draft, dict) or set(draft) - {"precision", "head", "min_rows"}:
        raise ValueError(f"'draft' must be an object with 'precision', 'head', 'min_rows', got {show(draft)}")
    if "self_draft" in d:
        try:
            profile(d["self_draft"])
        except ValueError as e:
            raise ValueError(f"'self_draft': {e}") from None
    return d


CONFIG_INTS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, MAX_TOKENS), "dim": (1, MAX_DIM), "n_layers": (0, 4096), "n_heads": (1, 4096),
    "n_kv_heads": (1, 4096), "hidden_dim": (1, MAX_DIM * 4), "max_seq_len": (1, MAX_TOKENS),
}
DTYPES = ("float32", "bfloat16", "float16")


def config(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A model config's fields (``Config``): positive bounded sizes, divisible heads, finite positive epsilon and
    RoPE base, token ids inside the vocabulary. Returns the integer fields as ints."""
    out = {k: number(k, fields[k], lo, hi, integer=True) for k, (lo, hi) in CONFIG_INTS.items()}
    number("norm_eps", fields["norm_eps"], 0.0, 1.0, lo_open=True)
    number("rope_theta", fields["rope_theta"], 0.0, 1e12, lo_open=True)
    if fields["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {show(fields['dtype'])}")
    if not isinstance(fields["tie_embeddings"], bool):
        raise ValueError(f"tie_embeddings must be true or false, got {show(fields['tie_embeddings'])}")
    if out["dim"] % out["n_heads"]:
        raise ValueError(f"dim {out['dim']} is not a multiple of n_heads {out['n_heads']}")
    if out["n_heads"] % out["n_kv_heads"]:
        raise ValueError(f"n_heads {out['n_heads']} is not a multiple of n_kv_heads {out['n_kv_heads']}")
    if (out["dim"] // out["n_heads"]) % 2:
        raise ValueError(f"head dimension {out['dim'] // out['n_heads']} is odd (RoPE rotates pairs)")
    vocab = out["vocab_size"] - 1
    if fields["bos_id"] is not None:
        out["bos_id"] = number("bos_id", fields["bos_id"], 0, vocab, integer=True)
    if not isinstance(fields["eos_ids"], tuple | list):
        raise ValueError(f"eos_ids must be a list of token ids, got {show(fields['eos_ids'])}")
    out["eos_ids"] = tuple(number("eos_ids", i, 0, vocab, integer=True) for i in fields["eos_ids"])
    return out
