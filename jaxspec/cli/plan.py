"""Plan a sharded deployment without weights: AOT-lower and compile the draft and verify steps on a simulated mesh
and report per-device memory (weights, KV cache, XLA temporaries) against a device's memory.

    python scripts/plan.py --ckpt llama2-70b --mesh 1x8 --batch 8 --max-len 4096 --dtype bfloat16
    python scripts/plan.py --ckpt llama2-70b --mesh 1x1 --weights int8 --device-mem-gb 141   # one H200

The config comes from the converted checkpoint when there is one, else from ``config.PRESETS``; the draft skips the
sublayers of the checkpoint's skip profile or a published mask (``profile.PUBLISHED_MASKS``, e.g. ``llama-2-70b``).
Devices are simulated CPU devices (``--xla_force_host_platform_device_count``), so temporaries are XLA:CPU's
estimate; GPU and TPU layouts and fusions differ somewhat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from jaxspec import cli, validate  # noqa: E402  (standard library only: jax comes after simulate_devices)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="llama2-70b", help="registered name, checkpoint directory or config preset")
    ap.add_argument("--mesh", default="1x8", help="DATAxMODEL, e.g. 1x8 or 2x4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=4096, help="prompt + new tokens per row (the KV cache length)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--device-mem-gb", type=float, default=80.0, help="memory of one device, GB (1e9 bytes)")
    ap.add_argument("--skip-profile", help="profile JSON or preset name (default: the checkpoint's, else the "
                    "project's shipped one for its model, else the preset named like it, e.g. llama-2-70b)")
    ap.add_argument("--skip-attn", help="comma-separated attention sublayers the draft skips (instead of a profile)")
    ap.add_argument("--skip-mlp", help="comma-separated MLP sublayers the draft skips (instead of a profile)")
    ap.add_argument("--max-draft", type=int, default=12, help="drafts per cycle: verify feeds max_draft + 1 tokens")
    ap.add_argument("--weights", choices=["native", "int8"], default="native",
                    help="int8: weight-only int8 matrices with one bfloat16 scale per output channel (memory plan "
                         "only: the compiled steps and activations stay in --dtype)")
    ap.add_argument("--json", action="store_true", help="also print the plan as one JSON line")
    return ap.parse_args(argv)


def simulate_devices(n: int) -> None:
    """Make XLA:CPU expose ``n`` devices; must run before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("jax is already imported: the simulated device count can no longer change")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def config_and_mask(args: argparse.Namespace):  # noqa: ANN201 - (Config, SkipMask, source, profile name)
    """The model config (converted checkpoint, else preset) and the draft's skip mask with where it came from."""
    from jaxspec import checkpoint
    from jaxspec.config import PRESETS, SkipMask
    from jaxspec.profile import PROFILE_NAME, PUBLISHED_MASKS, find_profile, load_profile

    ckpt, skip_profile = args.ckpt, args.skip_profile
    reg = checkpoint.registry()
    path = Path(ckpt) if Path(ckpt).is_dir() else checkpoint.checkpoints_root() / ckpt
    if checkpoint.is_checkpoint(path):
        cfg, source = checkpoint.read_config(path), str(path)
    elif ckpt in reg or ckpt in PRESETS:
        preset = reg[ckpt]["preset"] if ckpt in reg else ckpt
        cfg, source = PRESETS[preset], f"config.PRESETS[{preset!r}] (checkpoint not converted)"
    else:
        raise ValueError(f"{ckpt!r} is neither a checkpoint nor a registered name nor a preset")
    if args.skip_attn or args.skip_mlp:
        mask = SkipMask(validate.layers(args.skip_attn, "--skip-attn"), validate.layers(args.skip_mlp, "--skip-mlp"))
        return cfg, mask.validate(cfg.n_layers), source, "--skip-attn/--skip-mlp"
    found = find_profile(path, cfg) if skip_profile is None and checkpoint.is_checkpoint(path) else None
    if found is not None:  # the checkpoint's own or the shipped profile: its self-draft (else its winner's mask)
        own = path / PROFILE_NAME
        return cfg, found.for_drafter("skip").mask, source, str(own) if own.is_file() else "the shipped profile"
    if skip_profile is None:
        guess = re.sub(r"^(llama|codellama)(\d)", r"\1-\2", ckpt)  # llama2-70b -> llama-2-70b
        skip_profile = guess if guess in PUBLISHED_MASKS else ckpt
    prof = load_profile(skip_profile, cfg)
    return cfg, prof.mask, source, skip_profile


