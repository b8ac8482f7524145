"""The speedup self-speculative decoding should give, from measured pass costs and an acceptance rate.

The one prediction formula used everywhere (Leviathan et al. 2023, eq. 1; per-token acceptance ``alpha``
treated as independent): a cycle that drafts ``k`` tokens emits on average

    E(k) = (1 - alpha^(k+1)) / (1 - alpha)            (accepted drafts + the full model's own token)

tokens and costs ``k * c_draft + c_verify(k+1)`` AR steps, where ``c_draft`` is one draft step's cost and
``c_verify(T)`` one T-token full-model pass's cost, both relative to one AR decode step. So

    speedup(k) = E(k) / (k * c_draft + c_verify(k+1))

and the prediction is the best ``k`` among the verify lengths measured. Host overhead and the adaptive θ rule's
early stops are not modelled: a measured end-to-end speedup below this is implementation overhead.

Depth extrapolation (``layer_costs`` / ``mask_seconds``): a pass costs ``fixed + Σ kept attention + Σ kept MLP``
(embedding, head and loop in ``fixed``; every layer alike), so passes timed on an ``n``-layer truncation of a
model scale to its full depth and to any skip mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxspec.config import SkipMask


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens one cycle of ``k`` drafts emits at per-token acceptance ``alpha``."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, c_draft: float, c_verify: dict[int, float]) -> tuple[float, int]:
    """(best speedup over AR, its draft length k) for verify costs ``{T: cost}`` (T = k + 1 >= 2), all costs in
    AR-step units."""
    best = max((expected_tokens(alpha, t - 1) / ((t - 1) * c_draft + c), t - 1) for t, c in c_verify.items() if t >= 2)
    return best


@dataclass(frozen=True)
class LayerCosts:
    """Seconds of one pass split as ``fixed`` + per-layer ``attn`` + per-layer ``mlp``."""

    fixed: float
    attn: float
    mlp: float

    @classmethod
    def from_passes(cls, full: float, no_layers: float, attn_only: float, n_layers: int) -> LayerCosts:
        """From passes timed on ``n_layers`` layers: the full pass, every sublayer skipped, every MLP skipped."""
        attn = (attn_only - no_layers) / n_layers
        return cls(fixed=no_layers, attn=attn, mlp=(full - no_layers) / n_layers - attn)

    def seconds(self, n_layers: int, mask: SkipMask = SkipMask()) -> float:
        """A pass of an ``n_layers`` model whose draft skips ``mask``."""
        return self.fixed + (n_layers - len(mask.attn)) * self.attn + (n_layers - len(mask.mlp)) * self.mlp
