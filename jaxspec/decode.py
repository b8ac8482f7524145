"""Decode loops: prefill, then a jitted ``lax.while_loop`` of decode steps over a state dataclass.

Convention: ``state.last`` holds each row's newest token, which is *not* yet in the cache. A step feeds it (plus,
for speculative decoding, drafts) and appends what it accepts to ``state.out``. Autoregressive (``ar``) and
self-speculative (``ssd``, see ``speculative.py``) decoding share the state, prefill and driver.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import aot
from jaxspec.config import Config
from jaxspec.model import KVCache, Layer, Params, block, forward, layers_for, logits_of, pytree, rms_norm
from jaxspec.sampling import Sampling, sample

Array = jax.Array

# Prefill chunk lengths, one compilation each (small: one layer's executable), at most 1.5x apart: prefill is
# compute-bound, so every padding token costs what a real one does. Longer prompts go in 1024s, then a bucket.
PREFILL_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SCAN_FROM = 768  # chunks this long (or of the largest bucket) run the layers as a scan, shorter ones per layer
MIN_WINDOW = 256  # smallest cache capacity; it doubles as the sequence grows (attention reads the whole capacity)


@pytree
class State:
    cache: KVCache
    last: Array  # (B,) newest token, not yet in the cache
    out: Array  # (B, max_new) generated tokens
    n_out: Array  # (B,) how many of ``out`` are filled
    done: Array  # (B,) bool
    budget: Array  # (B,) max new tokens per row
    key: Array
    stats: Any  # decoder-owned pytree of per-row counters (``speculative.SpecStats``; None for AR)
    history: Array | None = None  # (B, capacity) prompt + accepted tokens, [0, cache.lengths] valid (n-gram drafts)


def bucket(n: int) -> int:
    """The length an ``n``-token prompt is padded to: whole chunks of the largest bucket, then the smallest bucket
    that holds the rest (so ``write_tokens`` runs only bucket-length chunks)."""
    chunk = PREFILL_BUCKETS[-1]
    whole, rest = divmod(n, chunk)
    return whole * chunk + (next(b for b in PREFILL_BUCKETS if b >= rest) if rest or not whole else 0)


def capacity(decoder: Decoder, tokens: int) -> int:
    """Cache slots a request of ``tokens`` (prompt + new) needs with ``decoder``: its scratch past the accepted
    length included, rounded by ``cache_len``, at most the model's context plus that scratch."""
    return min(cache_len(tokens, 0, decoder.extra), decoder.cfg.max_seq_len + decoder.extra)


