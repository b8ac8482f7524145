"""A LLaMA-2-7B-shaped model on this CPU, loaded lean (``checkpoint._load_lean``: packed layers only, restored a layer
at a time): its memory, load time, AR decode speed and the cost of a verify's width, in one process.

    python benchmarks/bench_lean.py                              # 32 layers: 13.5 GB of float16 weights in --dir
    python benchmarks/bench_lean.py --layers 8 --dir /tmp/jaxspec-7b-8 --widths 1,2,5
    python benchmarks/bench_lean.py --fast-cache /tmp/jaxspec-weights --widths 1    # twice: written, then mapped
    python benchmarks/bench_lean.py --against smollm2-135m --rounds 4     # a model loaded lean vs as before

The weights are random normal float16 values (no LLaMA-2 download here), written once as a jaxspec checkpoint in
LLaMA-2-7B's shapes (``--layers`` of its 32), with LLaMA-2's tokenizer (so ``generate.py --ckpt DIR`` runs it too):
time, memory and bandwidth are a real 7B's; acceptance is not measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench import step_cost  # noqa: E402

from jaxspec import checkpoint  # noqa: E402
from jaxspec.config import PRESETS, SkipMask  # noqa: E402
from jaxspec.decode import Decoder, generate, prefill  # noqa: E402
from jaxspec.model import param_shapes  # noqa: E402
from jaxspec.roofline import bytes_per_token  # noqa: E402
from jaxspec.tokenizer import Tokenizer  # noqa: E402


def status_gb(field: str) -> float:
    """``field`` (VmRSS, VmHWM) of this process in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="LLaMA-2-7B's layers to keep (of 32)")
    ap.add_argument("--dir", default="/tmp/jaxspec-llama2-7b-random", help="where the checkpoint is (written once)")
    ap.add_argument("--widths", default="1,2,3,5,9", help="forward widths T to time (1: a decode step)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--fast-cache", help="load through a memory-mapped copy of the packed layers kept here (written by "
                    "the first run, mapped by the next, as generate.py does)")
    ap.add_argument("--against", metavar="CKPT", help="instead: checkpoint CKPT loaded lean and as before (float32 "
                    "layers and a packed copy), AR tokens/s and a 1k-token prefill in interleaved rounds")
    ap.add_argument("--rounds", type=int, default=4, help="with --against")
    args = ap.parse_args()
    if args.against:
        return against(args.against, args.rounds)
    cfg = PRESETS["llama2-7b"].replace(n_layers=args.layers, dtype="float16")
    if not checkpoint.is_checkpoint(args.dir):
        rng = np.random.default_rng(0)

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for name, shape in param_shapes(cfg).items():
                w = np.ones(shape, np.float32) if name.endswith("norm") else rng.standard_normal(shape, np.float32)
                yield name, (w if name.endswith("norm") else w * np.float32(0.02)).astype(np.float16)

        t = time.perf_counter()
        vocab = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama2_vocab"
        checkpoint.save_checkpoint(args.dir, cfg, tensors(), Tokenizer.from_gguf(vocab / "ggml-vocab-llama-spm.gguf"),
                                   meta={"name": "random LLaMA-2-7B shapes"}, progress=True)
        print(f"- wrote {args.dir} ({checkpoint.checkpoint_size(args.dir) / 1e9:.1f} GB) in "
              f"{time.perf_counter() - t:.0f} s")
    checkpoint.LEAN_FROM_BYTES = 0  # lean at any size (32 layers are over the limit anyway)
    float32 = sum(np.prod(s) for s in param_shapes(cfg).values()) * 4
    print(f"- float32 parameters: {float32 / 1e9:.1f} GB (a full load needs them and a packed copy); available: "
          f"{(checkpoint.available_memory() or 0) / 1e9:.1f} GB")
    rss0, t = status_gb("VmRSS"), time.perf_counter()
    cfg, params, _ = checkpoint.load_checkpoint(args.dir, fast_cache=args.fast_cache)
    jax.block_until_ready(params)
    step_bytes = bytes_per_token(cfg, params=params)
    print(f"- lean load: {time.perf_counter() - t:.0f} s; resident {status_gb('VmRSS') - rss0:.1f} GB more "
          f"(peak {status_gb('VmHWM'):.1f} GB in all); a decode step reads {step_bytes / 1e9:.2f} GB of weights "
          f"({params.packed.stacked.wq.data.dtype} tiles)")
    prompt = [np.random.default_rng(1).integers(3, cfg.vocab_size, 16).tolist()]
    dec = Decoder(cfg)
    generate(dec, params, prompt, 4)  # compile
    res = generate(dec, params, prompt, args.new_tokens)
    step = 1 / res.tokens_per_s
    print(f"- AR: {res.tokens_per_s:.2f} tokens/s ({step * 1e3:.0f} ms a token, {step_bytes / step / 1e9:.1f} GB/s); "
          f"16-token prompt's first token {res.ttft_s:.2f} s")
    base = None
    for T in (int(w) for w in args.widths.split(",")):
        s = step_cost(params, cfg, T, SkipMask(), n=2, repeats=3)
        base = base or s
        print(f"- forward of {T} tokens: {s * 1e3:.0f} ms = {s / base:.2f}x one token's")


def against(ckpt: str, rounds: int) -> None:
    """``ckpt`` loaded lean and as before, side by side in one process: medians of interleaved rounds."""
    _, full, tok = checkpoint.load(ckpt, fast_cache=checkpoint.fast_cache_dir())
    checkpoint.LEAN_FROM_BYTES = 0
    cfg, lean, _ = checkpoint.load(ckpt)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a short story about a cat."}]))
    long = np.random.default_rng(0).integers(100, cfg.vocab_size, 1000).tolist()
    dec = Decoder(cfg, eos_ids=tuple(tok.eos_ids))
    got: dict[str, dict[str, list]] = {n: {"tps": [], "prefill": [], "tokens": []} for n in ("full", "lean")}
    for r in range(rounds + 1):  # round 0 compiles
        for name, params in (("full", full), ("lean", lean)):
            res = generate(dec, params, [prompt], 128)
            t = time.perf_counter()
            jax.block_until_ready(prefill(params, dec, [long], 4))
            if r:
                got[name]["tps"].append(res.tokens_per_s)
                got[name]["prefill"].append(1000 / (time.perf_counter() - t))
                got[name]["tokens"].append(res.tokens)
    for name, g in got.items():
        print(f"- {name}: AR {np.median(g['tps']):.1f} tokens/s, 1k-token prefill {np.median(g['prefill']):.0f} "
              f"tokens/s")
    print(f"- lean / full: AR {np.median(got['lean']['tps']) / np.median(got['full']['tps']):.3f}x, prefill "
          f"{np.median(got['lean']['prefill']) / np.median(got['full']['prefill']):.3f}x; identical output: "
          f"{got['lean']['tokens'] == got['full']['tokens']}")


if __name__ == "__main__":
    main()
