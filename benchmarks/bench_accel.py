"""Accelerator benchmark in one command: bfloat16 LLaMA-2 shapes (random weights) and SmolLM2 end to end.

    python benchmarks/bench_accel.py --out bench-accel                  # GPU/TPU: 7B and 13B (70B when it fits)
    python benchmarks/bench_accel.py --shapes tiny --batches 1,2 --verify 2,4 --out /tmp/smoke    # CPU smoke run

Part 1 (per shape, batch 1/8/32): AR decode tokens/s and its fraction of the HBM bandwidth limit (bytes read per
step: weights + KV cache, over the device's spec peak from ``PEAK_GBS`` and over a measured copy bandwidth); the
cost of one draft step for the paper's published masks (``profile`` presets) and every-other-layer masks and of
verify passes of 2-16 tokens, in AR steps; and the speedup ``jaxspec.costmodel`` predicts from those costs at the
paper's acceptance. ``--layers N`` times an N-layer truncation and scales to full depth by ``costmodel.LayerCosts``.

Part 2 (``--e2e``, SmolLM2-135M's real weights by default, bfloat16): every mode of ``MODES`` end to end, in
interleaved rounds: tokens/s, speedup over AR, acceptance; checks greedy output == AR token for token, counts XLA
compilations during a warmed request (must be 0), runs each request as ONE ``run`` call under
``jax.transfer_guard("disallow")`` and checks the compiled loop holds no host callback.

Markdown and JSON are rewritten into ``--out`` after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the HF peer's child
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec import profile  # noqa: E402
from jaxspec.config import PRESETS, Config, SkipMask  # noqa: E402
from jaxspec.costmodel import LayerCosts, predicted_speedup  # noqa: E402
from jaxspec.decode import Decoder, prefill  # noqa: E402
from jaxspec.model import KVCache, Params, forward, init_params  # noqa: E402
from jaxspec.roofline import median_s as timed  # noqa: E402
from jaxspec.speculative import SpecDecoder  # noqa: E402

SHAPES = {"7b": "llama2-7b", "13b": "llama2-13b", "70b": "llama2-70b", "tiny": "tiny"}
PUBLISHED: dict[str, tuple[int, SkipMask]] = getattr(profile, "PUBLISHED_MASKS", None) or profile.PRESETS
# HBM peak, GB/s (vendor spec sheets), by a substring of ``device.device_kind``; the longest match wins.
PEAK_GBS = {"H100": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100": 1555, "A100-SXM4-80GB": 2039,
            "A100 80GB PCIe": 1935, "L40S": 864, "L4": 300, "A10G": 600, "V100": 900, "TPU v4": 1200,
            "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765, "TPU v6 lite": 1640, "TPU v6e": 1640}
# Acceptance the prediction assumes: the paper's adaptive-θ rule holds acceptance at its target of 0.9
# (``speculative.update_threshold``); swept too, since the real figure depends on model and task.
ACCEPTANCE = (0.8, 0.9, 0.95)
# End-to-end modes: name → decoder for (config, eos ids, the skip mask). Add a drafter in one line here.
MODES: dict[str, Callable[[Config, tuple[int, ...], SkipMask], Decoder]] = {
    "ar": lambda cfg, eos, skip: Decoder(cfg, eos_ids=eos),
    "skip": lambda cfg, eos, skip: SpecDecoder(cfg, eos_ids=eos, skip=skip),
    "ngram": lambda cfg, eos, skip: SpecDecoder(cfg, eos_ids=eos, drafter="ngram"),
    "ngram-adaptive": lambda cfg, eos, skip: SpecDecoder(cfg, eos_ids=eos, drafter="ngram", adaptive_k=True),
    "hybrid": lambda cfg, eos, skip: SpecDecoder(cfg, eos_ids=eos, drafter="hybrid", skip=skip),
}
TEXTS = ("The history of the Roman Empire began when", "def fibonacci(n):", "Write a haiku about the sea.")
COMPILES = [0]
T0 = time.perf_counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: COMPILES.__setitem__(0, COMPILES[0] + (name == "/jax/core/compile/backend_compile_duration")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    ap.add_argument("--out", default="bench-accel", help="directory for report.md and report.json")
    ap.add_argument("--shapes", default="7b,13b,70b", help=f"comma list of {','.join(SHAPES)} (70b runs if it fits)")
    ap.add_argument("--layers", type=int, help="time an N-layer truncation, scale to full depth (costmodel)")
    ap.add_argument("--batches", type=ints, default=(1, 8, 32))
    ap.add_argument("--verify", type=ints, default=(2, 4, 8, 16), help="verify chunk lengths timed")
    ap.add_argument("--context", type=int, default=512, help="cache positions filled when a pass is timed")
    ap.add_argument("--e2e", default="smollm2-135m", help="checkpoint for part 2 ('' to skip)")
    ap.add_argument("--e2e-skip", help="skip profile/preset for the e2e 'skip' mode (default: the checkpoint's "
                                       "skip_profile.json, else every other middle attention sublayer)")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="start no new batch or shape after this many seconds (the device tool allows 600 per call)")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers greedy decode (needs torch)")
    ap.add_argument("--hf-child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Report:
    """Sections of markdown and JSON, both rewritten atomically after every section."""

    def __init__(self, out: Path, head: dict[str, Any]) -> None:
        self.out, self.data, self.md = out, dict(head), [f"# bench_accel: {head['device']}\n",
                                                          f"```\n{json.dumps(head)}\n```\n"]
        out.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, value: Any, md: str, replace: bool = False) -> None:
        """Record a section (``replace``: update the section ``key`` added last, e.g. one more table row)."""
        if replace and key in self.data:
            self.md[-1] = md
            print(md.rstrip().splitlines()[-1], flush=True)
        else:
            self.md.append(md)
            print(md, flush=True)
        self.data[key] = value
        for name, text in (("report.json", json.dumps(self.data, indent=1)), ("report.md", "\n".join(self.md))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text + "\n")
            os.replace(tmp, self.out / name)


def pass_seconds(params: Params, cfg: Config, B: int, T: int, skip: SkipMask, context: int, n: int = 8) -> float:
    """Seconds per forward pass of a (B, T) chunk appended at ``context`` (n passes in one jitted loop)."""

    @jax.jit
    def loop(params: Params, cache: KVCache) -> jax.Array:
        def body(i: int, c: tuple) -> tuple:
            logits, cache = forward(params, cfg, jnp.full((B, T), 7, jnp.int32), c[0], skip)
            return cache.replace(lengths=c[0].lengths), c[1] + logits[0, -1, 0]
        return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

    cache = KVCache.create(cfg, B, context + T).replace(lengths=jnp.full((B,), context, jnp.int32))
    return timed(lambda: loop(params, cache), 3) / n


def copy_gbs(nbytes: int) -> float:
    """Measured device copy bandwidth: read + write of an ``nbytes`` bfloat16 array."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x + jnp.bfloat16(1))
    return 2 * nbytes / timed(lambda: f(x), 5) / 1e9


