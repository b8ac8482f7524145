"""Sharded decoding on 8 simulated CPU devices: AR and SSD on a 2x4 mesh give one device's AR tokens (logits allclose),
a checkpoint saved from one mesh restores onto others, and a batch job on the mesh writes one device's results.

XLA's device count is fixed when jax is imported, and the pytest process has imported it with one device, so the
sharded half runs in a subprocess: this file run as a script (``python tests/test_sharding.py WORKDIR``), started
by the ``sharded`` fixture while the parent computes the one-device references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

DEVICES = 8
MESH = "2x4"  # tiny: 4 heads / 2 KV heads, so KV heads (2 < 4 model shards) are replicated
RESTORE_MESHES = ("4x2", "1x8")
PROMPTS = [[1] + [3 + (5 + 3 * i + 2 * j) % 250 for j in range(n)] for i, n in enumerate((1, 3, 8, 15, 16, 17, 30, 2))]
BUDGETS = [12, 7, 12, 12, 3, 12, 12, 9]
SKIP = {"attn": (1,), "mlp": (2,)}
BATCH_LINES = [{"id": f"q{i}", "prompt": "abcdefghij"[: 1 + i % 7] * (1 + i % 3)} for i in range(7)]


class ByteTokenizer:
    """Bytes as token ids (the tiny model's vocabulary is 256)."""

    def encode(self, text: str) -> list[int]:
        return [1, *text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i >= 3).decode("latin-1")


def env_with_devices(n: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--_ignored")
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip(),
                JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def decoders(cfg):  # noqa: ANN001, ANN201
    from jaxspec.config import SkipMask
    from jaxspec.decode import Decoder
    from jaxspec.speculative import SpecDecoder

    return Decoder(cfg, eos_ids=cfg.eos_ids), SpecDecoder(cfg, eos_ids=cfg.eos_ids, skip=SkipMask(**SKIP), max_draft=4)


def logits_of_batch(params, cfg, cache_sharding=None):  # noqa: ANN001, ANN201
    """Logits of the first 16 tokens of every prompt, teacher-forced (padding past a prompt's end)."""
    import jax
    import jax.numpy as jnp

    from jaxspec.model import KVCache, forward

    toks = np.zeros((len(PROMPTS), 16), np.int32)
    for b, p in enumerate(PROMPTS):
        toks[b, : min(len(p), 16)] = p[:16]
    cache = KVCache.create(cfg, len(PROMPTS), 32)
    if cache_sharding is not None:
        cache = jax.device_put(cache, cache_sharding(cache))
    return np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, jnp.asarray(toks), cache)[0])


def run_batch(params, cfg, workdir: Path, out: Path, mesh=None) -> dict:  # noqa: ANN001
    from jaxspec.batch import run_batch_job

    ar = decoders(cfg)[0]
    return run_batch_job(workdir / "in.jsonl", out, lambda s: ar, params, ByteTokenizer(), 4, 6, mesh=mesh,
                         progress=False)


def child(workdir: Path) -> None:
    """The sharded half, run with 8 devices; writes ``child.json`` and ``child.npz`` into ``workdir``."""
    import jax

    from jaxspec import sharding as S
    from jaxspec.checkpoint import load_checkpoint, save_checkpoint
    from jaxspec.decode import generate
    from jaxspec.model import params_to_flat

    assert jax.device_count() == DEVICES, jax.devices()
    cfg, params = load_inputs(workdir)
    mesh = S.make_mesh(MESH)
    p = S.shard_params(params, cfg, mesh)
    specs = {k: str(tuple(v.sharding.spec)) for k, v in params_to_flat(p).items() if not k.startswith("layers.1")}
    out: dict = {"specs": specs, "n_devices": {k: len(v.sharding.device_set) for k, v in params_to_flat(p).items()}}
    logits = logits_of_batch(p, cfg, lambda c: S.cache_shardings(c, mesh))
    for dec in decoders(cfg):
        res = generate(S.MeshDecoder.wrap(dec, mesh), p, PROMPTS, BUDGETS)
        out[dec.mode] = res.tokens
        out[f"{dec.mode}_stats"] = None if res.stats is None else res.stats.accepted.tolist()
    # Save from the 2x4 mesh (gathered one tensor at a time), restore straight into other meshes' shardings.
    save_checkpoint(workdir / "ckpt", cfg, params_to_flat(p).items())
    out["restore"] = {}
    for spec in RESTORE_MESHES:
        m = S.make_mesh(spec)
        _, q, _ = load_checkpoint(workdir / "ckpt", "float32", shardings=S.param_sharding_fn(m))
        want = S.param_shardings(cfg, m)
        same_sharding = all(a.sharding == w for a, w in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True))
        same_values = all(np.array_equal(np.asarray(a), np.asarray(b))
                          for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(params), strict=True))
        out["restore"][spec] = {"sharding": same_sharding, "values": same_values,
                                "wq_spec": str(tuple(q.layers[0].wq.sharding.spec))}
    out["batch"] = run_batch(p, cfg, workdir, workdir / "out_mesh.jsonl", mesh)
    (workdir / "child.json").write_text(json.dumps(out))
    np.savez(workdir / "child.npz", logits=logits)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):  # noqa: ANN001, ANN201
    """Start the 8-device child, compute one device's references meanwhile; returns (child, reference)."""
    import tinymodel

    from jaxspec.decode import generate

    workdir = tmp_path_factory.mktemp("sharded")
    cfg, params = tinymodel.CFG, tinymodel.trained()
    save_inputs(workdir, cfg, params)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, str(workdir)], env=env_with_devices(DEVICES),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Greedy SSD is lossless (test_speculative), so one device's AR tokens are the reference for both modes.
        ref: dict = {"logits": logits_of_batch(params, cfg), "ar": generate(decoders(cfg)[0], params, PROMPTS,
                                                                            BUDGETS).tokens}
        ref["batch"] = run_batch(params, cfg, workdir, workdir / "out_one.jsonl")
        log, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"sharded child failed:\n{log[-4000:]}"
    print(f"sharded child + references: {time.perf_counter() - t0:.1f} s")
    got = json.loads((workdir / "child.json").read_text())
    with np.load(workdir / "child.npz") as z:
        got["logits"] = z["logits"]
    return got, ref, workdir


