"""Logit warping (temperature, top-k, top-p) and token sampling; greedy when temperature is 0."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxspec import validate

Array = jax.Array


@dataclass(frozen=True)
class Sampling:
    """Static sampling settings (hashable, so a jit static argument). temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:  # finite, in range: as validate.RULES says wherever the values come from
        for name in ("temperature", "top_k", "top_p"):
            validate.value(name, getattr(self, name), name.replace("_", "-"))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: Array, s: Sampling) -> Array:
    """The distribution tokens are drawn from: softmax of warped logits, float32, shape of ``logits``.

    Greedy (temperature 0) gives the one-hot of the argmax, so speculative acceptance needs no special case.
    """
    logits = logits.astype(jnp.float32)
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / s.temperature
    neg = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < s.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.nn.softmax(logits, axis=-1)


def sample(key: Array, logits: Array, s: Sampling) -> Array:
    """Draw one token per row of ``logits`` (..., vocab) → int32 (...)."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_probs(key, probs(logits, s))


def sample_probs(key: Array, p: Array) -> Array:
    """Draw from explicit probabilities (..., vocab) → int32 (...)."""
    return jax.random.categorical(key, jnp.log(jnp.maximum(p, 1e-38)) + jnp.where(p > 0, 0.0, -jnp.inf),
                                  axis=-1).astype(jnp.int32)
