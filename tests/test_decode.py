"""Autoregressive decoding: the on-device loop against a naive full-forward argmax loop, batching, stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinymodel

from jaxspec.config import SkipMask
from jaxspec.decode import PREFILL_BUCKETS, Decoder, bucket, generate, window_len
from jaxspec.model import KVCache, forward
from jaxspec.sampling import Sampling, probs, sample

CFG = tinymodel.CFG


@pytest.fixture(scope="module")
def params():
    return tinymodel.trained()


def naive_greedy(params, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache reuse)."""
    fwd = jax.jit(forward, static_argnums=1)
    seq = list(prompt)
    for _ in range(n):  # right-padded to one length: causal attention makes the padding invisible
        logits, _ = fwd(params, CFG, jnp.asarray([seq + [0] * (32 - len(seq))]), KVCache.create(CFG, 1, 32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_matches_naive_loop_and_model_learned(params):
    prompt = tinymodel.progression(10, 3, 6)
    res = generate(Decoder(CFG), params, [prompt], 12)
    assert res.tokens[0] == naive_greedy(params, prompt, 12)
    # The trained model continues the progression (so tests below see real margins).
    assert res.tokens[0][:6] == tinymodel.progression(10, 3, 12)[6:]


def test_ragged_batch_equals_single_rows(params):
    prompts = [tinymodel.progression(5, 2, 3), tinymodel.progression(40, 1, 17), [7]]
    batched = generate(Decoder(CFG), params, prompts, [9, 5, 7])
    for b, p in enumerate(prompts):
        single = generate(Decoder(CFG), params, [p], [9, 5, 7][b])
        assert batched.tokens[b] == single.tokens[0]
    assert [len(t) for t in batched.tokens] == [9, 5, 7]


def test_stops_at_eos_and_includes_it(params):
    prompt = tinymodel.progression(10, 3, 6)
    free = generate(Decoder(CFG), params, [prompt], 10).tokens[0]
    eos = free[4]
    res = generate(Decoder(CFG, eos_ids=(eos,)), params, [prompt], 10)
    assert res.tokens[0] == free[: free.index(eos) + 1]


def test_bad_requests_are_value_errors(params):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(Decoder(CFG), params, [[]], 4)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(Decoder(CFG), params, [[5] * (CFG.max_seq_len - 2)], 4)


def test_prefill_buckets_bound_compilations_and_padding():
    chunk = PREFILL_BUCKETS[-1]  # longer prompts are written in chunks of this length, the rest in a bucket
    for n in range(1, 5000):
        b = bucket(n)
        assert n <= b <= max(16, n * 3 // 2), n  # prefill is compute-bound: padding is paid in full
        assert b % chunk in PREFILL_BUCKETS or b % chunk == 0, n
    assert bucket(39) == 48 and bucket(1025) == 1040 and bucket(2048) == 2048


def test_warping():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    np.testing.assert_allclose(probs(logits, Sampling(1.0)), [[0.5, 0.25, 0.15, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(probs(logits, Sampling(1.0, top_k=2)), [[2 / 3, 1 / 3, 0, 0]], rtol=1e-6)
    # top-p 0.7: the smallest prefix reaching 0.7 is {0.5, 0.25}.
    np.testing.assert_allclose(probs(logits, Sampling(1.0, top_p=0.7)), [[2 / 3, 1 / 3, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(probs(logits, Sampling(1.0, top_p=0.75)), [[2 / 3, 1 / 3, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(probs(logits, Sampling(1.0, top_p=0.76)), [[0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]],
                               rtol=1e-5)
    np.testing.assert_array_equal(probs(logits, Sampling()), [[1, 0, 0, 0]])
    hot = probs(logits, Sampling(0.01))
    assert float(hot[0, 0]) > 0.999
    draws = sample(jax.random.key(0), jnp.repeat(logits, 20000, 0), Sampling(1.0))
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 20000, [0.5, 0.25, 0.15, 0.1], atol=0.015)
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_sampling_is_seeded(params):
    prompt = tinymodel.progression(10, 3, 6)
    dec = Decoder(CFG, Sampling(temperature=1.5))
    a, b = (generate(dec, params, [prompt], 12, seed=s).tokens[0] for s in (1, 1))
    c = generate(dec, params, [prompt], 12, seed=2).tokens[0]
    assert a == b and a != c


def test_growing_cache_windows_equal_one_full_cache(params, monkeypatch):
    """A cache that starts small and doubles as decoding fills it gives the tokens of one full-size cache, and
    each new window's compilation runs as a warm-up outside the timed decode (a throwaway step on that window's
    shape before its first real step)."""
    from jaxspec import decode
    from jaxspec.speculative import SpecDecoder
    prompts = [tinymodel.progression(5, 2, 3), tinymodel.progression(40, 1, 20), [7]]
    for dec in (Decoder(CFG), SpecDecoder(CFG, skip=SkipMask(attn=(1,), mlp=(2,)), max_draft=5)):
        full = generate(dec, params, prompts, [40, 60, 50], window=0)
        calls, real = [], decode.run
        monkeypatch.setattr(decode, "run", lambda d, p, s, n, calls=calls, real=real: calls.append(
            (s.cache.max_len, int(n))) or real(d, p, s, n))
        small = generate(dec, params, prompts, [40, 60, 50], window=8, steps_per_call=3)
        monkeypatch.undo()
        assert small.tokens == full.tokens
        assert [len(t) for t in small.tokens] == [40, 60, 50]
        windows = list(dict.fromkeys(w for w, _ in calls))
        assert len(windows) > 1  # the cache grew
        firsts = [calls[[w for w, _ in calls].index(w)] for w in windows]
        assert all(n == 1 for _, n in firsts)  # every window's first call is the one-step warm-up
        assert small.compile_s > 0 and small.decode_s > 0


def test_streaming_paces_calls_by_time(params, monkeypatch):
    """``update_s``: a call runs as many steps as take that long at the last call's pace, at most ``steps_per_call``:
    all of them where steps are fast against it, one where they are slow (a 7B on a CPU, one token per update)."""
    from jaxspec import decode

    prompts = [tinymodel.progression(5, 2, 3)]
    full = generate(Decoder(CFG), params, prompts, 30)
    for update_s, expect in ((60.0, 5), (1e-9, 1)):
        calls, real = [], decode.run
        monkeypatch.setattr(decode, "run", lambda d, p, s, n, calls=calls, real=real: calls.append(int(n))
                            or real(d, p, s, n))
        paced = generate(Decoder(CFG), params, prompts, 30, on_update=lambda s: None, steps_per_call=5,
                         update_s=update_s)
        monkeypatch.undo()
        assert paced.tokens == full.tokens
        assert calls[:2] == [1, 1] and set(calls[2:]) == {expect}, calls  # the warm-up, the first step, then paced


def test_window_len():
    assert window_len(5, 512, 16) == 16 and window_len(17, 512, 16) == 32 and window_len(300, 272, 16) == 300
    assert window_len(5, 512, 0) == 512 and window_len(600, 1024, 256) == 1024


def test_chunked_prefill_equals_one_chunk(params, monkeypatch):
    """Prompts longer than the largest prefill bucket are written in chunks; the tokens do not change."""
    from jaxspec import decode
    prompts = [tinymodel.progression(9, 3, 70), tinymodel.progression(4, 1, 23)]
    whole = generate(Decoder(CFG), params, prompts, 8)
    monkeypatch.setattr(decode, "PREFILL_BUCKETS", (16,))
    assert generate(Decoder(CFG), params, prompts, 8).tokens == whole.tokens


@pytest.mark.parametrize("chunk", [None, 16])
def test_fresh_prefill_attends_over_its_own_slots_only_and_matches(params, monkeypatch, chunk):
    """A fresh cache's first chunk attends over its T slots, not the window: same hidden states, cache and tokens
    as the general path (per-layer chunks, and with ``chunk`` 16 the scan over layers too)."""
    from jaxspec import decode

    if chunk:
        monkeypatch.setattr(decode, "PREFILL_BUCKETS", (chunk,))
    prompts = [tinymodel.progression(9, 3, 40), tinymodel.progression(4, 1, 13)]
    dec = Decoder(CFG)
    T = bucket(40)
    toks = np.zeros((2, T), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    out = {}
    for fresh in (False, True):
        cache = dec.new_cache(2, 256)
        out[fresh] = decode.write_tokens(params, dec, cache, toks, [40, 13], [40, 13], fresh=fresh)
    (h0, c0), (h1, c1) = out[False], out[True]
    np.testing.assert_allclose(h1, h0, atol=1e-5, rtol=1e-5)
    for a, b in ((c1.k, c0.k), (c1.v, c0.v)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 5, -1, -5, 2**31 - 1, 2**32 - 1])
def test_new_key_is_jax_random_key(seed):
    from jaxspec.decode import new_key

    assert jax.random.key_data(new_key(seed)).tolist() == jax.random.key_data(jax.random.key(seed)).tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_cache_is_zeros_of_create_s_tree_in_distinct_buffers(dtype):
    """``new_cache`` builds what ``KVCache.create`` does without tracing; each array its own buffer (the decode loop
    writes the cache in place, and a CPU transfer of one host array would alias every array made from it)."""
    cfg = CFG.replace(dtype=dtype)
    cache = Decoder(cfg).new_cache(2, 48)
    want = KVCache.create(cfg, 2, 48)
    assert jax.tree.structure(cache) == jax.tree.structure(want)
    for got, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(want), strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype and not np.asarray(got.astype(jnp.float32)).any()
    pointers = {a.unsafe_buffer_pointer() for a in jax.tree.leaves(cache)}
    assert len(pointers) == len(jax.tree.leaves(cache))
