"""Decoding modes under test: a table of name → factory. Adding a drafter is one line here.

A factory gets the config, the stop ids and the checkpoint's skip profile (or None) and returns a ``Mode`` (a
decoder plus the keyword arguments ``decode.generate`` passes to its ``init_stats``), or None when the mode does
not apply (e.g. ``profile`` on a checkpoint without one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxspec.config import Config
from jaxspec.decode import Decoder
from jaxspec.profile import DEFAULT, Profile, named_masks
from jaxspec.speculative import SpecDecoder


@dataclass(frozen=True)
class Mode:
    decoder: Decoder
    init: dict[str, Any] = field(default_factory=dict)  # e.g. the initial threshold θ


Factory = Callable[[Config, tuple[int, ...], Profile | None], Mode | None]

MODES: dict[str, Factory] = {
    "ar": lambda cfg, eos, prof: Mode(Decoder(cfg, eos_ids=eos)),
    "profile": lambda cfg, eos, prof: None if prof is None else Mode(
        SpecDecoder(cfg, eos_ids=eos, skip=prof.mask, max_draft=prof.max_draft), {"theta": prof.threshold}),
    "light": lambda cfg, eos, prof: Mode(SpecDecoder(cfg, eos_ids=eos, skip=named_masks(cfg.n_layers)["light"])),
    "ngram": lambda cfg, eos, prof: Mode(SpecDecoder(cfg, eos_ids=eos, drafter="ngram", ngram_min=DEFAULT.ngram[0],
                                                     ngram_max=DEFAULT.ngram[1], ngram_k=DEFAULT.ngram[2])),
    "hybrid": lambda cfg, eos, prof: Mode(SpecDecoder(cfg, eos_ids=eos, drafter="hybrid",
                                                      skip=named_masks(cfg.n_layers)["light"])),
}


def build(names: list[str], cfg: Config, eos: tuple[int, ...], prof: Profile | None) -> dict[str, Mode]:
    """The modes ``names`` that apply to this checkpoint, ``ar`` first (the baseline every ratio refers to)."""
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    ordered = ["ar", *(n for n in names if n != "ar")]
    return {n: m for n in ordered if (m := MODES[n](cfg, eos, prof)) is not None}
