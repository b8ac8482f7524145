"""The memory-mapped weight copy (``fastweights``): same arrays as orbax, used on later loads, rebuilt when the
checkpoint changes or the copy is damaged."""

import jax
import numpy as np
import pytest

from jaxspec import checkpoint, cpu_kernels, fastweights, model
from jaxspec.model import init_params, params_to_flat


def same(a, b) -> bool:
    fa, fb = params_to_flat(a), params_to_flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[n]), np.asarray(fb[n])) for n in fa)


@pytest.fixture
def ckpt(tmp_path, tiny_cfg, tiny_params):
    return checkpoint.save_params(tmp_path / "tiny", tiny_cfg, tiny_params)


def test_copy_is_used_and_rebuilt_when_the_checkpoint_changes(tmp_path, ckpt, tiny_cfg, tiny_params, monkeypatch):
    cache = tmp_path / "fast"
    _, first, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    (copy,) = cache.glob("*.bin")
    assert same(first, tiny_params)
    restores = []
    real = checkpoint._restore
    monkeypatch.setattr(checkpoint, "_restore", lambda *a: restores.append(1) or real(*a))
    _, again, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    assert same(again, tiny_params) and restores == []  # from the copy, not orbax
    leaf = params_to_flat(again)["embed"]
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]) and leaf.committed

    other = init_params(tiny_cfg, jax.random.PRNGKey(7))
    checkpoint.save_params(ckpt, tiny_cfg, other)  # the checkpoint is replaced: the copy is stale
    _, new, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    assert same(new, other) and restores == [1]
    assert list(cache.glob("*.bin")) == [copy]  # rewritten in place
    _, new, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    assert same(new, other) and restores == [1]


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_damaged_copy_falls_back_to_orbax(tmp_path, ckpt, tiny_params, damage):
    cache = tmp_path / "fast"
    checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    (copy,) = cache.glob("*.bin")
    data = copy.read_bytes()
    copy.write_bytes({"truncate": data[: len(data) - 5000], "header": data[:30] + b"}" + data[31:],
                      "empty": b""}[damage])
    _, params, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    assert same(params, tiny_params)
    sig = fastweights.signature(ckpt, "float32", cpu_kernels.packing())
    assert fastweights.read(copy, sig, jax.devices()[0]) is not None  # rewritten


def test_no_copy_of_a_checkpoint_over_the_size_cap(tmp_path, ckpt, tiny_params, monkeypatch):
    monkeypatch.setattr(checkpoint, "FAST_WEIGHTS_MAX_BYTES", checkpoint.checkpoint_size(ckpt / "params") - 1)
    cache = tmp_path / "fast"
    _, params, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    assert same(params, tiny_params) and not list(cache.glob("*.bin"))  # orbax only, nothing written


def test_copies_of_deleted_checkpoints_are_dropped_when_a_copy_is_written(tmp_path, tiny_cfg, tiny_params):
    import shutil

    cache = tmp_path / "fast"
    a = checkpoint.save_params(tmp_path / "a", tiny_cfg, tiny_params)
    b = checkpoint.save_params(tmp_path / "b", tiny_cfg, tiny_params)
    checkpoint.load_checkpoint(a, fast_cache=cache)
    (cache / "notes.bin").write_bytes(b"not a copy")  # not ours: left alone
    shutil.rmtree(a)
    checkpoint.load_checkpoint(b, fast_cache=cache)  # writing b's copy drops a's
    left = sorted(p.name for p in cache.glob("*.bin"))
    assert left == sorted(["notes.bin", fastweights.path_for(cache, b, tiny_cfg.dtype).name])


