"""The host replay of draft acceptance (benchmarks/replay_drafts.py) reproduces the device's n-gram cycles exactly."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tinymodel

from jaxspec.decode import Decoder, generate
from jaxspec.speculative import SpecDecoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import replay_drafts  # noqa: E402

CFG = tinymodel.CFG


@pytest.fixture(scope="module")
def params():
    return tinymodel.trained()


@pytest.mark.parametrize("n_min,n_max,k", [(2, 4, 4), (1, 3, 6), (3, 3, 2)])
def test_replay_matches_device_ngram_cycles(params, n_min, n_max, k):
    cycles = drafted = 0
    for prompt in ([*tinymodel.progression(9, 2, 20), *tinymodel.progression(9, 2, 8)],
                   [*tinymodel.progression(30, 3, 40), *tinymodel.progression(30, 3, 25)],
                   tinymodel.progression(5, 7, 17)):
        out = generate(Decoder(CFG), params, [prompt], 24).tokens[0]
        dev = generate(SpecDecoder(CFG, drafter="ngram", ngram_min=n_min, ngram_max=n_max, ngram_k=k), params,
                       [prompt], 24)
        assert dev.tokens[0] == out
        n, widths = replay_drafts.replay({"prompt": prompt, "out": out}, replay_drafts.ngram(n_min, n_max, k))
        assert n == len(out)
        assert len(widths) == int(dev.stats.verify_calls[0])  # cycles
        assert sum(widths) - len(widths) == int(dev.stats.drafted_ngram[0])  # tokens proposed
        cycles += len(widths)
        drafted += int(dev.stats.drafted_ngram[0])
    assert drafted > 0 and cycles < 3 * 24  # the test has power: copies were proposed and some accepted


def test_cost_rounds_up_to_compiled_sizes():
    costs = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.6}
    assert replay_drafts.cost([1, 2, 3], costs, k=4) == pytest.approx(1.0 + 1.1 + 1.2)
    assert replay_drafts.cost([5], costs, k=4) == pytest.approx(1.3)  # k + 1 = 5 is compiled: interpolated
    assert replay_drafts.cost([6], costs, k=8) == pytest.approx(1.6)  # rounded up to 8
    assert replay_drafts.cost([9], costs, k=8) == pytest.approx(1.7)  # extrapolated past the last width
    assert np.isfinite(replay_drafts.cost([], costs, k=2))


def test_replay_with_a_phrase_table_matches_device_cycles(params):
    """``replay_drafts.with_phrases`` (the host twin of ``phrases.lookup``) proposes what the device does, cycle for
    cycle, phrase drafts included."""
    import jax
    import jax.numpy as jnp

    from jaxspec import phrases

    corpus = [generate(Decoder(CFG), params, [tinymodel.progression(s, d, 6)], 24).tokens[0]
              for s, d in ((3, 1), (10, 2), (20, 3), (5, 4))]
    host = phrases.build(corpus, k=6)
    with_table = params.replace(phrases=tuple(jax.tree.map(jnp.asarray, t) for t in host))
    from_table = 0
    for prompt in (tinymodel.progression(4, 1, 5), tinymodel.progression(12, 2, 7), [9, 3]):
        out = generate(Decoder(CFG), params, [prompt], 24).tokens[0]
        dev = generate(SpecDecoder(CFG, drafter="ngram", ngram_k=6), with_table, [prompt], 24)
        assert dev.tokens[0] == out
        n, widths = replay_drafts.replay({"prompt": prompt, "out": out}, replay_drafts.with_phrases(2, 4, 6, host))
        s = dev.stats.summary()
        assert n == len(out) and len(widths) == s["verify_calls"]
        assert sum(widths) - len(widths) == s["drafted_ngram"] + s["drafted_phrase"]
        from_table += s["drafted_phrase"]
    assert from_table > 0
