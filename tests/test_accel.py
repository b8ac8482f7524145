"""bfloat16 fast paths (float32 logits and softmax, greedy SSD == AR, one compilation per shape bucket), the
speedup prediction formula, and benchmarks/bench_accel.py end to end at tiny shapes on CPU."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinymodel

from jaxspec.config import SkipMask
from jaxspec.costmodel import LayerCosts, expected_tokens, predicted_speedup
from jaxspec.decode import Decoder, generate
from jaxspec.model import KVCache, forward
from jaxspec.speculative import SpecDecoder

CFG = tinymodel.CFG.replace(dtype="bfloat16")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params_bf16():
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tinymodel.trained())


def test_prediction_formula():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    # k = 3: E = (1 - 0.9^4) / 0.1 = 3.439 over 3 * 0.5 + 1.0; k = 1: 1.9 / 1.5.
    s, k = predicted_speedup(0.9, 0.5, {2: 1.0, 4: 1.0})
    assert k == 3 and s == pytest.approx(3.439 / 2.5)
    assert predicted_speedup(0.9, 0.5, {2: 1.0, 4: 3.0})[1] == 1  # an expensive long verify favours short drafts
    lc = LayerCosts(fixed=2.0, attn=0.3, mlp=0.5)
    n, mask = 4, SkipMask(attn=(0, 2), mlp=(1,))
    got = LayerCosts.from_passes(lc.seconds(n), lc.seconds(n, SkipMask(range(n), range(n))),
                                 lc.seconds(n, SkipMask(mlp=range(n))), n)
    assert got.seconds(40, mask) == pytest.approx(2.0 + 38 * 0.3 + 39 * 0.5)


def _eqns(jaxpr):  # noqa: ANN001, ANN202 - every equation, nested jaxprs included
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, tuple | list) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_bfloat16_logits_and_softmax_in_float32(params_bf16):
    cache = KVCache.create(CFG, 1, 16)
    assert cache.k[0].dtype == jnp.bfloat16
    jaxpr = jax.make_jaxpr(lambda p, t, c: forward(p, CFG, t, c))(params_bf16, jnp.ones((1, 4), jnp.int32), cache)
    exps = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)  # attention softmax
    logits, _ = jax.jit(forward, static_argnums=1)(params_bf16, CFG, jnp.ones((1, 4), jnp.int32), cache)
    assert logits.dtype == jnp.float32


def test_greedy_ssd_equals_ar_in_bfloat16_compiled_once(params_bf16):
    mask = SkipMask(attn=(1, 3), mlp=(1, 3))
    prompts = [tinymodel.progression(9, 2, n) for n in (5, 12, 17)]  # two prefill buckets (16 and 64)
    ar_dec, ssd_dec = Decoder(CFG), SpecDecoder(CFG, skip=mask, max_draft=5)
    for p in prompts[:1]:  # compile both loops
        generate(ar_dec, params_bf16, [p], 24), generate(ssd_dec, params_bf16, [p], 24)
    size = Decoder.run._cache_size()
    for p in prompts:
        ar = generate(ar_dec, params_bf16, [p], 24).tokens[0]
        ssd = generate(ssd_dec, params_bf16, [p], 24)
        assert ssd.tokens[0] == ar and len(ar) == 24
        assert ssd.stats.summary()["accepted"] > 0
    assert Decoder.run._cache_size() == size  # no decode-loop recompilation across requests of one cache bucket


def test_bench_accel_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_accel

    from jaxspec.checkpoint import save_checkpoint
    from jaxspec.model import params_to_flat

    ckpt = save_checkpoint(tmp_path / "tiny", tinymodel.CFG,
                           ((k, np.asarray(v)) for k, v in params_to_flat(tinymodel.trained()).items()))
    out = tmp_path / "out"
    argv = ["--shapes", "tiny", "--layers", "2", "--batches", "1,2", "--verify", "2", "--context", "32",
            "--e2e", str(ckpt), "--max-new", "16", "--rounds", "1", "--out", str(out)]
    assert bench_accel.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "tiny" in (out / "report.md").read_text()
    tiny = rep["tiny"]
    assert tiny["layers_timed"] == 2 and tiny["layers"] == 4 and set(tiny["batches"]) == {"1", "2"}
    for b in tiny["batches"].values():
        assert b["ar_tokens_per_s"] > 0 and set(b["verify_cost"]) == {"2"}
        assert set(b["draft_cost"]) == {"attn-odd", "odd-layers"}
        c = b["draft_cost"]["odd-layers"]
        s, k = predicted_speedup(0.9, c, {int(t): v for t, v in b["verify_cost"].items()})
        assert b["predicted_speedup"]["odd-layers"]["0.9"] == [pytest.approx(s), k]
    modes = rep["e2e"]["modes"]
    assert set(modes) == set(bench_accel.MODES)
    for m in modes.values():
        assert m["identical_to_ar"] and m["compiles_in_requests"] == 0 and m["host_ops_in_loop"] == []
    assert modes["skip"]["drafted"] > 0 and 0 < modes["skip"]["acceptance"] <= 1
    assert bench_accel.main(["--shapes", "nope", "--out", str(out)]) == 2
