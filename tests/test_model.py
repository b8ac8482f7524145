"""Model and KV-cache invariants on tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.config import PRESETS, Config, SkipMask
from jaxspec.model import KVCache, init_params, param_shapes, params_from_flat, params_to_flat
from jaxspec.model import forward as _forward

forward = jax.jit(_forward, static_argnums=(1, 4))


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def model(request):
    cfg = PRESETS[request.param]
    return cfg, init_params(cfg, jax.random.key(1))


TOKS = jnp.asarray([[5, 7, 9, 11, 13, 17, 19, 23, 29, 31]], jnp.int32)


def test_prefill_then_steps_equals_full_forward(model):
    cfg, params = model
    full, _ = forward(params, cfg, TOKS, KVCache.create(cfg, 1, 32))
    logits, cache = forward(params, cfg, TOKS[:, :4], KVCache.create(cfg, 1, 32))
    got = [logits]
    for t in range(4, TOKS.shape[1]):
        logits, cache = forward(params, cfg, TOKS[:, t : t + 1], cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=2e-5, rtol=1e-5)
    assert int(cache.lengths[0]) == TOKS.shape[1]


def test_chunk_equals_single_steps(model):
    cfg, params = model
    _, cache = forward(params, cfg, TOKS[:, :3], KVCache.create(cfg, 1, 32))
    chunk, c_chunk = forward(params, cfg, TOKS[:, 3:9], cache)
    c_step, steps = cache, []
    for t in range(3, 9):
        lg, c_step = forward(params, cfg, TOKS[:, t : t + 1], c_step)
        steps.append(lg)
    np.testing.assert_allclose(chunk, np.concatenate(steps, 1), atol=2e-5, rtol=1e-5)
    for a, b in ((c_chunk.k, c_step.k), (c_chunk.v, c_step.v)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_rollback_equals_never_drafted(model):
    cfg, params = model
    _, cache = forward(params, cfg, TOKS[:, :5], KVCache.create(cfg, 1, 32))
    ref, _ = forward(params, cfg, TOKS[:, 5:7], cache)
    # Draft garbage with a skip mask, then roll back by resetting the length and redo.
    _, drafted = forward(params, cfg, jnp.asarray([[99, 98, 97]]), cache, SkipMask(attn=(1,), mlp=(2,)))
    got, _ = forward(params, cfg, TOKS[:, 5:7], drafted.replace(lengths=cache.lengths))
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_skipped_sublayer_is_identity_and_writes_no_kv(model):
    cfg, params = model
    cache0 = KVCache.create(cfg, 1, 32)
    _, cache = forward(params, cfg, TOKS[:, :4], cache0, SkipMask(attn=(0, 2)))
    assert not np.any(np.asarray(cache.k[0])) and not np.any(np.asarray(cache.k[2]))
    assert np.any(np.asarray(cache.k[1]))
    # Skipping every sublayer leaves only embedding → final norm → head.
    all_skip = SkipMask(attn=range(cfg.n_layers), mlp=range(cfg.n_layers))
    logits, _ = forward(params, cfg, TOKS, cache0, all_skip)
    bare = params.replace(layers=())
    ref, _ = forward(bare, cfg.replace(n_layers=0), TOKS, KVCache.create(cfg.replace(n_layers=0), 1, 32))
    np.testing.assert_allclose(logits, ref, atol=1e-6)
    full, _ = forward(params, cfg, TOKS, cache0)
    empty, _ = forward(params, cfg, TOKS, cache0, SkipMask())
    np.testing.assert_array_equal(full, empty)


def test_ragged_batch_rows_match_single_rows(model):
    cfg, params = model
    prompts = [TOKS[0, :7], TOKS[0, 2:5]]
    T = 8
    toks = np.zeros((2, T), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    _, cache = forward(params, cfg, jnp.asarray(toks), KVCache.create(cfg, 2, 32))
    cache = cache.replace(lengths=jnp.asarray([len(p) for p in prompts], jnp.int32))
    nxt = jnp.asarray([[3], [4]], jnp.int32)
    batched, _ = forward(params, cfg, nxt, cache)
    for b, p in enumerate(prompts):
        _, c1 = forward(params, cfg, jnp.asarray(p)[None], KVCache.create(cfg, 1, 32))
        single, _ = forward(params, cfg, nxt[b : b + 1], c1)
        np.testing.assert_allclose(batched[b], single[0], atol=2e-5, rtol=1e-5)


def test_params_flat_round_trip_and_shape_errors():
    cfg = PRESETS["tiny"]
    params = init_params(cfg, jax.random.key(0))
    flat = params_to_flat(params)
    assert set(flat) == set(param_shapes(cfg))
    again = params_from_flat(cfg, flat)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, again))
    bad = dict(flat, **{"layers.1.wk": flat["layers.1.wk"][:, :1]})
    with pytest.raises(ValueError, match=r"layers\.1\.wk"):
        params_from_flat(cfg, bad)
    with pytest.raises(ValueError, match=r"missing \['layers\.0\.wq'\]"):
        params_from_flat(cfg, {k: v for k, v in flat.items() if k != "layers.0.wq"})


def test_config_validation_and_hf_round_trip():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Config(vocab_size=10, dim=8, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8)
    cfg = PRESETS["llama2-70b"]
    assert Config.from_json(cfg.to_json()) == cfg
    hf = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "num_hidden_layers": 80,
          "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}
    assert Config.from_hf(hf) == cfg
    assert hash(SkipMask(attn=(3, 1, 1))) == hash(SkipMask(attn=(1, 3)))
    with pytest.raises(ValueError, match="outside"):
        SkipMask(mlp=(40,)).validate(40)



@pytest.mark.parametrize("start", [0, 3, 6])
def test_query_blocks_equal_one_block(start):
    """A long chunk attends in query blocks, each over the keys it can see; the result is the one-block result."""
    from jaxspec import model

    B, T, S, kv, g, hd = 2, 16, 24, 2, 3, 8
    ks = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(ks[0], (B, T, kv, g, hd))
    k, v = (jax.random.normal(kk, (B, S, kv, hd)) for kk in ks[1:])
    positions = jnp.asarray([[start], [min(start + 2, S - T)]]) + jnp.arange(T)[None]  # rows start apart
    one = model.attend_jnp(q, k, v, positions)  # eagerly: a jit trace cached for these shapes would skip the blocks
    old, model.QUERY_BLOCK = model.QUERY_BLOCK, 4  # 4 blocks of 4 queries
    try:
        blocks = model.attend_jnp(q, k, v, positions)
    finally:
        model.QUERY_BLOCK = old
    np.testing.assert_allclose(blocks, one, atol=1e-6, rtol=1e-6)
