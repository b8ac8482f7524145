"""Phrase tables: n-gram drafts from the model's own text, for the cycles whose context has nothing to copy.

A row's context (prompt + output) gives the n-gram drafter free drafts only where the text repeats itself; elsewhere
a cycle is a plain decoding step. A phrase table adds drafts there: for each n-gram (n = 3, then 2) that the model's
own greedy outputs on calibration prompts continue mostly one way, the tokens that followed it. No extra model and
no training: token ids (SmolLM2's: 267 KB compressed) built once per model (``build``) and looked up inside the
compiled cycle (``lookup``: one hashed gather per table). Verification keeps the output lossless whatever the table
says.

Replayed on SmolLM2's greedy outputs (BENCHMARKS.md, "Phrase tables"), a table from 120 calibration answers
raised the tokens per cycle of the n-gram drafter on code by a quarter; the measured speedups are there too.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.files import atomic_write
from jaxspec.model import pytree

Array = jax.Array
SUFFIX = ".phrases.npz"
_MULT = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C], np.uint32)


@pytree
class PhraseTable:
    """One n's table as an open hash of ``S`` (a power of two) slots; an entry sits at ``slot(its key)``."""

    keys: Array  # (S, n) int32: the n tokens an entry follows (-1 in an empty slot)
    conts: Array  # (S, k) int32: the tokens that followed them
    counts: Array  # (S,) int32: how many of ``conts`` are real (0: empty slot)


def slot(tokens: Array | np.ndarray, size: int) -> Array | np.ndarray:
    """The slot of each key ``tokens`` (..., n) in a table of ``size`` (a power of two) slots: a multiplicative
    hash in wrapping uint32 arithmetic, the same on the host (NumPy) and on the device."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    n, bits = tokens.shape[-1], int(size).bit_length() - 1
    h = (tokens.astype(xp.uint32) * xp.asarray(_MULT[:n])).sum(axis=-1, dtype=xp.uint32)
    return (h >> (32 - bits)).astype(xp.int32) if bits else xp.zeros(h.shape, xp.int32)


def build(seqs: Iterable[Sequence[int]], ns: Sequence[int] = (3, 2), k: int = 8, min_count: int = 1,
          majority: float = 0.5) -> tuple[PhraseTable, ...]:
    """Host tables (NumPy arrays) from token sequences, longest n first: an n-gram enters when its most frequent
    next token follows it at least ``min_count`` times and in at least ``majority`` of its occurrences; its entry is
    the latest continuation (up to ``k`` tokens) that starts with that token. Two keys in one slot: the more frequent
    one stays."""
    if not ns or min(ns) < 1 or max(ns) > len(_MULT) or k < 1:
        raise ValueError(f"phrase tables take n in 1..{len(_MULT)} and k >= 1, got n={list(ns)}, k={k}")
    seqs = [list(map(int, s)) for s in seqs]
    tables = []
    for n in sorted(set(ns), reverse=True):
        nxt: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        cont: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for s in seqs:
            for e in range(n - 1, len(s) - 1):
                key = tuple(s[e - n + 1 : e + 1])
                nxt[key][s[e + 1]] += 1
                cont[key, s[e + 1]] = s[e + 1 : e + 1 + k]
        entries = []
        for key, c in nxt.items():
            tok, cnt = c.most_common(1)[0]
            if cnt >= min_count and cnt >= majority * sum(c.values()):
                entries.append((cnt, key, cont[key, tok]))
        size = 1 << max(4, (2 * len(entries) - 1).bit_length())
        keys, conts, counts = np.full((size, n), -1, np.int32), np.zeros((size, k), np.int32), np.zeros(size, np.int32)
        entries.sort(key=lambda e: -e[0])
        where = slot(np.asarray([e[1] for e in entries], np.int32).reshape(-1, n), size)
        for (_, key, c), s in zip(entries, where.tolist(), strict=True):
            if counts[s] == 0:
                keys[s], conts[s, : len(c)], counts[s] = key, c, len(c)
        tables.append(PhraseTable(keys, conts, counts))
    return tuple(tables)


def lookup(tables: Sequence[PhraseTable], history: Array, length: Array, k: int) -> tuple[Array, Array]:
    """Each row's phrase draft after ``history[b, :length[b]]``: the entry of its last n tokens in the first table
    (longest n) that has one. Returns (drafts (B, k), count (B,)), count 0 where no table has the row's n-gram."""
    B, C = history.shape
    drafts, count = jnp.zeros((B, k), jnp.int32), jnp.zeros((B,), jnp.int32)
    for t in tables:
        n, size, kt = t.keys.shape[1], t.keys.shape[0], t.conts.shape[1]
        tail = jnp.take_along_axis(history, jnp.clip(length[:, None] - n + jnp.arange(n)[None], 0, C - 1), axis=1)
        s = slot(tail, size)
        hit = jnp.all(t.keys[s] == tail, axis=1) & (length >= n) & (count == 0)
        conts = t.conts[s][:, :k] if kt >= k else jnp.pad(t.conts[s], ((0, 0), (0, k - kt)))
        drafts = jnp.where(hit[:, None], conts, drafts)
        count = jnp.where(hit, jnp.minimum(t.counts[s], k), count)
    return drafts, count


def save(path: str | Path, tables: Sequence[PhraseTable]) -> None:
    """Write ``tables`` to ``path`` (an ``.npz``, atomically)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"{f}{i}": np.asarray(getattr(t, f)) for i, t in enumerate(tables)
                     for f in ("keys", "conts", "counts")})
    atomic_write(path, buf.getvalue())


def load(path: str | Path, vocab_size: int) -> tuple[PhraseTable, ...]:
    """The tables in ``path`` on the default device; ``ValueError`` for a file that is not one, or whose tokens fall
    outside a vocabulary of ``vocab_size``."""
    try:
        with np.load(path) as z:
            tables = []
            for i in range(len(z.files) // 3):
                keys, conts, counts = (np.asarray(z[f"{f}{i}"], np.int32) for f in ("keys", "conts", "counts"))
                size = keys.shape[0]
                if (keys.ndim != 2 or conts.ndim != 2 or counts.shape != (size,) or conts.shape[0] != size
                        or size & (size - 1) or not 0 <= counts.min() <= counts.max() <= conts.shape[1]):
                    raise ValueError("malformed table")
                if keys.max(initial=-1) >= vocab_size or conts.max(initial=0) >= vocab_size or conts.min() < 0:
                    raise ValueError(f"token ids outside the model's vocabulary of {vocab_size}")
                tables.append(PhraseTable(*(jax.device_put(a) for a in (keys, conts, counts))))
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a phrase table ({e})") from None
    if not tables:
        raise ValueError(f"{path}: not a phrase table (no tables in it)")
    return tuple(sorted(tables, key=lambda t: -t.keys.shape[1]))
