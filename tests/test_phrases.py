"""Phrase tables: what ``build`` keeps, what ``lookup`` finds on device, files, and lossless decoding with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinymodel

from jaxspec import phrases
from jaxspec.config import SkipMask
from jaxspec.decode import Decoder, generate
from jaxspec.speculative import SpecDecoder

CFG = tinymodel.CFG


def test_build_keeps_majority_continuations_longest_n_first() -> None:
    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [7, 2, 3, 8], [5, 5, 5]]
    t3, t2 = phrases.build(seqs, ns=(2, 3), k=3)
    assert t3.keys.shape[1] == 3 and t2.keys.shape[1] == 2
    entries = {tuple(k): c[:n].tolist() for k, c, n in zip(t3.keys, t3.conts, t3.counts, strict=True) if n}
    assert entries[1, 2, 3] == [4, 9]  # latest continuation with the majority next token (4: twice)
    assert entries[2, 3, 4] == [5, 6]  # 5 and 9 tie at one each: half is a majority; the first seen wins the tie
    e2 = {tuple(k): c[:n].tolist() for k, c, n in zip(t2.keys, t2.conts, t2.counts, strict=True) if n}
    assert (2, 3) in e2 and e2[2, 3][0] == 4  # 4 follows "2 3" twice, 8 once
    strict = phrases.build(seqs, ns=(2,), k=3, min_count=2)[0]
    kept = {tuple(k) for k, n in zip(strict.keys, strict.counts, strict=True) if n}
    assert kept == {(1, 2), (2, 3)}  # "3 4" is followed by 5 once and 9 once; "5 5" by 5 once


def test_device_lookup_finds_the_host_tables_entries() -> None:
    """The hash agrees on host and device; a row's longest n-gram with an entry wins (else the 2-gram's); a miss and
    a history shorter than every n propose nothing."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50, 40).tolist() for _ in range(6)]
    host = phrases.build(seqs, ns=(3, 2), k=4)
    tables = tuple(jax.tree.map(jnp.asarray, t) for t in host)
    key3 = np.asarray(seqs[0][:3])
    assert int(phrases.slot(jnp.asarray(key3), 64)) == int(phrases.slot(key3, 64))
    (t3, t2), (s3, s2) = host, (int(np.argmax(host[0].counts)), int(np.argmax(host[1].counts)))
    hist = np.zeros((4, 16), np.int32)
    hist[0, :5] = [60, 61, *t3.keys[s3]]  # ends in a 3-gram with an entry
    hist[1, :3] = [99, *t2.keys[s2]]  # its 3-gram (token 99 is in no sequence) has none; its 2-gram does
    hist[2, :3] = [70, 71, 72]  # in no table
    hist[3, :1] = t2.keys[s2][1]  # one token: shorter than every n
    drafts, count = jax.jit(phrases.lookup, static_argnums=3)(tables, jnp.asarray(hist), jnp.asarray([5, 3, 3, 1]), 4)
    for row, (t, s) in enumerate(((t3, s3), (t2, s2))):
        n = min(int(t.counts[s]), 4)
        assert int(count[row]) == n and drafts[row, :n].tolist() == t.conts[s, :n].tolist()
    assert count[2:].tolist() == [0, 0] and not drafts[2:].any()


def test_save_load_round_trip_and_bad_files(tmp_path) -> None:
    tables = phrases.build([[1, 2, 3, 4, 1, 2, 3, 5]], k=4)
    path = tmp_path / f"t{phrases.SUFFIX}"
    phrases.save(path, tables)
    got = phrases.load(path, vocab_size=10)
    assert [t.keys.shape[1] for t in got] == [3, 2]
    for a, b in zip(got, tables, strict=True):
        assert all(np.array_equal(np.asarray(getattr(a, f)), getattr(b, f)) for f in ("keys", "conts", "counts"))
    with pytest.raises(ValueError, match="vocabulary of 5"):
        phrases.load(path, vocab_size=5)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a phrase table"):
        phrases.load(tmp_path / "junk.npz", vocab_size=10)
    with pytest.raises(ValueError, match="not a phrase table"):
        phrases.load(tmp_path / "missing.npz", vocab_size=10)


@pytest.fixture(scope="module")
def params():
    return tinymodel.trained()


@pytest.mark.parametrize("drafter", ["ngram", "hybrid"])
def test_phrase_drafts_are_lossless_and_accepted(params, drafter) -> None:
    """A table from the model's own greedy continuations of other prompts: ragged batched n-gram (or hybrid: the
    model drafts where neither the context nor the table proposes) decoding with it gives AR's tokens, and the
    table's drafts are proposed and accepted where the context has no match."""
    corpus_prompts = [tinymodel.progression(s, d, 6) for s, d in ((3, 1), (10, 2), (20, 3), (5, 4))]
    corpus = [generate(Decoder(CFG), params, [p], 24).tokens[0] for p in corpus_prompts]
    table = tuple(jax.tree.map(jnp.asarray, t) for t in phrases.build(corpus, k=6))
    with_table = params.replace(phrases=table)
    prompts = [tinymodel.progression(4, 1, 5), tinymodel.progression(12, 2, 7), [9, 3]]
    budgets = [20, 13, 17]
    dec = SpecDecoder(CFG, drafter=drafter, ngram_k=6, max_draft=4, skip=SkipMask(attn=(1,), mlp=(2,)))
    res = generate(dec, with_table, prompts, budgets)
    for b, p in enumerate(prompts):
        assert res.tokens[b] == generate(Decoder(CFG), params, [p], budgets[b]).tokens[0]
    s = res.stats.summary()
    assert s["drafted_phrase"] > 0 and s["accepted_phrase"] > 0
    assert s["accepted"] == s["accepted_ngram"] + s["accepted_phrase"] + s["accepted_model"]
    plain = generate(dec, params, prompts, budgets).stats.summary()
    assert plain["drafted_phrase"] == 0 and s["verify_calls"] < plain["verify_calls"]


def test_lookup_pads_or_cuts_entries_to_the_drafters_k() -> None:
    tables = tuple(jax.tree.map(jnp.asarray, t) for t in phrases.build([[1, 2, 3, 4, 5, 6, 7]], ns=(2,), k=4))
    hist = jnp.asarray([[9, 1, 2, 0]])
    longer, n_long = phrases.lookup(tables, hist, jnp.asarray([3]), 6)
    shorter, n_short = phrases.lookup(tables, hist, jnp.asarray([3]), 2)
    assert longer.tolist() == [[3, 4, 5, 6, 0, 0]] and n_long.tolist() == [4]
    assert shorter.tolist() == [[3, 4]] and n_short.tolist() == [2]