def test_rules_place_heads_mlp_vocab_and_batch():
    from jax.sharding import AbstractMesh, AxisType, PartitionSpec

    from jaxspec.config import PRESETS
    from jaxspec.sharding import logical_spec, parse_mesh

    def mesh(d: int, m: int) -> AbstractMesh:
        return AbstractMesh((d, m), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    big = PRESETS["llama2-70b"]  # 64 heads, 8 KV heads
    kv = ("embed", "kv_heads", "head_dim")
    assert logical_spec(kv, (big.dim, 8, 128), mesh(1, 8)) == PartitionSpec(None, "model", None)
    assert logical_spec(kv, (big.dim, 8, 128), mesh(1, 16)) == PartitionSpec(None, None, None)  # 8 < 16: replicated
    assert logical_spec(kv, (64, 2, 16), mesh(2, 4)) == PartitionSpec(None, None, None)
    assert logical_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh(2, 4)) == PartitionSpec(None, "model", None)
    assert logical_spec(("embed", "mlp"), (big.dim, big.hidden_dim), mesh(1, 8)) == PartitionSpec(None, "model")
    assert logical_spec(("vocab", "embed"), (32000, 8192), mesh(1, 8)) == PartitionSpec("model", None)
    cache = ("batch", "seq", "kv_heads", "head_dim")
    assert logical_spec(cache, (8, 4096, 8, 128), mesh(2, 4)) == PartitionSpec("data", None, "model", None)
    assert logical_spec(cache, (3, 4096, 8, 128), mesh(2, 4)) == PartitionSpec(None, None, "model", None)
    assert parse_mesh("2x4") == (2, 4) and parse_mesh("8") == (1, 8)
    with pytest.raises(ValueError, match="DATAxMODEL"):
        parse_mesh("2x")


