"""Peak host memory of converting a multi-GB Hugging Face checkpoint: conversion streams tensor by tensor.

    python benchmarks/bench_convert_rss.py                    # LLaMA-2-7B shapes, 8 layers: 3.8 GB of float16
    python benchmarks/bench_convert_rss.py --layers 32        # the full 7B (13.5 GB)

Writes random float16 weights as sharded safetensors (``model-0000k-of-0000n.safetensors`` + index, streamed in
chunks so this script stays small too) under ``--dir``, runs ``scripts/convert.py --hf`` on them in a child
process, and reports the child's peak RSS (``VmHWM``) next to the checkpoint size and its largest tensor, with
the peak anonymous (heap) and file-backed (mmapped safetensors pages) parts sampled from ``/proc``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hf_shapes(preset: str, layers: int) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """An HF ``config.json`` dict and the HF tensor shapes of ``preset`` cut to ``layers`` layers."""
    from jaxspec.config import PRESETS

    c = PRESETS[preset]
    hd = c.dim // c.n_heads
    cfg = {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": layers,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.hidden_dim,
           "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.dim,), p + "post_attention_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (c.n_heads * hd, c.dim),
            p + "self_attn.k_proj.weight": (c.n_kv_heads * hd, c.dim),
            p + "self_attn.v_proj.weight": (c.n_kv_heads * hd, c.dim),
            p + "self_attn.o_proj.weight": (c.dim, c.n_heads * hd),
            p + "mlp.gate_proj.weight": (c.hidden_dim, c.dim), p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.hidden_dim),
        })
    shapes.update({"model.norm.weight": (c.dim,), "lm_head.weight": (c.vocab_size, c.dim)})
    return cfg, shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator,
                      chunk: int = 1 << 24) -> None:
    """A float16 safetensors file of random normal * 0.02 tensors, written in ``chunk``-element pieces."""
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            left = int(np.prod(shape))
            while left:
                k = min(left, chunk)
                f.write((rng.standard_normal(k, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
                left -= k


def write_hf(out: Path, preset: str, layers: int, shards: int) -> tuple[int, int]:
    """Write the HF directory; returns (bytes of weights, bytes of the largest tensor)."""
    cfg, shapes = hf_shapes(preset, layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map, rng = {}, np.random.default_rng(0)
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: shapes[n] for n in names[k * per: (k + 1) * per]}
        write_safetensors(out / fname, part, rng)
        weight_map.update({n: fname for n in part})
    sizes = [int(np.prod(s)) * 2 for s in shapes.values()]
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                                  "weight_map": weight_map}, indent=1))
    return sum(sizes), max(sizes)


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[int, dict[str, int], str]:
    """Run ``cmd``; returns (exit code, peak memory in KiB: VmHWM, RssAnon, RssFile, output tail)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reap it ourselves: wait4 gives its rusage
        if pid:
            break
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    peak["ru_maxrss"] = usage.ru_maxrss  # KiB on Linux: the child's peak RSS, including its last moments
    return proc.returncode, peak, "".join(log)[-2000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/jaxspec-rss-bench", help="work directory (removed unless --keep)")
    ap.add_argument("--preset", default="llama2-7b", help="config preset giving the tensor shapes")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=4, help="safetensors files")
    ap.add_argument("--dtype", default="bfloat16", help="stored dtype of the converted checkpoint")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        total, largest = write_hf(work / "hf", args.preset, args.layers, args.shards)
        t_write = time.perf_counter() - t0
        cmd = [sys.executable, str(ROOT / "scripts" / "convert.py"), "--hf", str(work / "hf"), "--name", "rss-bench",
               "--out", str(work / "ckpt"), "--dtype", args.dtype]
        t0 = time.perf_counter()
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
        rc, peak, log = run_sampled(cmd, env)
        t_conv = time.perf_counter() - t0
        if rc:
            print(log, file=sys.stderr)
            print(f"error: conversion failed (exit {rc})", file=sys.stderr)
            return 1
        out_size = sum(f.stat().st_size for f in (work / "ckpt").rglob("*") if f.is_file())
        mib = 2**20
        print(f"source: {args.preset} shapes, {args.layers} layers, {args.shards} safetensors shards, float16: "
              f"{total / 1e9:.2f} GB (largest tensor {largest / mib:.0f} MiB; written in {t_write:.0f} s)")
        print(f"converted to {args.dtype}: {out_size / 1e9:.2f} GB in {t_conv:.0f} s")
        print(f"peak RSS of the conversion: {peak['ru_maxrss'] / 1024:.0f} MiB (VmHWM); sampled peaks: heap "
              f"{peak['RssAnon'] / 1024:.0f} MiB, mmapped files {peak['RssFile'] / 1024:.0f} MiB; "
              f"= {peak['ru_maxrss'] * 1024 / total:.1%} of the checkpoint")
        print(f"convert.py: {log.strip().splitlines()[-1] if log.strip() else ''}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
