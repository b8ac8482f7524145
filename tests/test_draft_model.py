"""The draft's low-precision matmuls and narrow head (the lossless decode matrix is in test_speculative.py)."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinymodel

from jaxspec.draft_model import DraftSpec, draft_bytes, draft_forward, make_draft, qdot, quantize, with_draft
from jaxspec.model import KVCache, forward

CFG = tinymodel.CFG
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision,tol", [("int8", 0.03), ("bfloat16", 0.01), ("float32", 1e-6)])
@pytest.mark.parametrize("rows", [1, 4])
def test_qdot_close_to_float32(precision, tol, rows):
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (64, 48)) * jnp.linspace(0.1, 3.0, 48)  # columns of very different scales
    x = jax.random.normal(k2, (2, 1, 64))
    got, want = qdot(x, quantize(w, precision), rows), x @ w
    assert got.shape == want.shape
    err = jnp.abs(got - want).max() / jnp.abs(want).max()
    assert err < tol
    if precision == "int8":
        assert err > 1e-5  # it is really quantized


def test_narrow_head_maps_back_to_token_ids():
    params = tinymodel.trained()
    ranking = np.random.default_rng(1).permutation(CFG.vocab_size)
    spec = DraftSpec("float32", head=100)
    cheap = with_draft(params, CFG, spec, ranking)
    assert sorted(np.asarray(cheap.draft.head_ids).tolist()) == sorted(ranking[:100].tolist())
    toks = jnp.asarray([tinymodel.progression(5, 3, 12)])
    full, _ = forward(params, CFG, toks, KVCache.create(CFG, 1, 16))
    narrow, _ = draft_forward(cheap, CFG, toks, KVCache.create(CFG, 1, 16), spec=spec)
    ids = cheap.draft.head_ids
    np.testing.assert_allclose(narrow[..., ids], full[..., ids], rtol=1e-5, atol=1e-5)
    outside = np.setdiff1d(np.arange(CFG.vocab_size), np.asarray(ids))
    assert bool(jnp.all(jnp.isneginf(narrow[..., outside])))


def test_draft_copy_size_and_missing_copy():
    params = tinymodel.trained()
    layer_params = sum(x.size for x in jax.tree.leaves(params.layers) if x.ndim > 1)
    int8 = make_draft(params, CFG, DraftSpec("int8"))
    # One byte per layer weight (+ float32 scales, norms) and the int8 head.
    assert layer_params <= draft_bytes(int8) < 1.5 * layer_params + 2 * CFG.vocab_size * CFG.dim
    with pytest.raises(ValueError, match="with_draft"):
        draft_forward(params, CFG, jnp.zeros((1, 1), jnp.int32), KVCache.create(CFG, 1, 4), spec=DraftSpec("int8"))
    with pytest.raises(ValueError, match="precision"):
        DraftSpec("int4")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="bfloat16 is refused on CPU only")
def test_generate_refuses_bfloat16_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--dtype", "bfloat16", "--prompt",
                           "Hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dtype bfloat16")