def test_distributed_settings_from_env():
    from jaxspec.distributed import settings

    assert settings({}) is None and settings({"TPU_WORKER_HOSTNAMES": "w0"}) is None  # one host: nothing to do
    coord = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert settings(coord) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert settings({**coord, "JAX_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"] == [0, 1]
    assert settings({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {} and settings({"SLURM_NTASKS": "2"}) == {}
    assert settings({"SLURM_NTASKS": "2", "JAXSPEC_DISTRIBUTED": "0"}) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


def test_params_sharded_as_the_rules_say(sharded):
    got, _, _ = sharded
    specs = got["specs"]
    assert specs["layers.0.wq"] == "(None, 'model', None)"
    assert specs["layers.0.wk"] == "(None, None, None)"  # 2 KV heads < 4 model shards: replicated
    assert specs["layers.0.wo"] == "('model', None, None)"
    assert specs["layers.0.w_up"] == "(None, 'model')" and specs["layers.0.w_down"] == "('model', None)"
    assert specs["embed"] == "('model', None)" and specs["lm_head"] == "(None, 'model')"
    assert set(got["n_devices"].values()) == {DEVICES}


def test_sharded_logits_allclose(sharded):
    got, ref, _ = sharded
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["ar", "ssd"])
def test_sharded_decoding_gives_one_device_tokens(sharded, mode):
    got, ref, _ = sharded
    assert got[mode] == ref["ar"]
    assert [len(t) for t in got[mode]] == BUDGETS or any(0 in t for t in got[mode])  # full budgets unless EOS
    if mode == "ssd":
        assert sum(got["ssd_stats"]) > 0  # the draft was accepted at times: ragged acceptance across rows


def test_restore_onto_other_meshes(sharded):
    got, _, _ = sharded
    for spec in RESTORE_MESHES:
        assert got["restore"][spec] == {"sharding": True, "values": True, "wq_spec": got["restore"][spec]["wq_spec"]}
    assert got["restore"]["4x2"]["wq_spec"] == "(None, 'model', None)"  # 4 heads over 2 model shards
    assert got["restore"]["1x8"]["wq_spec"] == "(None, None, None)"  # 4 heads < 8 shards: replicated


def batch_results(path: Path) -> list[tuple]:
    """(id, text, token ids, stats without timing) per line, in file order."""
    from jaxspec.batch import iter_results

    return [(r["id"], r["text"], r["token_ids"], {k: v for k, v in r["stats"].items() if k != "batch_tokens_per_s"})
            for r in iter_results(path)]


def test_batch_job_on_mesh_equals_one_device(sharded):
    got, ref, workdir = sharded
    assert got["batch"]["written"] == ref["batch"]["written"] == len(BATCH_LINES)
    assert batch_results(workdir / "out_mesh.jsonl") == batch_results(workdir / "out_one.jsonl")


def save_inputs(workdir: Path, cfg, params) -> None:  # noqa: ANN001
    from jaxspec.model import params_to_flat

    (workdir / "config.json").write_text(json.dumps(cfg.to_json()))
    np.savez(workdir / "params.npz", **{k: np.asarray(v) for k, v in params_to_flat(params).items()})
    (workdir / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in BATCH_LINES))


def load_inputs(workdir: Path):  # noqa: ANN201 - (Config, Params)
    from jaxspec.config import Config
    from jaxspec.model import params_from_flat

    cfg = Config.from_json(json.loads((workdir / "config.json").read_text()))
    with np.load(workdir / "params.npz") as z:
        return cfg, params_from_flat(cfg, {k: z[k] for k in z.files})


@pytest.mark.optional
@pytest.mark.skipif(not os.environ.get("JAXSPEC_MULTIPROCESS_TEST"),
                    reason="opt-in: set JAXSPEC_MULTIPROCESS_TEST=1 to run 2 processes on one mesh (~40 s)")
def test_two_processes_one_mesh(tmp_path):
    """The same script in 2 processes x 4 CPU devices (gloo), joined by ``distributed.initialize`` from the
    environment, decodes on one 2x4 mesh spanning both and gives one device's tokens; in a batch job only process
    0 writes, the same results as one device."""
    import tinymodel

    from jaxspec.decode import generate

    cfg, params = tinymodel.CFG, tinymodel.trained()
    save_inputs(tmp_path, cfg, params)
    port = 20000 + os.getpid() % 20000
    procs = []
    for pid in range(2):
        env = dict(env_with_devices(4), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, __file__, "--multiprocess", str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    want = generate(decoders(cfg)[0], params, PROMPTS, BUDGETS).tokens
    run_batch(params, cfg, tmp_path, tmp_path / "out_one.jsonl")
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for pid in range(2):
        assert json.loads((tmp_path / f"mp{pid}.json").read_text()) == want
    assert batch_results(tmp_path / "out_mp.jsonl") == batch_results(tmp_path / "out_one.jsonl")
    import jax

    from jaxspec.checkpoint import load_checkpoint  # both processes wrote their shards of one checkpoint

    _, back, _ = load_checkpoint(tmp_path / "mp_ckpt", "float32")
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True))


def multiprocess_child(workdir: Path) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxspec import distributed
    from jaxspec import sharding as S
    from jaxspec.decode import generate

    index, count = distributed.initialize()
    assert count == 2 and jax.device_count() == 8, (count, jax.devices())
    cfg, params = load_inputs(workdir)
    mesh = S.make_mesh(MESH)
    params = S.place(params, S.param_shardings(cfg, mesh))  # the same values on both processes
    res = generate(S.MeshDecoder.wrap(decoders(cfg)[0], mesh), params, PROMPTS, BUDGETS)
    (workdir / f"mp{index}.json").write_text(json.dumps(res.tokens))
    run_batch(params, cfg, workdir, workdir / "out_mp.jsonl", mesh)
    from jaxspec.checkpoint import save_params

    save_params(workdir / "mp_ckpt", cfg, params)  # each process writes its own shards; process 0 the metadata
if __name__ == "__main__":
    if sys.argv[1] == "--multiprocess":
        multiprocess_child(Path(sys.argv[2]))
    else:
        child(Path(sys.argv[1]))