def spec_peak(kind: str) -> tuple[str, float] | None:
    hits = [k for k in PEAK_GBS if k.lower() in kind.lower()]
    return (max(hits, key=len), float(PEAK_GBS[max(hits, key=len)])) if hits else None


def draft_masks(n_layers: int) -> dict[str, SkipMask]:
    """The published masks for this depth and every-other-layer masks."""
    odd = tuple(range(1, n_layers, 2))
    masks = {name: m for name, (n, m) in PUBLISHED.items() if n == n_layers}
    return {**masks, "attn-odd": SkipMask(attn=odd), "odd-layers": SkipMask(attn=odd, mlp=odd)}


def bench_shape(rep: Report, name: str, args: argparse.Namespace, peak: float | None, copy: float) -> None:
    """Part 1 for one shape: AR, draft and verify costs per batch, bandwidth fractions, predicted speedups."""
    full = PRESETS[SHAPES[name]].replace(dtype="bfloat16")
    L = full.n_layers
    n = min(args.layers or L, L)
    cfg = full.replace(n_layers=n)
    weight_bytes = sum(int(np.prod(s)) * 2 for s in _shapes(full).values())  # all bfloat16 weights
    mem = _device_memory()
    if mem and weight_bytes * n / L > 0.85 * mem:
        rep.add(name, {"skipped": f"{weight_bytes / 1e9:.0f} GB of weights do not fit in {mem / 1e9:.0f} GB"},
                f"## {name}: skipped ({weight_bytes / 1e9:.0f} GB of bfloat16 weights, device {mem / 1e9:.0f} GB)\n")
        return
    params = init_params(cfg, jax.random.key(0), scale=0.5)
    masks = draft_masks(L)
    out: dict[str, Any] = {"config": SHAPES[name], "layers_timed": n, "layers": L, "weight_bytes": weight_bytes,
                           "context": args.context, "batches": {}}
    md = [f"## {SHAPES[name]} ({L} layers{f', timed on {n} and scaled' if n < L else ''}), bfloat16, context "
          f"{args.context}\n", "| batch | AR step ms | AR tok/s | bytes/step | of spec BW | of copy BW | verify cost "
          f"(T: AR steps) | draft cost (mask: AR steps) | predicted speedup at acceptance "
          f"{'/'.join(map(str, ACCEPTANCE))} (k) |", "|---|---|---|---|---|---|---|---|---|"]
    none, all_layers = SkipMask(), tuple(range(n))
    depth: dict[tuple[int, int], LayerCosts] = {}

    def secs(B: int, T: int, mask: SkipMask) -> float:
        """Seconds of a (B, T) pass of the full-depth model with ``mask`` skipped: timed, or from three timed
        passes of the truncation (full, nothing but embedding and head, attention only) by ``LayerCosts``."""
        if n == L:
            return pass_seconds(params, cfg, B, T, mask, args.context)
        if (B, T) not in depth:
            t = [pass_seconds(params, cfg, B, T, m, args.context) for m in
                 (none, SkipMask(attn=all_layers, mlp=all_layers), SkipMask(mlp=all_layers))]
            depth[B, T] = LayerCosts.from_passes(*t, n_layers=n)
        return depth[B, T].seconds(L, mask)

    for B in args.batches:
        if time.perf_counter() - T0 > args.deadline_s:
            md.append(f"\n(stopped before batch {B}: --deadline-s {args.deadline_s:g} reached)")
            break
        ar = secs(B, 1, none)
        kv_bytes = B * args.context * L * 2 * full.n_kv_heads * full.head_dim * 2
        step_bytes = weight_bytes - full.vocab_size * full.dim * 2 + kv_bytes  # a step gathers B embedding rows
        verify = {T: secs(B, T, none) / ar for T in args.verify}
        draft = {m: secs(B, 1, mask) / ar for m, mask in masks.items()}
        pred = {m: {str(a): predicted_speedup(a, c, verify) for a in ACCEPTANCE} for m, c in draft.items()}
        bw = step_bytes / ar / 1e9
        out["batches"][B] = {"ar_step_s": ar, "ar_tokens_per_s": B / ar, "bytes_per_step": step_bytes,
                             "achieved_gbs": bw, "of_spec_bw": bw / peak if peak else None, "of_copy_bw": bw / copy,
                             "verify_cost": verify, "draft_cost": draft, "predicted_speedup": pred}
        best = {m: "/".join(f"{p[str(a)][0]:.2f}" for a in ACCEPTANCE) + f" ({p['0.9'][1]})" for m, p in pred.items()}
        md.append(f"| {B} | {ar * 1e3:.2f} | {B / ar:.1f} | {step_bytes / 1e6:.1f} MB | "
                  f"{f'{bw / peak:.0%}' if peak else 'n/a'} | {bw / copy:.0%} | "
                  f"{', '.join(f'{t}: {c:.2f}' for t, c in verify.items())} | "
                  f"{', '.join(f'{m}: {c:.2f}' for m, c in draft.items())} | "
                  f"{'; '.join(f'{m}: {s}' for m, s in best.items())} |")
        rep.add(name, out, "\n".join(md) + "\n", replace=True)
    if name not in rep.data or md[-1].startswith("\n(stopped"):
        rep.add(name, out, "\n".join(md) + "\n", replace=True)