def int8_weight_bytes(cfg, mesh) -> int:  # noqa: ANN001 - (Config, Mesh)
    """Per-device bytes of weight-only int8: every matrix 1 byte per element plus one bfloat16 scale per output
    channel (embedding: per row), norms in bfloat16."""
    from jaxspec import sharding as S
    from jaxspec.model import param_shapes

    total, fn = 0, S.param_sharding_fn(mesh)
    for name, shape in param_shapes(cfg).items():
        shard = fn(name, shape).shard_shape(shape)
        if len(shape) == 1:
            total += 2 * shard[0]
            continue
        n = 1
        for d in shard:
            n *= d
        kind = name.rsplit(".", 1)[-1]
        channels = shard[0] if kind == "embed" else (shard[1] * shard[2] if kind in ("wq", "wk", "wv") else shard[-1])
        total += n + 2 * channels
    return total


def main(argv: list[str] | None = None) -> int:
    args = validate.flags(parse_args(argv))
    data, model = validate.parse_mesh(args.mesh)
    simulate_devices(data * model)

    import jax
    import jax.numpy as jnp

    from jaxspec import sharding as S
    from jaxspec.config import SkipMask
    from jaxspec.decode import capacity
    from jaxspec.model import KVCache, forward
    from jaxspec.speculative import SpecDecoder

    cfg, mask, source, prof_name = config_and_mask(args)
    if args.max_len > cfg.max_seq_len:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {cfg.max_seq_len}")
    cfg = cfg.replace(dtype=args.dtype)
    mesh = S.make_mesh(args.mesh)
    B, K = args.batch, args.max_draft
    decoder = SpecDecoder(cfg, skip=mask, max_draft=K)
    extra, seq = decoder.extra, capacity(decoder, args.max_len)  # what decode.prefill allocates for this decoder


    def compile_steps(dtype: str) -> tuple[int, int, dict[str, dict[str, float]]]:
        """Per-device weight and cache bytes in ``dtype`` and the compiled draft and verify steps' memory."""
        c = cfg.replace(dtype=dtype)
        params = S.abstract_params(c, mesh, dtype)
        kv = jax.ShapeDtypeStruct(KVCache.shape(c, B, seq), dtype)
        shapes = KVCache(k=kv, v=kv, lengths=jax.ShapeDtypeStruct((B,), jnp.int32))
        cache_sh = S.cache_shardings(shapes, mesh)
        cache = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, cache_sh)
        out = {}
        for name, skip, T in (("draft", mask, 1), ("verify", SkipMask(), K + 1)):
            logits_sh = S.named(mesh, ("batch", "seq", "vocab"), (B, T, c.vocab_size))
            fn = jax.jit(lambda p, t, kv, skip=skip: forward(p, c, t, kv, skip), donate_argnums=2,
                         out_shardings=(logits_sh, cache_sh))
            tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=S.named(mesh, ("batch", "seq"), (B, T)))
            t0 = time.perf_counter()
            m = fn.lower(params, tokens, cache).compile().memory_analysis()
            out[name] = {"tokens": T, "compile_s": round(time.perf_counter() - t0, 1), "temp": m.temp_size_in_bytes,
                         "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                         "alias": m.alias_size_in_bytes}
        return S.bytes_per_device(params), S.bytes_per_device(cache), out

    weights, kv_bytes, steps = compile_steps(args.dtype)
    if args.weights == "int8":
        weights = int8_weight_bytes(cfg, mesh)
    # XLA:CPU computes bfloat16/float16 dots by upcasting their operands, so its temporaries hold float32 copies of
    # the weights and cache that GPUs and TPUs never make. Temporaries of the same steps in float32 (activations
    # twice as large, no copies) bound the device's from above; the literal XLA:CPU figure is reported too.
    f32 = steps if args.dtype == "float32" else compile_steps("float32")[2]
    temp = max(st["temp"] for st in f32.values())
    cpu_temp = max(st["temp"] for st in steps.values())
    total, cpu_total, limit = weights + kv_bytes + temp, weights + kv_bytes + cpu_temp, args.device_mem_gb * 1e9
    kv_spec = S.logical_spec(("batch", "seq", "kv_heads", "head_dim"), (B, seq, cfg.n_kv_heads, cfg.head_dim), mesh)
    report: dict = {
        "ckpt": args.ckpt, "config": source, "mesh": args.mesh, "devices": data * model, "batch": B,
        "max_len": args.max_len, "cache_len": seq, "dtype": args.dtype, "weights": args.weights,
        "skip_profile": prof_name,
        "draft_skips": {"attn": len(mask.attn), "mlp": len(mask.mlp), "layers": cfg.n_layers},
        "kv_heads_sharded": kv_spec[2] is not None,
        "per_device": {"weights": weights, "kv_cache": kv_bytes, "temp": temp, "total": total,
                       "xla_cpu_temp": cpu_temp, "xla_cpu_total": cpu_total, "limit": int(limit),
                       "fits": total <= limit},
        "steps": steps, "steps_float32": f32,
    }
    # Headroom: KV cache and temporaries grow with the batch (upper bound: proportionally) and the cache with length.
    per_row = (kv_bytes + temp) / B
    max_batch = int((limit - weights) // per_row) if limit > weights else 0
    per_pos = kv_bytes / seq
    max_ctx = min(int((limit - weights - temp) // per_pos) - extra if limit > weights + temp else 0, cfg.max_seq_len)
    report["headroom"] = {"max_batch_at_max_len": max_batch, "max_len_at_batch": max(max_ctx, 0)}

    print(f"plan: {args.ckpt} ({source}): {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, "
          f"vocab {cfg.vocab_size}, {args.dtype}")
    print(f"mesh {args.mesh} (data x model, {data * model} simulated devices); batch {B}, max-len {args.max_len} "
          f"(KV cache {seq} positions); KV heads {'sharded' if kv_spec[2] else 'replicated'} over model={model}")
    print(f"draft step: 1 token, skip profile {prof_name} ({len(mask.attn)} attention + {len(mask.mlp)} MLP "
          f"sublayers of {cfg.n_layers} skipped); verify step: {K + 1} tokens, full model")
    print("per device:")
    print(f"  weights         {gb(weights)}" + ("   (int8 weight-only + bfloat16 per-channel scales)"
                                               if args.weights == "int8" else ""))
    print(f"  KV cache        {gb(kv_bytes)}")
    for name in steps:
        print(f"  {name:<6} temp     {gb(f32[name]['temp'])}   (XLA:CPU in {args.dtype}: {gb(steps[name]['temp'])}; "
              f"arguments {gb(steps[name]['argument'])}, aliased {gb(steps[name]['alias'])}; "
              f"compiled in {steps[name]['compile_s']} s)")
    print(f"  total           {gb(total)} = weights + KV cache + largest temporaries")
    if args.dtype != "float32":
        print(f"  (temporaries: the float32 compile's, an upper bound on a GPU/TPU; XLA:CPU's own {args.dtype} "
              f"figure includes float32 copies of the weights and cache: total {gb(cpu_total)}, "
              f"{'fits too' if cpu_total <= limit else 'over the limit through those copies'})")
    print(f"  headroom: batch up to {max_batch} at max-len {args.max_len}; max-len up to {max(max_ctx, 0)} at batch {B}"
          f" (the model's context is {cfg.max_seq_len})")
    verdict = "FITS" if total <= limit else "DOES NOT FIT"
    print(f"{verdict} in {args.device_mem_gb:g} GB per device ({100 * total / limit:.1f}% used)")
    if args.json:
        print(json.dumps(report))
    return 0 if total <= limit else 1


def entry() -> None:
    """Console script ``jaxspec-plan`` (and ``python scripts/plan.py``)."""
    cli.exit(cli.run(main))


if __name__ == "__main__":
    entry()