def cache_len(prompt_len: int, max_new: int, extra: int = 0) -> int:
    """Cache capacity for a request: rounded up to a multiple of 256 to bound recompilation."""
    return -(-(prompt_len + max_new + extra) // 256) * 256


def window_len(need: int, full: int, smallest: int = MIN_WINDOW) -> int:
    """Cache capacity for ``need`` slots: ``smallest`` doubled until it holds them, at most ``full`` (``smallest``
    0: ``full`` at once). Attention reads the whole capacity, so decode works on a cache at most twice the live
    length instead of one sized for the whole request, at one compilation per doubling."""
    if smallest <= 0:
        return full
    w = smallest
    while w < need:
        w *= 2
    return max(min(w, full), need)


@dataclass(frozen=True)
class Decoder:
    """Autoregressive decoding: config, sampling and stop ids. Frozen and hashable, so ``run`` is jitted once per
    shape; ``speculative.SpecDecoder`` subclasses it and overrides ``step``."""

    cfg: Config
    sampling: Sampling = Sampling()
    eos_ids: tuple[int, ...] = ()

    mode = "ar"
    extra = 0  # cache slots needed beyond prompt + new tokens (speculative scratch)
    needs_history = False  # whether the state carries each row's token history (n-gram drafting)

    def init_stats(self, batch: int, max_new: int) -> Any:
        """Per-row counters carried in the state (a pytree); AR keeps none."""
        return None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """The empty cache ``prefill`` fills (``sharding.MeshDecoder`` builds it sharded): zeros made on the host and
        put on the device in one call, no tracing or compilation (16 ms through ``eval_shape``). One host array per
        device array: on CPU the transfer aliases it."""
        shape, dt = KVCache.shape(self.cfg, batch, max_len), jnp.dtype(self.cfg.dtype)
        k, v, lengths = jax.device_put([np.zeros(shape, dt), np.zeros(shape, dt), np.zeros((batch,), np.int32)])
        return KVCache(k=k, v=v, lengths=lengths)

    def prefill_cache(self, params: Params, tokens: Array, cache: KVCache, lengths: Array, fresh: bool = False
                      ) -> tuple[Array, KVCache]:
        """Write prompt ``tokens`` (B, T) into ``cache``; row lengths become ``lengths``. Returns the chunk's
        final-norm hidden states (B, T, dim), as ``model.hidden`` does, and the cache. ``fresh``: every row's cache
        is empty, so the chunk attends over its own T slots only, not the whole window.

        One small executable per chunk shape runs each layer in turn (a dispatch per layer), not one executable of
        the whole model: as fast up to 512-token chunks, but a thirtieth of the code to compile, and to load and first
        run on a warm start (SmolLM2, 32 tokens: 0.2 s instead of 1.0 s; `benchmarks/bench_exec_size.py`). Chunks of
        ``SCAN_FROM`` tokens or more run a ``lax.scan`` over the layers instead: at 768-1024 tokens one layer's
        executable runs 6-25% slower than the same layer inside a scan (BENCHMARKS.md, "Prefill, session 10"), and
        a scan is as small to load as one layer."""
        if tokens.shape[1] >= min(SCAN_FROM, PREFILL_BUCKETS[-1]):
            return aot.call(_prefill_scan, params, self.cfg, tokens, cache, lengths, fresh, static=(1, 5))
        x, k, v = aot.call(_embed, params.embed, tokens), cache.k, cache.v
        layers = layers_for(params, tokens.size)
        for i, layer in zip(jax.device_put([np.int32(i) for i in range(len(layers))]), layers, strict=True):
            x, k, v = aot.call(_prefill_layer, layer, self.cfg, x, k, v, i, cache.lengths, fresh, static=(1, 7))
        return aot.call(_final_norm, params.norm, self.cfg, x, static=(1,)), KVCache(k, v, lengths)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def first(self, params: Params, state: State, h: Array) -> State:
        """Sample each row's first new token from the hidden state ``h`` (B, dim) of its prompt's last token
        (computed by prefill, which wrote the whole prompt), append it and make it ``last``."""
        key, sub = jax.random.split(state.key)
        nxt = sample(sub, logits_of(params, h), self.sampling)
        state = self.append(state, nxt[:, None], jnp.ones((nxt.shape[0], 1), bool))
        history = state.history
        if history is not None:  # [0, cache.lengths] valid: the new ``last`` included
            history = history.at[jnp.arange(nxt.shape[0]), state.cache.lengths].set(nxt, mode="drop")
        return state.replace(last=nxt, key=key, history=history)

    def append(self, state: State, new: Array, keep: Array) -> State:
        """Append tokens ``new`` (B, K) where ``keep`` (B, K) to ``state.out``, cutting at EOS and budget."""
        B, K = new.shape
        is_eos = jnp.isin(new, jnp.asarray(self.eos_ids, jnp.int32)) if self.eos_ids else jnp.zeros_like(keep)
        # Keep tokens up to and including the first EOS.
        after_eos = jnp.cumsum(is_eos & keep, axis=1) - (is_eos & keep)
        keep = keep & (after_eos == 0) & ~state.done[:, None]
        room = state.budget - state.n_out
        keep = keep & (jnp.cumsum(keep, axis=1) <= room[:, None])
        n = keep.sum(axis=1).astype(jnp.int32)
        pos = state.n_out[:, None] + jnp.cumsum(keep, axis=1) - 1
        pos = jnp.where(keep, pos, state.out.shape[1])  # out-of-range writes are dropped
        out = state.out.at[jnp.arange(B)[:, None], pos].set(new, mode="drop")
        n_out = state.n_out + n
        done = state.done | (n_out >= state.budget) | jnp.any(is_eos & keep, axis=1)
        return state.replace(out=out, n_out=n_out, done=done)

    def step(self, params: Params, state: State) -> State:
        """One autoregressive step: feed ``last``, sample the next token."""
        logits, cache = forward(params, self.cfg, state.last[:, None], state.cache)
        key, sub = jax.random.split(state.key)
        nxt = sample(sub, logits[:, 0], self.sampling)
        state = self.append(state, nxt[:, None], jnp.ones((nxt.shape[0], 1), bool))
        cache = cache.replace(lengths=jnp.where(state.done, state.cache.lengths, cache.lengths))
        return state.replace(cache=cache, last=jnp.where(state.done, state.last, nxt), key=key)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def run(self, params: Params, state: State, max_steps: Array) -> State:
        """Run up to ``max_steps`` steps (or until every row is done) on device."""
        def cond(c: tuple[State, Array]) -> Array:  # stop too when a step could write past the cache's window
            room = jnp.max(c[0].cache.lengths) + self.extra + 1 <= c[0].cache.max_len
            return (c[1] < max_steps) & ~jnp.all(c[0].done) & room

        def body(c: tuple[State, Array]) -> tuple[State, Array]:
            return self.step(params, c[0]), c[1] + 1

        return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))[0]


