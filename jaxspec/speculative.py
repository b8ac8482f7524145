"""Speculative decoding on device: drafts copied from each row's own context (n-gram lookup) or drafted by the model
with skipped sublayers (Draft & Verify), verified by the full model.

One ``step`` is a whole cycle, compiled inside the decode loop's ``lax.while_loop``: propose drafts (an n-gram
continuation, or up to ``max_draft`` skip-model tokens, stopping early when the draft's top-1 probability falls below
θ), verify them in one full-model forward pass, keep the longest agreeing prefix plus one token from the full model,
roll the cache back by length and adapt θ. Greedy output equals plain greedy decoding; with sampling, speculative
sampling keeps the distribution (an n-gram draft is a point-mass proposal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import phrases
from jaxspec.config import SkipMask
from jaxspec.decode import Decoder, State
from jaxspec.draft_model import DraftSpec, draft_forward
from jaxspec.model import KVCache, Params, forward, pytree
from jaxspec.sampling import probs, sample_probs

Array = jax.Array


def accept_greedy(drafts: Array, n_draft: Array, logits: Array) -> tuple[Array, Array]:
    """Greedy verification. drafts (B, K); logits (B, K+1, V) of the full model over [last, drafts].

    Returns (n_acc (B,), tokens (B, K+1)): drafts agreeing with the full model's argmax, then its own token.
    """
    return accept_targets(drafts, n_draft, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def accept_targets(drafts: Array, n_draft: Array, target: Array) -> tuple[Array, Array]:
    """Greedy verification from the full model's argmax tokens ``target`` (B, K+1) (see ``accept_greedy``)."""
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


def update_threshold(theta: Array, ema: Array, n_acc: Array, n_draft: Array, max_draft: int,
                     step: float = 0.01, target: float = 0.9, alpha: float = 0.5, beta: float = 0.9,
                     xp: Any = jnp) -> tuple[Array, Array]:
    """The paper's adaptive θ rule, per row, on ``ema``, the moving average of the acceptance rate (the paper's m);
    rows that drafted nothing keep θ and ``ema``. ``xp``: the array module (``numpy`` for the skip search's
    simulator, which replays this same rule on the host)."""
    r = n_acc / xp.maximum(n_draft, 1)
    m_new = alpha * ema + (1 - alpha) * r
    goal = xp.where(m_new < target, theta + step, xp.where(n_draft >= max_draft, theta, theta - step))
    theta_new = beta * theta + (1 - beta) * goal
    drafted = n_draft > 0
    return xp.where(drafted, theta_new, theta), xp.where(drafted, m_new, ema)


DRAFTERS = ("skip", "ngram", "hybrid")


