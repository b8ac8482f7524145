"""Weights that are exactly block-quantized values, found from their float32 bits: fewer bytes for the same model.

SmolLM2's weights come from a GGUF file: its layers are Q4_1 (per block of 32 inputs, a float16 scale ``d`` and
offset ``m``, a 4-bit code ``q`` per weight, ``w = d * q + m``) and its embedding Q8_0 (``w = d * q``, 8-bit ``q``),
dequantized to float32 once, at conversion. The float32 model *is* those values. ``find`` recovers, per block of 32
rows of a (K, N) matrix and column, a float16 scale (and offset) and the codes that reproduce every float32 weight
bit for bit; where any block does not, it returns None and the matrix stays float32. A float16 scale times a code of
at most 8 bits is exact in float32, so ``scale * code + offset`` has one rounding whether computed as numpy does
(``dequantize``) or as one FMA (the kernel). A kernel reading the codes thus multiplies the same float32 weights as
the float32 copy, from 5-6x fewer bytes, and gives the same results: nothing about the output changes, only its
speed (BENCHMARKS.md, "Exact 4-bit weights").
"""

from __future__ import annotations

import dataclasses

import numpy as np

BLOCK = 32  # rows (inputs) per block, as GGUF's Q4_1 and Q8_0
FORMATS = {"q4": (0, 15), "q8": (-128, 127)}  # code range per format; q4 has an offset, q8 does not


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A (K, N) matrix as ``fmt`` blocks: ``scale``/``offset`` (K // BLOCK, N) float32 (offset zeros for q8), ``codes``
    (K, N) int8 or uint8, such that ``dequantize`` gives the matrix's float32 values exactly."""

    fmt: str
    scale: np.ndarray
    offset: np.ndarray
    codes: np.ndarray


def dequantize(b: Blocks) -> np.ndarray:
    """The float32 (K, N) matrix of ``b``: per weight ``scale * code`` rounded, then ``+ offset`` rounded (q4)."""
    s = np.repeat(b.scale, BLOCK, axis=0)
    w = s * b.codes.astype(np.float32)
    return w + np.repeat(b.offset, BLOCK, axis=0) if b.fmt == "q4" else w


def find(w: np.ndarray, formats: tuple[str, ...] = tuple(FORMATS)) -> Blocks | None:
    """``w`` (K, N) float32 as the first of ``formats`` whose blocks reproduce all of it exactly, else None."""
    if w.ndim != 2 or w.dtype != np.float32 or w.shape[0] % BLOCK or not w.size or not np.isfinite(w).all():
        return None
    blocks = w.reshape(w.shape[0] // BLOCK, BLOCK, w.shape[1])
    for fmt in formats:
        found = _find(blocks, fmt)
        if found is not None:
            return found
    return None


def _half_neighbours(x: np.ndarray, reach: int = 2) -> list[np.ndarray]:
    """The float16 value nearest to each of ``x`` (>= 0), then those 1..reach float16 steps either side, as float32
    (GGUF stores scales and offsets as float16; the one that was stored is among these)."""
    with np.errstate(over="ignore"):  # past float16's range: inf, clipped to its largest value below
        h = x.astype(np.float16).view(np.uint16).astype(np.int32)
    out = [h]
    for i in range(1, reach + 1):
        out += [h + i, h - i]
    return [np.clip(c, 0, 0x7BFF).astype(np.uint16).view(np.float16).astype(np.float32) for c in out]


def _find(blocks: np.ndarray, fmt: str) -> Blocks | None:
    """Per (block, column): the first candidate scale whose codes reproduce the block; None unless all do (most
    must with the nearest float16 scale, else the matrix is not in ``fmt`` and the rest is not tried)."""
    lo, hi = FORMATS[fmt]
    if fmt == "q4":
        offset = blocks.min(axis=1)  # the smallest weight of a block is its code 0
        estimate = (blocks.max(axis=1) - offset) / np.float32(hi)
    else:
        offset = np.zeros(blocks.shape[::2], np.float32)
        estimate = np.abs(blocks).max(axis=1) / np.float32(hi)
    scale = np.zeros_like(offset)
    codes = np.zeros(blocks.shape, np.int16)
    todo = np.ones(offset.shape, bool)
    for n, cand in enumerate(_half_neighbours(estimate)):
        idx = np.nonzero(todo)
        d, m, b = cand[idx], offset[idx], blocks[idx[0], :, idx[1]]  # b: (todo blocks, BLOCK)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((b - m[:, None]) / d[:, None]), lo, hi)
        q = np.where(d[:, None] > 0, q, 0).astype(np.float32)
        back = d[:, None] * q
        if fmt == "q4":
            back = back + m[:, None]
        ok = (back == b).all(axis=1)
        if n == 0 and ok.mean() < 0.5:
            return None
        sel = tuple(i[ok] for i in idx)
        scale[sel] = d[ok]
        codes[sel[0], :, sel[1]] = q[ok]
        todo[sel] = False
        if not todo.any():
            dtype = np.uint8 if fmt == "q4" else np.int8
            return Blocks(fmt, scale, offset, codes.reshape(-1, blocks.shape[2]).astype(dtype))
    return None
