"""The draft policy (stop below θ, at ``max_draft`` or at the budget; the adaptive θ rule) replayed over
per-position draft agreements, and the speedup it predicts with a ``costmodel.CostModel``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxspec.config import SkipMask
from jaxspec.costmodel import CostModel
from jaxspec.draft_model import FULL, DraftSpec
from jaxspec.speculative import update_threshold


@dataclass
class SimulatedRun:
    """Per-row totals of a replayed SSD run."""

    cycles: np.ndarray
    draft_steps: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray


def simulate(agree: np.ndarray, conf: np.ndarray, lengths: np.ndarray, max_draft: int, theta: float | np.ndarray,
             adaptive: bool = True) -> SimulatedRun:
    """Replay ``SpecDecoder``'s greedy cycles over teacher-forced draft agreements/confidences (B, C) of the tokens
    after each row's first (which prefill makes).

    Drafting stops after a token whose confidence is below θ, at ``max_draft``, or one token before the row's
    budget (then the loop still runs one idle step, as the real loop does); the longest agreeing prefix is accepted
    plus the full model's token. A drafted token's agreement and confidence are taken from the position it would
    fill, as if every earlier draft had been right (only the accepted prefix counts, so that is exact for it).
    """
    B, C = agree.shape
    K = max_draft
    A = np.concatenate([agree, np.zeros((B, K), bool)], axis=1)
    F = np.concatenate([conf, np.zeros((B, K))], axis=1)
    rows, ks = np.arange(B)[:, None], np.arange(K)[None]
    p = np.minimum(1, lengths).astype(np.int64)  # the first token comes with the prefill: no cycle
    th = np.broadcast_to(np.asarray(theta, np.float64), (B,)).copy()
    m = np.zeros(B)
    sim = SimulatedRun(*(np.zeros(B, np.int64) for _ in range(4)))
    while True:
        live = p < lengths
        if not live.any():
            return sim
        idx = p[:, None] + ks
        a, c = A[rows, idx], F[rows, idx]
        run = np.cumprod(c[:, : K - 1] >= th[:, None], axis=1).sum(axis=1)  # confident drafts before the last
        cap = np.maximum(lengths - p - 1, 0)
        n_draft = np.minimum(1 + run, np.minimum(K, cap))
        idle = (n_draft == cap) & (n_draft < K) & (run >= n_draft) & (n_draft > 0)
        n_acc = np.cumprod(a & (ks < n_draft[:, None]), axis=1).sum(axis=1)
        sim.cycles += live
        sim.draft_steps += live * (n_draft + idle)
        sim.drafted += live * n_draft
        sim.accepted += live * n_acc
        if adaptive:
            th2, m2 = update_threshold(th, m, n_acc, n_draft, K, xp=np)
            th, m = np.where(live, th2, th), np.where(live, m2, m)
        p = p + live * (n_acc + 1)


@dataclass
class Prediction:
    speedup: float
    max_draft: int
    theta: float
    acceptance: float  # accepted / drafted
    tokens_per_cycle: float
    draft_cost: float  # one draft step, in AR steps
    spec: DraftSpec = FULL


def predict(agree: np.ndarray, conf: np.ndarray, lengths: np.ndarray, mask: SkipMask, cost: CostModel,
            n_layers: int, drafts: Sequence[int], thetas: Sequence[float], spec: DraftSpec = FULL) -> Prediction:
    """Best predicted speedup over ``max_draft`` in ``drafts`` and initial θ in ``thetas`` for one mask and draft.

    Speedup = AR time / SSD time summed over the prompts (what aggregate tokens/s compares): AR spends one step
    per token, SSD per cycle its draft steps times the draft cost plus one verify pass.
    """
    d = cost.draft(mask, n_layers, spec)
    nt = len(thetas)
    A, F, Ls = np.tile(agree, (nt, 1)), np.tile(conf, (nt, 1)), np.tile(lengths, nt)
    th = np.repeat(np.asarray(thetas, np.float64), len(lengths))
    best = None
    for K in drafts:
        sim = simulate(A, F, Ls, K, th)
        for j, theta in enumerate(thetas):
            sl = slice(j * len(lengths), (j + 1) * len(lengths))
            cyc, steps = sim.cycles[sl].sum(), sim.draft_steps[sl].sum()
            speed = lengths.sum() / max(steps * d + cyc * cost.verify[K], 1e-9)
            if best is None or speed > best.speedup:
                acc = sim.accepted[sl].sum() / max(sim.drafted[sl].sum(), 1)
                best = Prediction(float(speed), int(K), float(theta), float(acc), float(lengths.sum() / max(cyc, 1)),
                                  float(d), spec)
    assert best is not None, "no max_draft values given"
    return best
