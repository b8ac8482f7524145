"""A tiny LLaMA trained in seconds with optax, so tests see real logit margins and real draft acceptance.

Sequences are arithmetic progressions modulo the vocabulary (start a, stride s in 1..4): predicting the next token
needs attention to the previous two, so skipping sublayers degrades the draft without destroying it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspec.config import PRESETS, Config
from jaxspec.model import KVCache, Params, forward, init_params

CFG: Config = PRESETS["tiny"].replace(eos_ids=(0,))


def batch(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
    a = rng.integers(3, vocab, size=(n, 1))
    s = rng.integers(1, 5, size=(n, 1))
    return ((a + s * np.arange(length)[None]) % (vocab - 3) + 3).astype(np.int32)


def progression(start: int, stride: int, length: int, vocab: int = CFG.vocab_size) -> list[int]:
    return [int((start + stride * i) % (vocab - 3) + 3) for i in range(length)]


@functools.cache
def trained(cfg: Config = CFG, steps: int = 200, seed: int = 0) -> Params:
    """Train ``cfg`` on progressions (about 10 s on 2 cores); cached per process."""
    params = init_params(cfg, jax.random.key(seed))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p: Params, toks: jax.Array) -> jax.Array:
        logits, _ = forward(p, cfg, toks[:, :-1], KVCache.create(cfg, toks.shape[0], toks.shape[1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @jax.jit
    def update(p: Params, s: optax.OptState, toks: jax.Array) -> tuple[Params, optax.OptState, jax.Array]:
        loss, g = jax.value_and_grad(loss_fn)(p, toks)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, state, loss = update(params, state, jnp.asarray(batch(rng, 16, 32, cfg.vocab_size)))
    assert float(loss) < 1.0, f"tiny model did not train (loss {float(loss):.3f})"
    return params


def gguf_values(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` (K, N) as llama.cpp's ``qtype`` ("Q4_1", "Q8_0") quantization leaves it, blocks along K (a GGUF
    tensor's rows are W's columns), dequantized to float32 as ``convert`` does for a GGUF checkpoint."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    return np.ascontiguousarray(dequantize(quantize(np.ascontiguousarray(w.T), t), t).T, np.float32)


def gguf_quantized(params: Params) -> Params:
    """``params`` with every layer matrix's values Q4_1 ones and the head's Q8_0 ones (blocks along the contracted
    inputs), as in SmolLM2's GGUF."""
    def q4(w: jax.Array, n_in: int = 1) -> jax.Array:
        a = np.asarray(w)
        return jnp.asarray(gguf_values(a.reshape(int(np.prod(a.shape[:n_in])), -1), "Q4_1").reshape(a.shape))

    layers = tuple(ly.replace(**{k: q4(getattr(ly, k), 2 if k == "wo" else 1) for k in ly.__dataclass_fields__
                                 if not k.endswith("norm")}) for ly in params.layers)
    head = jnp.asarray(gguf_values(np.asarray(params.lm_head), "Q8_0"))
    return params.replace(layers=layers, lm_head=head)