@pytree
class SpecStats:
    """Per-row speculative counters, (B,) unless noted; drafts are counted by source (copied from the context,
    from the phrase table, or drafted by the model)."""

    drafted_ngram: Array  # tokens proposed by n-gram lookup in the row's context
    accepted_ngram: Array  # ... of which the full model accepted
    drafted_phrase: Array  # tokens proposed by the phrase table (``params.phrases``) where the context had none
    accepted_phrase: Array
    drafted_model: Array  # tokens drafted by the skip-mask model
    accepted_model: Array
    verify_calls: Array  # full-model verify passes (= cycles)
    draft_steps: Array  # draft-model forward passes run (batched: every row pays the longest row's)
    theta: Array  # float32 draft-exit threshold θ (governs model drafts only)
    acceptance_ema: Array  # float32 exponential moving average of the model drafts' acceptance rate (θ rule)
    ngram_last_accepted: Array  # drafts accepted from the row's latest n-gram or phrase proposal (``adaptive_k``)
    theta_trace: Array  # (B, max_new) float32: θ after each cycle
    drafted_trace: Array  # (B, max_new): drafts (either source) per cycle
    accepted_trace: Array  # (B, max_new)

    @classmethod
    def create(cls, batch: int, max_new: int, theta: float = 0.6) -> SpecStats:
        def z(dtype: type = np.int32, *shape: int, fill: float = 0) -> Array:
            # Built on the host and put on the device: no per-shape compilation on a warm start; a fresh buffer
            # each (the decode loop donates the state).
            return jax.device_put(np.full((batch, *shape), fill, dtype))

        return cls(z(), z(), z(), z(), z(), z(), z(), z(), z(np.float32, fill=theta), z(np.float32), z(),
                   z(np.float32, max_new), z(np.int32, max_new), z(np.int32, max_new))

    @property
    def drafted(self) -> Array:
        return self.drafted_ngram + self.drafted_phrase + self.drafted_model

    @property
    def accepted(self) -> Array:
        return self.accepted_ngram + self.accepted_phrase + self.accepted_model

    def summary(self, row: int | None = None) -> dict[str, int | float]:
        """Counters summed over rows (or of one ``row``), with acceptance rate, accepted drafts per verify and the
        mean θ: what the CLIs print and batch jobs record."""
        def tot(a: Array) -> int:
            return int(np.sum(np.asarray(a) if row is None else np.asarray(a)[row]))

        d, a, c = tot(self.drafted), tot(self.accepted), tot(self.verify_calls)
        theta = np.asarray(self.theta)
        return {"drafted": d, "accepted": a, "drafted_ngram": tot(self.drafted_ngram),
                "accepted_ngram": tot(self.accepted_ngram), "drafted_phrase": tot(self.drafted_phrase),
                "accepted_phrase": tot(self.accepted_phrase), "drafted_model": tot(self.drafted_model),
                "accepted_model": tot(self.accepted_model), "verify_calls": c,
                "acceptance_rate": round(a / d, 4) if d else 0.0, "mean_accepted": round(a / c, 3) if c else 0.0,
                "theta": round(float(theta.mean() if row is None else theta[row]), 4)}


def ngram_propose(history: Array, length: Array, n_min: int, n_max: int, k: int) -> tuple[Array, Array]:
    """Prompt lookup over each row's token history: the last n tokens (n from ``n_max`` down to ``n_min``, longest
    match wins) are searched in ``history[b, :length[b]]``; at their most recent earlier occurrence the up to ``k``
    tokens that followed are proposed. Returns (drafts (B, k), count (B,)), count 0 where nothing matches.

    One vectorized pass: ``match`` holds, for every end position e, whether ``history[e-t] == history[L-1-t]`` for
    all t so far; it costs O(n_max * capacity) elementwise ops per row (see BENCHMARKS.md for its cost at 4k).
    """
    B, C = history.shape
    pos = jnp.arange(C, dtype=jnp.int32)[None]
    last = length[:, None] - 1  # index of the newest token
    match = jnp.ones((B, C), bool)
    best = jnp.full((B,), -1, jnp.int32)
    for t in range(n_max):
        shifted = jnp.pad(history[:, : C - t], ((0, 0), (t, 0)), constant_values=-1)  # shifted[e] = history[e - t]
        tail = jnp.take_along_axis(history, jnp.maximum(last - t, 0), axis=1)  # history[L-1-t]
        match = match & (shifted == tail)
        if t + 1 >= n_min:  # a match of length t+1 ending at e < L-1 (so a token follows it), suffix inside history
            ok = match & (pos < last) & (last - t >= 0)
            end = jnp.max(jnp.where(ok, pos, -1), axis=1)
            best = jnp.where(end >= 0, end, best)  # longer matches come later and win
    idx = jnp.clip(best[:, None] + 1 + jnp.arange(k, dtype=jnp.int32)[None], 0, C - 1)
    count = jnp.where(best >= 0, jnp.minimum(k, last[:, 0] - best), 0)
    drafts = jnp.where(jnp.arange(k)[None] < count[:, None], jnp.take_along_axis(history, idx, axis=1), 0)
    return drafts, count.astype(jnp.int32)