@jax.jit
def _embed(embed: Array, tokens: Array) -> Array:
    return embed[tokens].astype(jnp.float32)


def _block(layer: Layer, cfg: Config, x: Array, k: Array, v: Array, i: Array, start: Array, fresh: bool
           ) -> tuple[Array, Array, Array]:
    """``model.block`` (layer ``i`` of the stacked caches) on a prompt chunk; ``fresh`` (all rows' caches empty,
    ``start`` 0): over the chunk's own slots only, written back into the window (a 1024-token chunk in a 1280-slot
    window: 30% fewer attention scores; a 48-token one in 256 slots: 80%)."""
    if not fresh:
        return block(layer, cfg, x, k, v, i, start)
    B, T = x.shape[:2]
    size = (1, B, T, *k.shape[3:])
    at = (i, 0, 0, 0, 0)
    x, kt, vt = block(layer, cfg, x, jax.lax.dynamic_slice(k, at, size), jax.lax.dynamic_slice(v, at, size), 0, start)
    return x, jax.lax.dynamic_update_slice(k, kt, at), jax.lax.dynamic_update_slice(v, vt, at)


@functools.partial(jax.jit, static_argnums=(1, 5), donate_argnums=3)
def _prefill_scan(params: Params, cfg: Config, tokens: Array, cache: KVCache, lengths: Array, fresh: bool = False
                  ) -> tuple[Array, KVCache]:
    """``model.hidden`` as a scan over the layers, leaving the cache's lengths at ``lengths``. The layers' weights
    are ``params.stacked`` where the loader mapped them so (no copy), else stacked per call (SmolLM2: ~0.25 s of a
    1024-token chunk's ~2 s here); the caches are stacked per call (a copy, small next to the chunk's compute)."""
    def layer(x: Array, lkv: tuple[Layer, Array, Array]) -> tuple[Array, tuple[Array, Array]]:
        x, k, v = _block(lkv[0], cfg, x, lkv[1][None], lkv[2][None], jnp.int32(0), cache.lengths, fresh)
        return x, (k[0], v[0])

    weights = params.stacked
    if weights is None:
        weights = jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers)
    x, (k, v) = jax.lax.scan(layer, params.embed[tokens].astype(jnp.float32), (weights, cache.k, cache.v))
    h = rms_norm(x, params.norm, cfg.norm_eps).astype(params.embed.dtype)
    return h, KVCache(k, v, lengths)


@functools.partial(jax.jit, static_argnums=(1, 7), donate_argnums=(3, 4))
def _prefill_layer(layer: Layer, cfg: Config, x: Array, k: Array, v: Array, i: Array, start: Array,
                   fresh: bool = False) -> tuple[Array, ...]:
    return _block(layer, cfg, x, k, v, i, start, fresh)


