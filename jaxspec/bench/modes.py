"""Decoding modes under test: a table of name → factory. Adding a drafter is one line here.

A factory gets the config, the stop ids and the checkpoint's profile (its own or the shipped one, or None) and
returns a ``Mode`` (a decoder, the keyword arguments ``decode.generate`` passes to its ``init_stats``, and the cheap
draft copy its parameters need), or None when the mode does not apply (e.g. ``self-draft`` without a profile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxspec.config import Config, SkipMask
from jaxspec.decode import Decoder
from jaxspec.draft_model import DraftSpec
from jaxspec.profile import DEFAULT, Profile, named_masks
from jaxspec.speculative import SpecDecoder


@dataclass(frozen=True)
class Mode:
    decoder: Decoder
    init: dict[str, Any] = field(default_factory=dict)  # e.g. the initial threshold θ
    draft: DraftSpec | None = None  # the draft copy ``draft_model.with_draft`` adds to the parameters, if any
    ranking: tuple[int, ...] | None = None  # the profile's token ranking for a narrow draft head
    phrases: str | None = None  # the phrase table (``phrases``) the parameters carry, if any


def from_profile(cfg: Config, eos: tuple[int, ...], prof: Profile) -> Mode | None:
    """What ``generate.py`` decodes with under ``prof`` and no flags (None: AR, the profile adopted no drafter)."""
    if not prof.use_ssd:
        return None
    draft = DraftSpec.from_json(prof.info.get("draft") or {}) if prof.drafter != "ngram" else None
    draft = None if draft is None or draft.is_full else draft
    ranking = prof.info.get("draft_vocab") if draft is not None and draft.head else None
    return Mode(SpecDecoder(cfg, eos_ids=eos, skip=prof.mask if prof.drafter != "ngram" else SkipMask(),
                            max_draft=prof.max_draft, drafter=prof.drafter, ngram_min=prof.ngram[0],
                            ngram_max=prof.ngram[1], ngram_k=prof.ngram[2], adaptive_k=prof.ngram_adaptive,
                            draft_spec=draft),
                {"theta": prof.threshold}, draft, None if ranking is None else tuple(ranking),
                prof.phrases if prof.drafter != "skip" else None)


Factory = Callable[[Config, tuple[int, ...], Profile | None], Mode | None]

MODES: dict[str, Factory] = {
    "ar": lambda cfg, eos, prof: Mode(Decoder(cfg, eos_ids=eos)),
    "ngram": lambda cfg, eos, prof: from_profile(cfg, eos, DEFAULT),
    "hybrid": lambda cfg, eos, prof: Mode(SpecDecoder(cfg, eos_ids=eos, drafter="hybrid",
                                                      skip=named_masks(cfg.n_layers)["light"])),
    "light": lambda cfg, eos, prof: Mode(SpecDecoder(cfg, eos_ids=eos, skip=named_masks(cfg.n_layers)["light"])),
    "self-draft": lambda cfg, eos, prof: None if prof is None or not prof.has_self_draft else from_profile(
        cfg, eos, prof.for_drafter("skip")),  # --drafter skip: the profile's best self-draft
    "profile": lambda cfg, eos, prof: from_profile(cfg, eos, prof or DEFAULT),  # no flags: generate.py's choice
}


def build(names: list[str], cfg: Config, eos: tuple[int, ...], prof: Profile | None) -> dict[str, Mode]:
    """The modes ``names`` that apply to this checkpoint, ``ar`` first (the baseline every ratio refers to); a mode
    that decodes exactly like an earlier one (``profile`` when the profile's winner is the plain n-gram drafter) is
    left out, its row being the earlier one's."""
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    out: dict[str, Mode] = {}
    for n in ["ar", *(n for n in names if n != "ar")]:
        m = MODES[n](cfg, eos, prof)
        if m is not None and m not in out.values():
            out[n] = m
    return out