@dataclass(frozen=True)
class SpecDecoder(Decoder):
    """Speculative decoding with a draft source and full-model verification.

    ``drafter``: ``skip`` drafts with the ``skip`` sublayers bypassed (θ-adaptive when ``adaptive``); ``ngram``
    copies up to ``ngram_k`` tokens that followed the latest earlier occurrence of the row's last ``ngram_min`` ..
    ``ngram_max`` tokens, or, where the context has none and ``params.phrases`` holds phrase tables, the table's
    continuation of them (``phrases``); ``hybrid`` uses those proposals where a row has one and the skip draft
    elsewhere.
    A row with no proposal verifies just its last token: the cycle is then a plain decoding step. With
    ``adaptive_k`` a row proposes at most ``ngram_k // 2`` tokens, or ``ngram_k`` while its latest proposal had at
    least ``ngram_k // 2`` accepted: long copies are taken in long verifies, and a row whose copies fail pays for
    the short ones (with exact 4-bit weights a verify of 5 tokens costs ~1.7 decode steps on the 2-core CPU, of 3
    ~1.4). Off by default here; SmolLM2's profile turns it on (k = 4: proposals of 2, then 4; BENCHMARKS.md "Exact
    4-bit weights").

    ``draft_spec`` makes model drafts with the cheap copy ``params.draft`` (``draft_model.with_draft``): low
    precision, narrow head. The copy travels inside the params pytree given to ``run``, so verify and prefill see
    the model as is.
    """

    skip: SkipMask = SkipMask()
    max_draft: int = 12
    adaptive: bool = True
    drafter: str = "skip"
    ngram_min: int = 2
    ngram_max: int = 4
    ngram_k: int = 8
    adaptive_k: bool = False  # proposals of k // 2 tokens, k after one with k // 2 accepted
    draft_spec: DraftSpec | None = None

    mode = "ssd"

    def __post_init__(self) -> None:
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        if not 1 <= self.max_draft <= 64:
            raise ValueError(f"max_draft must be in 1..64, got {self.max_draft}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError(f"n-gram lengths need 1 <= ngram_min <= ngram_max <= 16, got {self.ngram_min}.."
                             f"{self.ngram_max}")
        if not 1 <= self.ngram_k <= 64 or self.ngram_k + 1 >= self.cfg.max_seq_len:
            raise ValueError(f"ngram_k must be in 1..64 and below the context of {self.cfg.max_seq_len} tokens, "
                             f"got {self.ngram_k}")

    @property
    def uses_model(self) -> bool:
        return self.drafter != "ngram"

    @property
    def needs_history(self) -> bool:  # type: ignore[override]
        return self.drafter != "skip"

    @property
    def slots(self) -> int:
        """Most tokens drafted per cycle (the verify chunk holds ``slots + 1``)."""
        return max(self.max_draft if self.uses_model else 0, self.ngram_k if self.needs_history else 0)

    @property
    def extra(self) -> int:  # verify writes up to slots + 1 positions past the accepted length
        return self.slots + 1

    def init_stats(self, batch: int, max_new: int, theta: float = 0.6) -> SpecStats:
        return SpecStats.create(batch, max_new, theta)

    def draft_model(self, params: Params, state: State, key: Array, active: Array
                    ) -> tuple[Array, Array, Array | None, KVCache, Array]:
        """Draft up to ``max_draft`` tokens per ``active`` row with the skip-mask model; returns (drafts, n_draft,
        q or None, cache, steps run). Zero loop iterations when no row is active."""
        B, K, V = state.last.shape[0], self.max_draft, self.cfg.vocab_size
        theta = state.stats.theta
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
        init = (jnp.int32(0), state.cache, state.last, active & ~state.done & (room > 1), jnp.zeros((B, K), jnp.int32),
                q0, jnp.zeros((B,), jnp.int32), key)
        d, cache, _, _, drafts, q, n_draft, _ = jax.lax.while_loop(cond, body, init)
        return drafts, n_draft, q, cache, d

    def draft(self, params: Params, state: State, key: Array) -> tuple[Array, Array, Array, Array, Array | None,
                                                                         KVCache, Array]:
        """Every row's proposal for this cycle: (drafts (B, slots), n_draft, n_ngram (drafts copied by n-gram
        lookup in the context), n_phrase (drafts from the phrase table), q (B, slots, V) draft distributions or None
        when greedy, cache, model draft steps). A row's drafts come from one source."""
        B, K, V = state.last.shape[0], self.slots, self.cfg.vocab_size
        live = ~state.done
        room = jnp.where(live, state.budget - state.n_out, 0)
        drafts, n_ng, n_ph = jnp.zeros((B, K), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32)
        if self.needs_history:
            length = state.cache.lengths + 1
            drafts, n_ng = ngram_propose(state.history, length, self.ngram_min, self.ngram_max, self.ngram_k)
            if params.phrases is not None:
                d_ph, n_ph = phrases.lookup(params.phrases, state.history, length, self.ngram_k)
                n_ph = jnp.where(n_ng > 0, 0, n_ph)
                drafts = jnp.where((n_ph > 0)[:, None], d_ph, drafts)
            cap = room - 1
            if self.adaptive_k:  # k // 2 tokens, k while the row's copies are being accepted
                long = state.stats.ngram_last_accepted >= self.ngram_k // 2
                cap = jnp.minimum(cap, jnp.where(long, self.ngram_k, self.ngram_k // 2))
            n_ng, n_ph = jnp.maximum(jnp.minimum(n_ng, cap), 0), jnp.maximum(jnp.minimum(n_ph, cap), 0)
            drafts = jnp.pad(drafts, ((0, 0), (0, K - self.ngram_k)))
        n_draft, cache, steps = n_ng + n_ph, state.cache, jnp.int32(0)
        q = None if self.sampling.greedy else jax.nn.one_hot(drafts, V, dtype=jnp.float32)  # point-mass proposals
        if self.uses_model:
            d_m, n_m, q_m, cache, steps = self.draft_model(params, state, key, n_draft == 0)
            pad = ((0, 0), (0, K - self.max_draft))
            from_model = (n_m > 0)[:, None]
            drafts = jnp.where(from_model, jnp.pad(d_m, pad), drafts)
            n_draft = n_draft + n_m
            if q is not None:
                q = jnp.where(from_model[..., None], jnp.pad(q_m, (*pad, (0, 0))), q)
        return drafts, n_draft, n_ng, n_ph, q, cache, steps

    @property
    def verify_sizes(self) -> tuple[int, ...]:
        """Verify chunk lengths compiled (each is one more compiled forward pass): 1, 2, 4, 8, ... below
        ``slots + 1``, then ``slots + 1``; for the n-gram drafter with a fixed k only 1 and ``k + 1`` (a lookup
        proposes all k tokens or none nearly always: the middle widths measured no faster, and each makes the
        persisted decode loop slower to load, BENCHMARKS.md "Warm start"); with ``adaptive_k`` also ``k // 2 + 1``."""
        if self.drafter == "ngram":
            short = (self.ngram_k // 2 + 1,) if self.adaptive_k and self.ngram_k > 1 else ()
            return (1, *short, self.slots + 1)
        return tuple(t for t in (1, 2, 4, 8, 16, 32) if t < self.slots + 1) + (self.slots + 1,)

    def verify(self, params: Params, chunk: Array, cache: KVCache, n_draft: Array, done: Array
               ) -> tuple[Array, KVCache]:
        """Full-model logits over ``chunk`` (B, K+1) = [last, drafts] (greedy: their argmax token ids (B, K+1)), run
        at the smallest compiled length that holds every live row's drafts (a multi-row matmul is not free on CPU),
        padded back to K+1.

        The length is picked by one while loop per compiled length that runs once or never, not by ``lax.switch``:
        XLA copies every cache buffer a conditional branch updates (the whole KV cache, each cycle), while a loop
        updates its carried cache in place."""
        sizes = self.verify_sizes
        need = jnp.max(jnp.where(done, 0, n_draft)) + 1
        idx = jnp.sum(jnp.asarray(sizes) < need)
        B, T = chunk.shape
        greedy = self.sampling.greedy  # greedy needs only the argmax tokens: carry (B, T) ids, not (B, T, vocab)
        logits = jnp.zeros((B, T) if greedy else (B, T, self.cfg.vocab_size), jnp.int32 if greedy else jnp.float32)
        for i, t in enumerate(sizes):
            def body(c: tuple[Array, Array, KVCache], t: int = t) -> tuple[Array, Array, KVCache]:
                out, cache = forward(params, self.cfg, chunk[:, :t], c[2])
                if greedy:
                    out = jnp.argmax(out, axis=-1).astype(jnp.int32)
                pad = ((0, 0), (0, T - t)) + (() if greedy else ((0, 0),))
                return jnp.bool_(False), jnp.pad(out, pad), cache

            _, logits, cache = jax.lax.while_loop(lambda c: c[0], body, (idx == i, logits, cache))
        return logits, cache

    def step(self, params: Params, state: State) -> State:
        """One draft-verify cycle for every live row."""
        key, k_draft, k_verify = jax.random.split(state.key, 3)
        start = state.cache.lengths
        drafts, n_draft, n_ng, n_ph, q, cache, n_steps = self.draft(params, state, k_draft)
        chunk = jnp.concatenate([state.last[:, None], drafts], axis=1)
        logits, cache = self.verify(params, chunk, cache.replace(lengths=start), n_draft, state.done)
        if self.sampling.greedy:
            n_acc, tokens = accept_targets(drafts, n_draft, logits)
        else:
            n_acc, tokens = accept_sample(k_verify, drafts, n_draft, q, probs(logits, self.sampling))
        live = ~state.done
        keep = jnp.arange(tokens.shape[1])[None] <= n_acc[:, None]
        new = self.append(state, tokens, keep)
        rows = jnp.arange(tokens.shape[0])
        last = jnp.where(live, tokens[rows, n_acc], state.last)
        lengths = jnp.where(live, start + 1 + n_acc, start)
        history = state.history
        if history is not None:  # the accepted tokens and the bonus token follow ``last`` at position start
            at = jnp.where(keep & live[:, None], start[:, None] + 1 + jnp.arange(tokens.shape[1])[None],
                           history.shape[1])
            history = history.at[rows[:, None], at].set(tokens, mode="drop")
        st: SpecStats = state.stats
        acc = jnp.where(live, jnp.minimum(n_acc, n_draft), 0)
        n_draft = jnp.where(live, n_draft, 0)
        n_ng, n_ph = jnp.where(live, n_ng, 0), jnp.where(live, n_ph, 0)
        acc_ng, acc_ph = jnp.minimum(acc, n_ng), jnp.minimum(acc, n_ph)  # a row's drafts have one source
        n_model, acc_model = n_draft - n_ng - n_ph, acc - acc_ng - acc_ph
        theta, ema = st.theta, st.acceptance_ema
        if self.adaptive and self.uses_model:  # θ follows the model drafts only; rows that copied keep theirs
            theta, ema = update_threshold(theta, ema, acc_model, n_model, self.max_draft)
        trace_idx = jnp.where(live, st.verify_calls, st.theta_trace.shape[1])
        st = st.replace(
            drafted_ngram=st.drafted_ngram + n_ng, accepted_ngram=st.accepted_ngram + acc_ng,
            drafted_phrase=st.drafted_phrase + n_ph, accepted_phrase=st.accepted_phrase + acc_ph,
            drafted_model=st.drafted_model + n_model, accepted_model=st.accepted_model + acc_model,
            verify_calls=st.verify_calls + live, draft_steps=st.draft_steps + jnp.where(live, n_steps, 0),
            theta=jnp.where(live, theta, st.theta), acceptance_ema=jnp.where(live, ema, st.acceptance_ema),
            ngram_last_accepted=jnp.where(n_ng + n_ph > 0, acc_ng + acc_ph, st.ngram_last_accepted),
            theta_trace=st.theta_trace.at[rows, trace_idx].set(theta, mode="drop"),
            drafted_trace=st.drafted_trace.at[rows, trace_idx].set(n_draft, mode="drop"),
            accepted_trace=st.accepted_trace.at[rows, trace_idx].set(acc, mode="drop"),
        )
        return new.replace(cache=cache.replace(lengths=lengths), last=last, key=key, stats=st, history=history)
