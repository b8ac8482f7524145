"""Sharded prefill on 8 simulated CPU devices: ``MeshDecoder`` builds and fills the KV cache sharded like decode
(batch over ``data``, KV heads over ``model``), so each device holds 1/8 of it, with the one-device values; and
``save_params`` writes sharded parameters shard by shard, restored onto another mesh with the same values.

Runs in a subprocess (this file as a script), since the pytest process has imported jax with one device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_sharding import env_with_devices

PROMPTS = [[1] + [3 + (7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((3, 20, 9, 14, 1, 30, 5, 17))]


def child(workdir: Path) -> None:
    import jax

    from jaxspec import sharding as S
    from jaxspec.checkpoint import load_checkpoint, save_params
    from jaxspec.config import PRESETS
    from jaxspec.decode import Decoder, prefill
    from jaxspec.model import init_params

    out = {}
    for spec, cfg in (("8x1", PRESETS["tiny"]), ("2x4", PRESETS["tiny"].replace(n_kv_heads=4))):
        mesh = S.make_mesh(spec)
        params = init_params(cfg, jax.random.key(1))
        ref = prefill(params, Decoder(cfg), PROMPTS, 8).cache
        got = prefill(S.shard_params(params, cfg, mesh), S.MeshDecoder.wrap(Decoder(cfg), mesh), PROMPTS, 8).cache
        kv = (got.k, got.v)
        out[spec] = {
            "per_device": S.bytes_per_device(kv), "unsharded": sum(a.nbytes for a in jax.tree.leaves(kv)),
            "spec": str(tuple(got.k.sharding.spec)), "same_sharding": all(
                a.sharding == b for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(S.cache_shardings(got, mesh)),
                                                strict=True)),
            "shard_shape": list(got.k.addressable_shards[0].data.shape),
            "values": all(np.allclose(np.asarray(a), np.asarray(b), atol=1e-5)
                          for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)),
        }
    sharded = S.shard_params(params, cfg, mesh)  # the 2x4 mesh's
    save_params(workdir / "ckpt", cfg, sharded)
    _, back, _ = load_checkpoint(workdir / "ckpt", "float32", shardings=S.param_sharding_fn(S.make_mesh("1x8")))
    out["save_params"] = all(np.array_equal(np.asarray(a), np.asarray(b))
                             for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True))
    print(json.dumps(out))


def test_prefill_cache_sharded_one_eighth_per_device(tmp_path):
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env_with_devices(8), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["8x1"]["spec"] == "(None, 'data', None, None, None)"  # 2 KV heads: the model axis has size 1
    assert got["2x4"]["spec"] == "(None, 'data', None, 'model', None)"
    for spec in ("8x1", "2x4"):
        g = got[spec]
        assert g["per_device"] * 8 == g["unsharded"], g
        assert g["same_sharding"] and g["values"], g
    assert got["2x4"]["shard_shape"][1] == 4 and got["2x4"]["shard_shape"][3] == 1  # batch 8/2, KV heads 4/4
    assert got["save_params"]


if __name__ == "__main__":
    child(Path(sys.argv[1]))
