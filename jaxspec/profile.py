"""Profiles: the drafter a checkpoint decodes with (skip mask, θ, ``max_draft``, n-gram settings), bound to one model,
and the rule that adopts a configuration only on evidence.

A profile is JSON beside the checkpoint (``skip_profile.json``); the project ships the searched profiles of its
default checkpoints in ``jaxspec/profiles/`` (found by ``model_id``), used when the checkpoint has none
(``find_profile``). ``model_id`` hashes the config and weight shapes so a profile made for another model is refused.
A profile holds the configuration that won on its device (what decoding with no mode flags uses; AR when
``use_ssd`` is false) and its best self-draft (``self_draft``: mask, draft precision and head, ``max_draft``, θ₀ and
its measured speedup, even below 1), which ``--drafter skip`` uses. Named presets hold the masks the paper's authors
published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxspec import validate
from jaxspec.config import Config, SkipMask
from jaxspec.files import atomic_write
from jaxspec.model import param_shapes

PROFILE_NAME = "skip_profile.json"
SHIPPED = Path(__file__).parent / "profiles"  # searched profiles of the default checkpoints (package data)
ADOPT_MARGIN = 0.03  # a configuration must beat AR by 3% at its lower bound to be adopted

# Draft & Verify's published masks (their repository's skip_layers.json), 0-based layer indices.
PUBLISHED_MASKS: dict[str, tuple[int, SkipMask]] = {
    "llama-2-13b": (40, SkipMask(
        attn=(3, 5, 6, 8, 10, 11, 14, 15, 18, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 33, 34, 35, 36, 37),
        mlp=(6, 9, 10, 11, 15, 24, 25, 27, 28, 35))),
    "llama-2-13b-chat": (40, SkipMask(
        attn=(7, 8, 9, 10, 11, 14, 15, 18, 22, 23, 24, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38),
        mlp=(7, 10, 11, 14, 27, 30, 32, 33, 37, 38))),
    "codellama-13b": (40, SkipMask(
        attn=(5, 6, 9, 10, 11, 14, 15, 16, 21, 23, 24, 26, 27, 28, 29, 30, 31, 32, 34, 35, 36, 37),
        mlp=(10, 11, 12, 14, 15, 25, 26, 27, 30, 32, 33, 34))),
    "llama-2-70b": (80, SkipMask(
        attn=(10, 11, 13, 14, 16, 18, 19, 20, 21, 22, 25, 27, 28, 29, 30, 31, 35, 41, 43, 45, 46, 47, 48, 49, 50, 51,
              52, 53, 54, 55, 56, 57, 58, 60, 61, 62, 63, 65, 66, 67, 68, 69, 70, 74, 75, 78, 79),
        mlp=(2, 4, 9, 10, 13, 14, 16, 20, 21, 22, 24, 25, 26, 27, 28, 29, 31, 34, 37, 41, 47, 48, 49, 50, 53, 54, 55,
             57, 58, 60, 62, 63, 66, 67, 68, 70, 76))),
}


def named_masks(n_layers: int) -> dict[str, SkipMask]:
    """Hand-made masks for any depth: ``light`` (every other middle attention sublayer), ``attn-half`` (every middle
    attention sublayer), ``attn-mlp`` (those plus every third middle MLP sublayer)."""
    mid = range(n_layers // 5, n_layers - n_layers // 10)
    return {
        "light": SkipMask(attn=tuple(i for i in mid if i % 2 == 0)),
        "attn-half": SkipMask(attn=tuple(mid)),
        "attn-mlp": SkipMask(attn=tuple(mid), mlp=tuple(i for i in mid if i % 3 == 0)),
    }


def model_id(cfg: Config) -> str:
    """A short hash of the architecture and every parameter's shape (not dtype or context length)."""
    arch = {k: v for k, v in cfg.to_json().items() if k not in ("dtype", "max_seq_len")}
    blob = json.dumps({"arch": arch, "shapes": sorted(param_shapes(cfg).items())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def speedup_lower_bound(ar_tps: Any, cand_tps: Any) -> float:
    """The lowest per-round ratio of a candidate's tokens/s over AR's (rounds interleaved, so a round's two figures
    share its noise): a conservative bound on the candidate's speedup."""
    return float(np.min(np.asarray(cand_tps, np.float64) / np.asarray(ar_tps, np.float64)))


def adopt(ar_tps: Any, cand_tps: Any, margin: float = ADOPT_MARGIN) -> bool:
    """Whether measured rounds justify using a candidate instead of AR: its speedup's lower bound beats AR by
    ``margin`` (a tie within noise keeps AR)."""
    return speedup_lower_bound(ar_tps, cand_tps) >= 1 + margin


@dataclass
class Profile:
    mask: SkipMask
    threshold: float = 0.6
    max_draft: int = 12
    model_id: str | None = None
    use_ssd: bool = True  # False when no configuration beat autoregressive decoding (``adopt``) on its device
    drafter: str = "skip"  # speculative.DRAFTERS: skip, ngram or hybrid
    ngram: tuple[int, int, int] = (2, 4, 8)  # n-gram min, max and proposal length k
    ngram_adaptive: bool = False  # proposals of k // 2 tokens, k after one with k // 2 accepted (SpecDecoder)
    speedup: float | None = None  # measured speedup over AR that adopted it
    phrases: str | None = None  # a phrase table (``phrases``) the n-gram drafter also looks up, when it paid
    # The best self-draft measured (drafter skip): mask, threshold, max_draft, draft (DraftSpec.to_json), speedup...
    self_draft: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # measurements, device, search trace, ...

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "mask": self.mask.to_json(), "threshold": self.threshold,
                "max_draft": self.max_draft, "use_ssd": self.use_ssd, "drafter": self.drafter,
                "ngram": list(self.ngram), **({"ngram_adaptive": True} if self.ngram_adaptive else {}),
                "speedup": self.speedup,
                **({"phrases": self.phrases} if self.phrases is not None else {}),
                **({"self_draft": self.self_draft} if self.self_draft is not None else {}), **self.info}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        validate.profile(d)  # the rules of --threshold and --max-draft hold for a file's values too
        known = {"model_id", "mask", "threshold", "max_draft", "use_ssd", "drafter", "ngram", "ngram_adaptive",
                 "speedup", "self_draft", "phrases"}
        return cls(mask=SkipMask.from_json(d["mask"]), threshold=float(d.get("threshold", 0.6)),
                   max_draft=int(d.get("max_draft", 12)), model_id=d.get("model_id"),
                   use_ssd=bool(d.get("use_ssd", True)), drafter=str(d.get("drafter", "skip")),
                   ngram=tuple(int(x) for x in d.get("ngram", (2, 4, 8))),
                   ngram_adaptive=bool(d.get("ngram_adaptive", False)), speedup=d.get("speedup"),
                   phrases=d.get("phrases"), self_draft=d.get("self_draft"),
                   info={k: v for k, v in d.items() if k not in known})

    def for_drafter(self, drafter: str) -> Profile:
        """The settings ``--drafter drafter`` decodes with: the best self-draft's mask, draft, ``max_draft`` and θ₀
        for model drafts (skip, hybrid) unless this profile won with that very drafter; otherwise this profile."""
        sd = self.self_draft
        if drafter == "ngram" or drafter == self.drafter or sd is None:
            return self
        return dataclasses.replace(self, mask=SkipMask.from_json(sd["mask"]), threshold=float(sd["threshold"]),
                                   max_draft=int(sd["max_draft"]), drafter=drafter, speedup=sd.get("speedup"),
                                   info={**self.info, "draft": sd.get("draft") or {}})

    @property
    def has_self_draft(self) -> bool:
        """Whether model drafts (skip, hybrid) have a mask to use: its own (it won as skip/hybrid) or ``self_draft``."""
        return self.self_draft is not None or self.drafter != "ngram"


# What a checkpoint without a profile decodes with: n-gram drafting (a lookup, and one plain step where nothing
# matches), adopted because it was measured no slower than AR where little repeats (chat/story 0.98x-1.03x, medians of
# interleaved rounds on a quiet machine) and faster where text repeats its context (summarization 1.21x-1.32x, code
# 1.27x-1.34x, every round above +3%): BENCHMARKS.md, "Draft sources". k = 4 kept chat's lowest round at 0.97x.
DEFAULT = Profile(mask=SkipMask(), drafter="ngram", ngram=(2, 4, 4), use_ssd=True)


def load_profile(path: str | Path, cfg: Config) -> Profile:
    """Read a profile (a file path or a preset name) and check it fits ``cfg``; ``ValueError`` otherwise."""
    if str(path) in PUBLISHED_MASKS:
        n_layers, mask = PUBLISHED_MASKS[str(path)]
        if n_layers != cfg.n_layers:
            raise ValueError(f"preset {path!r} is for {n_layers}-layer models; this model has {cfg.n_layers} layers")
        return Profile(mask=mask, model_id=model_id(cfg), info={"preset": str(path)})
    try:
        prof = Profile.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ValueError(f"skip profile {path} not found (nor a preset: {', '.join(PUBLISHED_MASKS)})") from None
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and validate's errors are ValueErrors
        raise ValueError(f"skip profile {path} is not a valid profile ({e})") from None
    if prof.model_id is not None and prof.model_id != model_id(cfg):
        raise ValueError(f"skip profile {path} was made for another model (model_id {prof.model_id}, "
                         f"this checkpoint is {model_id(cfg)})")
    prof.mask.validate(cfg.n_layers)
    if prof.phrases is not None:  # named relative to the profile's directory
        prof.phrases = str(Path(path).parent / prof.phrases)
    return prof


def shipped_profile(cfg: Config, where: Path | None = None) -> Profile | None:
    """The project's searched profile for this model (``jaxspec/profiles/*.json`` with its ``model_id``), or None."""
    mid = model_id(cfg)
    for path in sorted((where or SHIPPED).glob("*.json")):
        try:
            if json.loads(path.read_text()).get("model_id") == mid:
                return load_profile(path, cfg)
        except (OSError, ValueError, AttributeError):
            continue
    return None


def find_profile(ckpt_dir: Path, cfg: Config, where: Path | None = None) -> Profile | None:
    """The checkpoint's own profile (``ckpt_dir/skip_profile.json``), else the shipped one for its model, else None
    (the caller then decodes with ``DEFAULT``)."""
    own = Path(ckpt_dir) / PROFILE_NAME
    return load_profile(own, cfg) if own.exists() else shipped_profile(cfg, where)


def _one_line(m: re.Match[str]) -> str:
    try:
        return json.dumps(json.loads(m.group()))
    except ValueError:  # not a list of numbers after all
        return m.group()


def save_profile(path: str | Path, prof: Profile) -> None:
    """Write a profile atomically: indented, each list of numbers on one line (a 16k-token ranking is one line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"\[\n[-+.\deE,\s]*\]", _one_line, json.dumps(prof.to_json(), indent=1))
    atomic_write(path, text.encode())
