"""Self-speculative decoding (Draft & Verify): the model with skipped sublayers drafts, the full model verifies.

One ``step`` is a whole cycle, compiled inside the decode loop's ``lax.while_loop``: draft up to ``max_draft``
tokens (stopping early when the draft's top-1 probability falls below θ), verify them in one full-model forward
pass, keep the longest agreeing prefix plus one token from the full model, roll the cache back by length and adapt
θ. Greedy output equals plain greedy decoding; with sampling, speculative sampling keeps the distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxspec.config import SkipMask
from jaxspec.decode import Decoder, State
from jaxspec.draft_model import DraftSpec, draft_forward
from jaxspec.model import KVCache, Params, forward
from jaxspec.sampling import probs, sample_probs

Array = jax.Array


def accept_greedy(drafts: Array, n_draft: Array, logits: Array) -> tuple[Array, Array]:
    """Greedy verification. drafts (B, K); logits (B, K+1, V) of the full model over [last, drafts].

    Returns (n_acc (B,), tokens (B, K+1)): drafts agreeing with the full model's argmax, then its own token.
    """
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B, K+1)
    K = drafts.shape[1]
    ok = (drafts == target[:, :K]) & (jnp.arange(K)[None] < n_draft[:, None])
    n_acc = jnp.cumprod(ok, axis=1).sum(axis=1).astype(jnp.int32)
    return n_acc, target  # target[:, :n_acc] equals the accepted drafts; target[:, n_acc] is the bonus token


def accept_sample(key: Array, drafts: Array, n_draft: Array, q: Array, p: Array) -> tuple[Array, Array]:
    """Speculative sampling. q (B, K, V): draft distributions; p (B, K+1, V): target distributions.

    Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection j draw from
    normalize(max(p_j - q_j, 0)); if all n_draft are accepted draw the bonus token from p_{n_draft}.
    """
    B, K = drafts.shape
    k_u, k_x = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, (B, K))
    ok = (u * q_d < p_d) & (jnp.arange(K)[None] < n_draft[:, None])
    n_acc = jnp.cumprod(ok, axis=1).sum(axis=1).astype(jnp.int32)
    rows = jnp.arange(B)
    p_j = p[rows, n_acc]
    q_j = jnp.where((n_acc < n_draft)[:, None], q[rows, jnp.minimum(n_acc, K - 1)], 0.0)
    resid = jnp.maximum(p_j - q_j, 0.0)
    mass = resid.sum(axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_j)
    x = sample_probs(k_x, resid)
    tokens = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
    tokens = tokens.at[rows, n_acc].set(x)
    return n_acc, tokens


def update_threshold(theta: Array, m: Array, n_acc: Array, n_draft: Array, max_draft: int,
                     step: float = 0.01, target: float = 0.9, alpha: float = 0.5, beta: float = 0.9
                     ) -> tuple[Array, Array]:
    """The paper's adaptive θ rule, per row; rows that drafted nothing keep θ and m."""
    r = n_acc / jnp.maximum(n_draft, 1)
    m_new = alpha * m + (1 - alpha) * r
    goal = jnp.where(m_new < target, theta + step, jnp.where(n_draft >= max_draft, theta, theta - step))
    theta_new = beta * theta + (1 - beta) * goal
    drafted = n_draft > 0
    return jnp.where(drafted, theta_new, theta), jnp.where(drafted, m_new, m)


