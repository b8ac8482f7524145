"""Skip masks as points of {0, 1}^(2 L) for the optimizer, and the starting points of a search."""

from __future__ import annotations

from collections.abc import Sequence

from jaxspec.config import SkipMask
from jaxspec.profile import PUBLISHED_MASKS


def mask_to_x(mask: SkipMask, n_layers: int) -> list[int]:
    """One binary coordinate per sublayer: attention 0..L-1, then MLP 0..L-1 (1 = skipped)."""
    return [int(i in mask.attn) for i in range(n_layers)] + [int(i in mask.mlp) for i in range(n_layers)]


def x_to_mask(x: Sequence[int]) -> SkipMask:
    n = len(x) // 2
    return SkipMask(attn=tuple(i for i in range(n) if x[i]), mlp=tuple(i for i in range(n) if x[n + i]))


def starting_points(n_layers: int) -> dict[str, SkipMask]:
    """No skipping; every other middle layer (attention + MLP, or attention only); the paper's masks that fit."""
    middle = tuple(range(2, n_layers - 2))[1::2] if n_layers > 4 else tuple(range(1, n_layers))[::2]
    starts = {"none": SkipMask(), "every-other-middle": SkipMask(attn=middle, mlp=middle),
              "every-other-middle-attn": SkipMask(attn=middle)}
    starts.update({f"preset:{k}": m for k, (n, m) in PUBLISHED_MASKS.items() if n == n_layers})
    return starts