@functools.partial(jax.jit, static_argnums=1)
def _final_norm(norm: Array, cfg: Config, x: Array) -> Array:
    return rms_norm(x, norm, cfg.norm_eps).astype(norm.dtype)


@jax.jit
def _pick(prev: Array, h: Array, index: Array, rows: Array) -> Array:
    """``prev`` (B, dim) with the rows where ``rows`` replaced by ``h[b, index[b]]`` of a chunk's ``h`` (B, T, dim)."""
    new = jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]
    return jnp.where(rows[:, None], new.astype(prev.dtype), prev)


def write_tokens(params: Params, decoder: Decoder, cache: KVCache, tokens: np.ndarray, lengths: list[int],
                 written: list[int], fresh: bool = False) -> tuple[Array, KVCache]:
    """Write right-padded ``tokens`` (B, T), of which each row's first ``written`` are real, at ``cache.lengths`` in
    chunks of at most ``PREFILL_BUCKETS[-1]``, then set the lengths to ``lengths`` (the padding past them is never
    attended: decoding overwrites it first). Returns each row's final-norm hidden state (B, dim) at its last real
    token (zeros where none) and the cache. ``fresh``: ``cache`` is empty (its first chunk sees only itself)."""
    chunk = PREFILL_BUCKETS[-1]
    last = np.asarray(written) - 1  # each row's last real token in ``tokens``
    h_last, start = None, host(cache.lengths) if tokens.shape[1] > chunk else None
    for i in range(0, tokens.shape[1], chunk):
        part = to_device(tokens[:, i : i + chunk])
        end = to_device(np.asarray(lengths if i + chunk >= tokens.shape[1] else start + i + chunk, np.int32))
        h, cache = decoder.prefill_cache(params, part, cache, end, fresh and i == 0)
        if h_last is None:
            h_last = jax.device_put(np.zeros((h.shape[0], h.shape[2]), h.dtype))
        rows = (last >= i) & (last < i + part.shape[1])
        if rows.any():
            h_last = aot.call(_pick, h_last, h, to_device(np.clip(last - i, 0, part.shape[1] - 1).astype(np.int32)),
                              to_device(rows))
    return h_last, cache


def prefill(params: Params, decoder: Decoder, prompts: list[list[int]], max_new: int | list[int], seed: int = 0,
            window: int = 0, **init: float) -> State:
    """Write every prompt into a fresh cache, sample each row's first new token from the prompt's last logits, and
    return the decode state that continues from there (the first token in ``out`` and ``last``).

    Prompts of different lengths are right-padded to one bucket length; per-row lengths mask the padding.
    ``window`` > 0 starts the cache at that capacity (doubled as needed) instead of the whole request's; then the
    decode loop stops at the window's end and ``stream`` grows it. ``init`` goes to ``decoder.init_stats`` (e.g. the
    speculative threshold carried over from earlier requests).
    """
    cfg, extra = decoder.cfg, decoder.extra
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: at least one token is needed")
    budgets = [max_new] * len(prompts) if isinstance(max_new, int) else list(max_new)
    if any(b < 1 for b in budgets):
        raise ValueError("max new tokens must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max(budgets) > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + {max(budgets)} new tokens exceeds the model's context "
                         f"of {cfg.max_seq_len}")
    B = len(prompts)
    full = capacity(decoder, longest + max(budgets))
    T = min(bucket(longest), full)
    cache = decoder.new_cache(B, window_len(max(T, longest + extra + 1), full, window))
    toks = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    h, cache = write_tokens(params, decoder, cache, toks, [len(p) for p in prompts], [len(p) for p in prompts],
                            fresh=True)
    history = None
    if decoder.needs_history:
        hist = np.zeros((B, cache.max_len), np.int32)
        for b, p in enumerate(prompts):
            hist[b, : len(p)] = p
        history = to_device(hist)
    state = State(
        cache=cache,
        last=jax.device_put(np.zeros((B,), np.int32)),  # ``first`` sets it
        out=jax.device_put(np.zeros((B, max(budgets)), np.int32)),  # host zeros: nothing to compile
        n_out=jax.device_put(np.zeros((B,), np.int32)),
        done=jax.device_put(np.zeros((B,), bool)),
        budget=to_device(np.asarray(budgets, np.int32)),
        key=new_key(seed),
        stats=decoder.init_stats(B, max(budgets), **init),
        history=history,
    )
    return commit(aot.call(type(decoder).first, decoder, params, commit(state), h, static=(0,)))