@dataclass(frozen=True)
class SpecDecoder(Decoder):
    """Draft with ``skip`` sublayers bypassed, verify with the full model; ``adaptive`` turns the θ rule on.

    ``draft_spec`` drafts with the cheap copy ``params.draft`` (``draft_model.with_draft``): low precision, narrow
    head. The copy travels inside the params pytree given to ``run``, so verify and prefill see the model as is.
    """

    skip: SkipMask = SkipMask()
    max_draft: int = 12
    adaptive: bool = True
    draft_spec: DraftSpec | None = None

    mode = "ssd"

    @property
    def extra(self) -> int:  # verify writes up to max_draft + 1 positions past the accepted length
        return self.max_draft + 1

    def init_stats(self, batch: int, max_new: int, theta: float = 0.6) -> dict[str, Array]:
        def z() -> Array:
            return jnp.zeros((batch,), jnp.int32)

        return {"drafted": z(), "accepted": z(), "verify_calls": z(), "draft_steps": z(),
                "theta": jnp.full((batch,), theta, jnp.float32), "m": jnp.zeros((batch,), jnp.float32),
                "theta_trace": jnp.zeros((batch, max_new), jnp.float32),
                "drafted_trace": jnp.zeros((batch, max_new), jnp.int32),
                "accepted_trace": jnp.zeros((batch, max_new), jnp.int32)}

    def draft(self, params: Params, state: State, key: Array) -> tuple[Array, Array, Array | None, Array, Array]:
        """Draft up to ``max_draft`` tokens per row; returns (drafts, n_draft, q or None, cache, steps run)."""
        B, K, V = state.last.shape[0], self.max_draft, self.cfg.vocab_size
        theta = state.stats["theta"]
        room = state.budget - state.n_out  # tokens this row may still emit; a cycle emits n_draft + 1 at most
        eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
        greedy = self.sampling.greedy

        def cond(c: tuple) -> Array:
            return (c[0] < K) & jnp.any(c[3])

        def body(c: tuple) -> tuple:
            d, cache, tok, active, drafts, q, n_draft, key = c
            active = active & (n_draft < room - 1)
            logits, cache = draft_forward(params, self.cfg, tok[:, None], cache, self.skip, self.draft_spec)
            logits = logits[:, 0]
            if greedy:
                nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                key, sub = jax.random.split(key)
                qd = probs(logits, self.sampling)
                nxt = sample_probs(sub, qd)
                q = q.at[:, d].set(qd)
            # Top-1 probability of the raw draft distribution: max softmax = 1 / sum(exp(logits - max)), one pass.
            top = jnp.max(logits, axis=-1, keepdims=True)
            conf = 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)
            drafts = drafts.at[:, d].set(jnp.where(active, nxt, 0))
            n_draft = n_draft + active
            active = active & (conf >= theta) & ~jnp.isin(nxt, eos)
            return d + 1, cache, nxt, active, drafts, q, n_draft, key

        q0 = None if greedy else jnp.zeros((B, K, V), jnp.float32)
        init = (jnp.int32(0), state.cache, state.last, ~state.done & (room > 1), jnp.zeros((B, K), jnp.int32), q0,
                jnp.zeros((B,), jnp.int32), key)
        d, cache, _, _, drafts, q, n_draft, _ = jax.lax.while_loop(cond, body, init)
        return drafts, n_draft, q, cache, d

    @property
    def verify_sizes(self) -> tuple[int, ...]:
        """Verify chunk lengths compiled (each is one more compiled forward pass): 2, 4, 8, ... below
        ``max_draft + 1``, then ``max_draft + 1``."""
        return tuple(t for t in (2, 4, 8, 16, 32) if t < self.max_draft + 1) + (self.max_draft + 1,)

    def verify(self, params: Params, chunk: Array, cache: KVCache, n_draft: Array, done: Array
               ) -> tuple[Array, KVCache]:
        """Full-model logits over ``chunk`` (B, K+1) = [last, drafts], run at the smallest compiled length that
        holds every live row's drafts (a multi-row matmul is not free on CPU), padded back to K+1."""
        sizes = self.verify_sizes
        need = jnp.max(jnp.where(done, 0, n_draft)) + 1
        idx = jnp.sum(jnp.asarray(sizes) < need)

        def run(t: int) -> Callable[[KVCache], tuple[Array, KVCache]]:
            def f(c: KVCache) -> tuple[Array, KVCache]:
                logits, c = forward(params, self.cfg, chunk[:, :t], c)
                return jnp.pad(logits, ((0, 0), (0, chunk.shape[1] - t), (0, 0))), c
            return f

        return jax.lax.switch(idx, [run(t) for t in sizes], cache)

    def step(self, params: Params, state: State) -> State:
        """One draft-verify cycle for every live row."""
        key, k_draft, k_verify = jax.random.split(state.key, 3)
        start = state.cache.lengths
        drafts, n_draft, q, cache, n_steps = self.draft(params, state, k_draft)
        chunk = jnp.concatenate([state.last[:, None], drafts], axis=1)
        logits, cache = self.verify(params, chunk, cache.replace(lengths=start), n_draft, state.done)
        if self.sampling.greedy:
            n_acc, tokens = accept_greedy(drafts, n_draft, logits)
        else:
            n_acc, tokens = accept_sample(k_verify, drafts, n_draft, q, probs(logits, self.sampling))
        live = ~state.done
        keep = jnp.arange(tokens.shape[1])[None] <= n_acc[:, None]
        new = self.stop(state, tokens, keep)
        rows = jnp.arange(tokens.shape[0])
        last = jnp.where(live, tokens[rows, n_acc], state.last)
        lengths = jnp.where(live, start + 1 + n_acc, start)
        st = dict(state.stats)
        theta, m = st["theta"], st["m"]
        if self.adaptive:
            theta, m = update_threshold(theta, m, n_acc, n_draft, self.max_draft)
        trace_idx = jnp.where(live, st["verify_calls"], st["theta_trace"].shape[1])
        st.update(
            drafted=st["drafted"] + jnp.where(live, n_draft, 0),
            accepted=st["accepted"] + jnp.where(live, jnp.minimum(n_acc, n_draft), 0),
            verify_calls=st["verify_calls"] + live,
            draft_steps=st["draft_steps"] + jnp.where(live, n_steps, 0),
            theta=jnp.where(live, theta, st["theta"]), m=jnp.where(live, m, st["m"]),
            theta_trace=st["theta_trace"].at[rows, trace_idx].set(theta, mode="drop"),
            drafted_trace=st["drafted_trace"].at[rows, trace_idx].set(n_draft, mode="drop"),
            accepted_trace=st["accepted_trace"].at[rows, trace_idx].set(jnp.minimum(n_acc, n_draft), mode="drop"),
        )
        return new.replace(cache=cache.replace(lengths=lengths), last=last, key=key, stats=st)