def _shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    from jaxspec.model import param_shapes
    return param_shapes(cfg)


def _device_memory() -> int | None:
    """Bytes one device can hold: the accelerator's limit, or the host's RAM for XLA:CPU."""
    if jax.devices()[0].platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def e2e_skip(path: str, cfg: Config, arg: str | None) -> SkipMask:
    from jaxspec.checkpoint import resolve

    p = arg or str(resolve(path) / profile.PROFILE_NAME)
    if arg or Path(p).is_file():
        return profile.load_profile(p, cfg).mask
    mid = range(cfg.n_layers // 5, cfg.n_layers - cfg.n_layers // 10)
    return SkipMask(attn=tuple(i for i in mid if i % 2 == 0))


def request(dec: Decoder, params: Params, prompt: list[int], max_new: int) -> tuple[list[int], dict, float, int]:
    """One request as ONE ``run`` call with device→host transfers disallowed; (tokens, stats, seconds,
    compilations during the request)."""
    c0 = COMPILES[0]
    state = prefill(params, dec, [prompt], max_new)
    steps = jax.device_put(jnp.int32(1 << 30))
    jax.block_until_ready(state)
    t = time.perf_counter()
    with jax.transfer_guard("disallow"):
        final = jax.block_until_ready(dec.run(params, state, steps))
    dt = time.perf_counter() - t
    n = int(final.n_out[0])
    stats = {} if final.stats is None else final.stats.summary()
    return np.asarray(final.out)[0, :n].tolist(), stats, dt, COMPILES[0] - c0


def host_ops(dec: Decoder, params: Params, prompt: list[int], max_new: int) -> list[str]:
    """Host callbacks / infeed / outfeed / send / recv in the compiled decode loop (should be none)."""
    state = prefill(params, dec, [prompt], max_new)
    text = type(dec).run.lower(dec, params, state, jnp.int32(1)).as_text()
    return sorted({w for w in ("callback", "outfeed", "infeed", "send", "recv") if w in text})


def bench_e2e(rep: Report, args: argparse.Namespace) -> None:
    """Part 2: every mode end to end on real weights in bfloat16, interleaved rounds."""
    from jaxspec.checkpoint import load

    cfg, params, tok = load(args.e2e, dtype="bfloat16")
    eos = cfg.eos_ids
    if tok is not None:
        prompts = [tok.encode(t) for t in TEXTS]
    else:  # a test checkpoint without a tokenizer: arithmetic progressions
        prompts = [[(a + s * i) % (cfg.vocab_size - 3) + 3 for i in range(12)] for a, s in ((5, 1), (40, 3), (9, 2))]
    skip = e2e_skip(args.e2e, cfg, args.e2e_skip)
    decs = {m: make(cfg, eos, skip) for m, make in MODES.items()}
    runs: dict[str, list[tuple]] = {m: [] for m in decs}
    warm_compiles = {}
    for m, dec in decs.items():  # warm-up: compile every prompt's bucket
        c0 = COMPILES[0]
        for p in prompts:
            request(dec, params, p, args.max_new)
        warm_compiles[m] = COMPILES[0] - c0
    for _ in range(args.rounds):
        for m, dec in decs.items():
            runs[m] += [request(dec, params, p, args.max_new) for p in prompts]
    ar_tokens = [r[0] for r in runs["ar"][: len(prompts)]]
    out: dict[str, Any] = {"ckpt": args.e2e, "dtype": "bfloat16", "skip_mask": skip.to_json(), "modes": {}}
    md = [f"## End to end: {args.e2e}, bfloat16, {len(prompts)} prompts x {args.rounds} rounds, {args.max_new} new "
          f"tokens, batch 1\n", "| mode | tok/s | speedup vs AR | acceptance | mean accepted | greedy == AR | "
          "compiles: warm-up / in requests | run calls per request | host ops in loop |", "|---" * 9 + "|"]
    for m, rs in runs.items():
        per_round = [sum(r[2] for r in rs[i:i + len(prompts)]) for i in range(0, len(rs), len(prompts))]
        ar_rounds = [sum(r[2] for r in runs["ar"][i:i + len(prompts)]) for i in range(0, len(rs), len(prompts))]
        toks = sum(len(r[0]) for r in rs)
        st = {k: sum(r[1][k] for r in rs) for k in ("drafted", "accepted", "verify_calls") if k in rs[0][1]}
        row = {"tokens_per_s": toks / sum(r[2] for r in rs),
               "speedup": statistics.median(a / s for a, s in zip(ar_rounds, per_round, strict=True)),
               "identical_to_ar": all(r[0] == ar_tokens[i % len(prompts)] for i, r in enumerate(rs)),
               "compiles_warmup": warm_compiles[m], "compiles_in_requests": sum(r[3] for r in rs),
               "run_calls_per_request": 1, "host_ops_in_loop": host_ops(decs[m], params, prompts[0], args.max_new),
               **st}
        if st.get("drafted"):
            row.update(acceptance=st["accepted"] / st["drafted"], mean_accepted=st["accepted"] / st["verify_calls"])
        out["modes"][m] = row
        md.append(f"| {m} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | {row.get('acceptance', 0):.2f} | "
                  f"{row.get('mean_accepted', 0):.2f} | {row['identical_to_ar']} | {warm_compiles[m]} / "
                  f"{row['compiles_in_requests']} | 1 | {row['host_ops_in_loop'] or 'none'} |")
    rep.add("e2e", out, "\n".join(md) + "\n")


def hf_child(spec: str) -> None:
    """HF transformers greedy decode of a random-weight LLaMA of config ``spec`` (JSON); prints one JSON line."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = json.loads(spec)
    c = Config.from_json(s["cfg"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                     max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta)
    with torch.device(dev):
        model = LlamaForCausalLM(hc).to(torch.bfloat16).eval()
    ids = torch.full((1, s["context"]), 7, dtype=torch.long, device=dev)
    kw = {"max_new_tokens": s["max_new"], "min_new_tokens": s["max_new"], "do_sample": False}

    def go() -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, **kw)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    go()
    print(json.dumps({"hf_tokens_per_s": s["max_new"] / statistics.median(go() for _ in range(3)),
                      "torch": torch.__version__, "device": dev}))


def hf_peer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf_child`` in a child process (its own GPU memory), before JAX allocates any."""
    cfg = PRESETS[SHAPES[name]]
    if args.layers:
        cfg = cfg.replace(n_layers=min(args.layers, cfg.n_layers))
    spec = json.dumps({"cfg": cfg.to_json(), "context": args.context, "max_new": 32})
    r = subprocess.run([sys.executable, __file__, "--hf-child", spec], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    global T0
    T0 = time.perf_counter()
    args = parse_args(argv)
    if args.hf_child:
        hf_child(args.hf_child)
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or any(b < 1 for b in args.batches) or any(t < 2 for t in args.verify) or (args.layers or 1) < 1:
        print(f"error: bad --shapes {bad} (know {', '.join(SHAPES)}), --batches, --verify (>= 2) or --layers",
              file=sys.stderr)
        return 2
    hf = {s: hf_peer(s, args) for s in shapes} if args.hf else {}
    d = jax.devices()[0]
    peak = spec_peak(d.device_kind)
    copy = copy_gbs(64 << 20 if d.platform == "cpu" else 2 << 30)
    head = {"device": f"{d.platform} {d.device_kind} x{jax.device_count()}", "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": os.getloadavg()[0],
            "spec_peak_gbs": peak, "copy_gbs": round(copy, 1), "argv": sys.argv[1:] if argv is None else argv}
    rep = Report(Path(args.out), head)
    if args.e2e:
        bench_e2e(rep, args)
    for s in shapes:
        if time.perf_counter() - T0 > args.deadline_s:
            rep.add(s, {"skipped": "deadline"}, f"## {s}: not run (--deadline-s {args.deadline_s:g} reached)\n")
            continue
        bench_shape(rep, s, args, peak[1] if peak else None, copy)
        if s in hf:
            ar = rep.data[s].get("batches", {}).get(1, {}).get("ar_tokens_per_s")
            ratio = ar / hf[s]["hf_tokens_per_s"] if ar and "hf_tokens_per_s" in hf[s] else None
            rep.add(f"hf_{s}", {**hf[s], "jaxspec_over_hf": ratio},
                    f"- HF transformers peer, {s}, batch 1: {hf[s]} → jaxspec AR / HF = {ratio}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
