"""Real end-to-end timings of candidate decoders against AR: interleaved repeats, medians, robust speedups."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.decode import Decoder, Result, generate
from jaxspec.draft_model import FULL, DraftSpec, with_draft
from jaxspec.model import Params
from jaxspec.sampling import Sampling
from jaxspec.speculative import SpecDecoder

OBJECTIVE = ("end-to-end greedy SSD decode tokens/s over AR decode tokens/s (prefill and compilation excluded), "
             "batch 1, adaptive threshold on, on the calibration prompts, on this device; each decoder warmed up "
             "once, then {repeats} interleaved repeats over the prompts; speedup = median over repeats of "
             "(AR decode time / SSD decode time), tokens/s = median over repeats")


@dataclass
class Candidate:
    label: str
    mask: SkipMask
    max_draft: int = 12
    theta: float = 0.6
    predicted: float | None = None  # the proxy's speedup
    drafter: str = "skip"  # speculative.DRAFTERS
    ngram: tuple[int, int, int] = (2, 4, 8)  # n-gram min, max, k (ngram and hybrid drafters)
    spec: DraftSpec = FULL  # the model draft's precision and head width (skip and hybrid drafters)
    ngram_adaptive: bool = False  # proposals of k // 2 tokens, k after one with k // 2 accepted (SpecDecoder)

    @property
    def settings(self) -> dict[str, Any]:
        """What a profile records to decode like this candidate."""
        return {"drafter": self.drafter, "mask": self.mask.to_json(), "max_draft": self.max_draft,
                "threshold": self.theta, "ngram": list(self.ngram), "ngram_adaptive": self.ngram_adaptive,
                "draft": self.spec.to_json()}


@dataclass
class Timing:
    """Real end-to-end numbers of one candidate against AR, from ``measure``."""

    label: str
    candidate: Candidate
    predicted: float | None
    tokens_per_s: float  # median over repeats
    speedup: float  # median over repeats of SSD tokens/s over AR tokens/s in the same repeat
    speedups: list[float]
    acceptance_rate: float
    mean_accepted: float  # accepted drafts per verify pass
    compile_s: float  # decode-loop compilation (generate's compile_s)
    warmup_s: float  # the whole warm-up run, compilation included (excluded from the figures)
    lossless: bool  # greedy SSD produced exactly AR's tokens

    @property
    def mask(self) -> SkipMask:
        return self.candidate.mask

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "candidate"}
        d = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
        return {**self.candidate.settings, **d, "speedups": [round(s, 4) for s in self.speedups]}


def robust_speedup(ar_tps: Sequence[float], ssd_tps: Sequence[float]) -> float:
    """Median over repeats of the per-repeat ratio (SSD and AR of one repeat ran interleaved, under like noise)."""
    return float(np.median(np.asarray(ssd_tps) / np.asarray(ar_tps)))


def measure(params: Params, cfg: Config, prompts: list[list[int]], max_new: int, eos_ids: tuple[int, ...],
            candidates: Sequence[Candidate], repeats: int = 3, run: Callable[..., Result] = generate,
            ranking: np.ndarray | None = None) -> list[Timing]:
    """Time AR and every candidate end to end on ``prompts`` (batch 1, greedy, adaptive θ): one ``Timing`` for AR
    (label ``ar``, speedup 1 by definition) followed by one per candidate.

    Noise handling: each decoder first runs once on the first prompt (compilation and first-run initialisation;
    excluded). Then ``repeats`` rounds each run every prompt with every decoder back to back, in an order rotated
    per prompt and round; a round's tokens/s is its tokens over its decode seconds (prefill and compilation
    excluded), and a speedup is the median over rounds of SSD tokens/s / AR tokens/s within the round. A candidate
    with a cheap draft (``spec``) decodes with ``params`` carrying its copy (``with_draft`` over ``ranking``).
    """
    sampling = Sampling()
    cands = [Candidate("ar", SkipMask(), 0, 0.0), *candidates]
    decs: list[tuple[Decoder, Params, dict[str, float]]] = [(Decoder(cfg, sampling, eos_ids), params, {})]
    copies: dict[DraftSpec, Params] = {}
    for c in candidates:
        cheap = c.drafter != "ngram" and c.spec != FULL
        if cheap and c.spec not in copies:
            copies[c.spec] = with_draft(params, cfg, c.spec, ranking)
        decs.append((SpecDecoder(cfg, sampling, eos_ids, skip=c.mask if c.drafter != "ngram" else SkipMask(),
                                 max_draft=c.max_draft, adaptive=True, drafter=c.drafter, ngram_min=c.ngram[0],
                                 ngram_max=c.ngram[1], ngram_k=c.ngram[2], adaptive_k=c.ngram_adaptive,
                                 draft_spec=c.spec if cheap else None),
                     copies[c.spec] if cheap else params, {"theta": c.theta}))
    n = len(decs)
    warm = [run(d, p, [prompts[0]], max_new, **kw) for d, p, kw in decs]
    secs, toks = np.zeros((n, repeats)), np.zeros((n, repeats))
    counts = np.zeros((n, 3))  # drafted, accepted, verify calls (first round)
    outputs: list[list[list[int]]] = [[[] for _ in prompts] for _ in range(n)]
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            for j in np.roll(np.arange(n), -(i + r)):
                d, p, kw = decs[j]
                res = run(d, p, [prompt], max_new, **kw)
                secs[j, r] += res.decode_s
                toks[j, r] += res.new_tokens
                if r == 0:
                    outputs[j][i] = res.tokens[0]
                    if j:
                        s = res.stats.summary()
                        counts[j] += [s["drafted"], s["accepted"], s["verify_calls"]]
    tps = toks / np.maximum(secs, 1e-9)
    out = []
    for j, c in enumerate(cands):
        drafted, accepted, calls = counts[j]
        out.append(Timing(c.label, c, c.predicted, float(np.median(tps[j])),
                          robust_speedup(tps[0], tps[j]), (tps[j] / tps[0]).tolist(),
                          float(accepted / drafted) if drafted else 0.0, float(accepted / calls) if calls else 0.0,
                          warm[j].compile_s, warm[j].prefill_s + warm[j].compile_s + warm[j].decode_s,
                          outputs[j] == outputs[0]))
    return out