def test_layers_also_load_stacked_over_the_same_memory(tmp_path, ckpt, tiny_cfg, tiny_params, monkeypatch):
    """The copy keeps each kind of layer array back to back, so ``params.stacked`` is the layers' arrays stacked,
    aliasing their bytes (no second copy), and the long-chunk prefill scan over it writes what stacking per call
    writes."""
    from jaxspec import decode
    from jaxspec.model import Layer

    cache = tmp_path / "fast"
    for _ in range(2):  # the load that writes the copy, and one from it
        _, params, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
        assert params.stacked is not None
        for kind in Layer.__dataclass_fields__:
            whole, parts = getattr(params.stacked, kind), [getattr(layer, kind) for layer in params.layers]
            np.testing.assert_array_equal(np.asarray(whole), np.stack([np.asarray(p) for p in parts]))
            assert [p.unsafe_buffer_pointer() - whole.unsafe_buffer_pointer() for p in parts] == \
                [i * parts[0].nbytes for i in range(len(parts))]
    _, orbax_only, _ = checkpoint.load_checkpoint(ckpt)
    assert orbax_only.stacked is None and same(orbax_only, params)

    monkeypatch.setattr(decode, "PREFILL_BUCKETS", (16,))  # 16-token chunks run the scan over layers
    dec = decode.Decoder(tiny_cfg)
    toks = np.arange(1, 33, dtype=np.int32)[None] % tiny_cfg.vocab_size
    out = [decode.write_tokens(p, dec, dec.new_cache(1, 64), toks, [32], [32], fresh=True)
           for p in (params, params.replace(stacked=None))]
    np.testing.assert_array_equal(np.asarray(out[0][0]), np.asarray(out[1][0]))
    for a, b in ((out[0][1].k, out[1][1].k), (out[0][1].v, out[1][1].v)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    poisoned = params.replace(stacked=jax.tree.map(lambda a: a * 0, params.stacked))  # the scan reads the view
    h, _ = decode.write_tokens(poisoned, dec, dec.new_cache(1, 64), toks, [32], [32], fresh=True)
    assert not np.array_equal(np.asarray(h), np.asarray(out[0][0]))


@pytest.mark.skipif(not cpu_kernels.active(), reason="no C++ compiler: the kernel is not built")
def test_the_copy_holds_the_packed_weights_for_the_cpu_kernel(tmp_path, ckpt, tiny_params, monkeypatch):
    """Where the kernels run, a float32 load through the copy gives ``params.packed`` (what ``model.pack`` makes), and
    later loads read it from the copy instead of packing again."""
    cache = tmp_path / "fast"
    _, first, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    want = model.packed_to_flat(model.pack(tiny_params))
    monkeypatch.setattr(cpu_kernels, "pack", lambda *a: pytest.fail("packed again"))
    _, again, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
    for params in (first, again):
        got = model.packed_to_flat(params)
        assert got.keys() == want.keys() and len(want) == 1 + 7 * len(tiny_params.layers)
        assert all(np.array_equal(np.asarray(got[n]), np.asarray(want[n])) for n in want)
    _, plain, _ = checkpoint.load_checkpoint(ckpt)  # no copy: no second set of weights
    assert plain.packed is None


@pytest.mark.skipif(not cpu_kernels.active(), reason="no C++ compiler: no packed weights")
def test_packed_layers_load_stacked_and_the_decode_step_loops_over_them(tmp_path, ckpt, tiny_cfg):
    """The copy's packed weights of a kind lie back to back too: ``params.packed.stacked`` aliases the per-layer
    packed arrays, and a decode step or verify then runs as one loop over the layers with the unrolled layers'
    bits."""
    cache = tmp_path / "fast"
    for _ in range(2):  # the load that writes the copy, and one from it
        _, params, _ = checkpoint.load_checkpoint(ckpt, fast_cache=cache)
        stacked = params.packed.stacked
        assert stacked is not None
        for kind in ("wq", "wo", "w_down"):
            whole, parts = getattr(stacked, kind).data, [getattr(ly, kind).data for ly in params.packed.layers]
            assert [p.unsafe_buffer_pointer() - whole.unsafe_buffer_pointer() for p in parts] == \
                [i * parts[0].nbytes for i in range(len(parts))]
        assert stacked.attn_norm.unsafe_buffer_pointer() == params.stacked.attn_norm.unsafe_buffer_pointer()
    step = jax.jit(lambda p, t, c: model.forward(p, tiny_cfg, t, c))
    _, c = step(params, np.arange(1, 9, dtype=np.int32)[None], model.KVCache.create(tiny_cfg, 1, 32))
    unrolled = params.replace(packed=params.packed.replace(stacked=None))
    for t in (np.int32([[9]]), np.arange(9, 14, dtype=np.int32)[None]):
        assert "jaxspec_matmul_packed_at" in step.lower(params, t, c).as_text()
        for a, b in zip(jax.tree.leaves(step(params, t, c)), jax.tree.leaves(step(unrolled, t, c)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