@functools.partial(jax.jit, static_argnums=1)  # no donation: a larger buffer cannot reuse the old one
def _pad(state: State, capacity: int) -> State:
    def pad(a: Array, axis: int) -> Array:  # along the sequence axis of the cache arrays (2), the token history (1)
        return jnp.pad(a, [(0, capacity - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)])

    cache = state.cache.replace(k=pad(state.cache.k, 2), v=pad(state.cache.v, 2))
    return state.replace(cache=cache, history=None if state.history is None else pad(state.history, 1))


def grow(state: State, need: int, full: int, smallest: int = MIN_WINDOW) -> State:
    """``state`` with cache (and token history) room for ``need`` slots: copied into a larger window if it lacks
    it (the old one is freed when the caller drops it)."""
    return state if need <= state.cache.max_len else _pad(state, window_len(need, full, smallest))


def to_device(a: np.ndarray) -> Array:
    """A host array on the default device, by transfer alone: ``jnp.asarray`` would trace, look up and load a
    small executable per shape (tens of ms each on a warm start; several sat between a prompt and its first token)."""
    return jax.device_put(np.asarray(a))


def new_key(seed: int) -> Array:
    """``jax.random.key(seed)`` (threefry) built on the host: no executable to load on a warm start. A seed that
    fits 32 bits (negative ones too) has high word 0, as jax gives it."""
    hi = 0 if -(1 << 31) <= seed < 1 << 32 else (seed >> 32) & 0xFFFFFFFF
    return jax.random.wrap_key_data(to_device(np.asarray([hi, seed & 0xFFFFFFFF], np.uint32)))


@jax.jit
def _copy(state: State) -> State:
    return jax.tree.map(jnp.copy, state)


def commit(state: State) -> State:
    """Commit every array to its device: jit keys its executable cache on committedness, and the loop's own outputs
    are committed, so uncommitted inputs would compile (and lazily JIT kernels) a second time."""
    return jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))  # one call for all (2.6 -> 1.1 ms)


@dataclass
class Result:
    tokens: list[list[int]]  # new tokens per row
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    compile_s: float  # decode-loop compilation (and first runs) for each cache window used, excluded from decode_s
    stats: Any  # the decoder's final counters as NumPy (``speculative.SpecStats``), None for AR
    ttft_s: float = float("nan")  # from the call to the first new token on the host (prefill makes it)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: the tokens after each row's first (which prefill makes) over ``decode_s``."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def run(decoder: Decoder, params: Params, state: State, max_steps: Array) -> State:
    """``decoder.run``, with the executable persisted across processes when ``aot`` is enabled."""
    return aot.call(type(decoder).run, decoder, params, state, max_steps, static=(0,))


def host(x: Array) -> np.ndarray:
    """``x``'s value on this host, also when it is split over devices of several processes (then gathered: every
    process must call this alike)."""
    if x.is_fully_addressable or x.sharding.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def row_tokens(state: State, row: int = 0, start: int = 0) -> list[int]:
    """Row ``row``'s new tokens from ``start`` on (to ``n_out``), read on the host in one transfer of ``out`` (a
    slice of the device array with moving bounds compiled a new slice each time it was read while streaming: a
    streamed 48-token answer decoded at ~0.65x the speed of the same answer unstreamed)."""
    n = int(host(state.n_out)[row])
    return host(state.out)[row, start:n].tolist()


def capacity_needed(decoder: Decoder, state: State) -> tuple[int, int]:
    """(slots the next step needs, slots the rest of the request needs) for ``state``'s cache (host values)."""
    lengths, rest = host(state.cache.lengths), host(state.budget) - host(state.n_out)
    full = capacity(decoder, int((lengths + 1 + rest).max()))
    return int(lengths.max()) + decoder.extra + 1, full


def stream(decoder: Decoder, params: Params, state: State, steps_per_call: int = 8,
           on_window: Callable[[State], None] | None = None, update_s: float = 0.0) -> Iterator[State]:
    """Run ``decoder`` to completion, yielding ``state`` itself first if it holds tokens already (prefill's first
    token), the state after the first step, then every ``steps_per_call`` steps (for streaming) or when the cache's
    window fills (the cache then grows to the next window). ``update_s`` > 0: every call runs as many steps (at most
    ``steps_per_call``) as take that long at the pace of the call before, so that updates come at a steady rate
    whatever a step costs (SmolLM2 here: ~13 steps a call at 0.1 s; a 7B on CPU: 1). ``on_window`` sees the state
    before the first run on each cache window: a new shape, so a new compilation."""
    if host(state.n_out).any():
        yield state
    steps, window, last = 1, None, None
    while not host(state.done).all():
        if update_s > 0 and last is not None:  # the consumer has read the last call's tokens: its pace is known
            steps = max(1, min(steps_per_call, round(steps * update_s / (time.perf_counter() - last))))
        state = grow(state, *capacity_needed(decoder, state))
        if on_window is not None and state.cache.max_len != window:
            window = state.cache.max_len
            on_window(state)
        last = time.perf_counter()
        state = run(decoder, params, state, to_device(np.int32(steps)))
        if update_s <= 0:
            steps = steps_per_call
        yield state


def generate(decoder: Decoder, params: Params, prompts: list[list[int]], max_new: int | list[int], seed: int = 0,
             on_update: Callable[[State], None] | None = None, steps_per_call: int = 1 << 30,
             window: int = MIN_WINDOW, update_s: float = 0.0, **init: float) -> Result:
    """Prefill and decode a batch of prompts; return new tokens, timings and per-row stats. ``window``: see
    ``prefill`` (0: one cache sized for the whole request); ``steps_per_call``, ``update_s``: see ``stream``."""
    t0 = time.perf_counter()
    state = prefill(params, decoder, prompts, max_new, seed, window, **init)
    jax.block_until_ready(state)
    t1 = time.perf_counter()  # every row's first token exists
    compile_s = [0.0]

    def warm_up(s: State) -> None:
        """Compile, and run one throwaway step on a copy: XLA:CPU finishes compiling loop-body kernels at their
        first execution, which would otherwise land in decode_s (cached after the first call). Done for the first
        window and again for each larger one the cache grows into."""
        t = time.perf_counter()
        jax.block_until_ready(run(decoder, params, aot.call(_copy, s), to_device(np.int32(1))))
        compile_s[0] += time.perf_counter() - t

    final = state
    for final in stream(decoder, params, state, steps_per_call, on_window=warm_up, update_s=update_s):
        if on_update is not None:
            on_update(final)
    out, n = np.asarray(final.out), np.asarray(final.n_out)
    t2 = time.perf_counter()
    return Result(tokens=[out[b, : n[b]].tolist() for b in range(len(prompts))],
                  prompt_tokens=[len(p) for p in prompts], prefill_s=t1 - t0, decode_s=t2 - t1 - compile_s[0],
                  compile_s=compile_s[0], stats=jax.tree.map(np.asarray, final.stats), ttft_s=t1 - t0)


def result_stats(r: Result) -> dict[str, float | int | str]:
    """Aggregate counters of a ``Result`` for printing and JSON (plus the decoder's own summary, if any)."""
    out: dict[str, float | int | str] = {"prompt_tokens": sum(r.prompt_tokens), "new_tokens": r.new_tokens,
                                         "prefill_s": round(r.prefill_s, 4), "compile_s": round(r.compile_s, 4),
                                         "ttft_s": round(r.ttft_s, 4), "decode_s": round(r.decode_s, 4),
                                         "tokens_per_s": round(r.tokens_per_s, 2)}
    if r.stats is not None:
        out.update(r.stats.summary())
    return out
