#!/usr/bin/env python3
"""Benchmark HF transformers greedy decode on the SmolLM2-135M-Instruct GGUF.

Standalone (no jaxspec import): loads the GGUF with transformers'
``LlamaForCausalLM`` (dequantized to torch float32, CPU, eager attention),
pins ``torch.set_num_threads`` (2 by default), runs one excluded warm-up
generation, then ``--repeats`` timed ``model.generate(do_sample=False,
max_new_tokens=N)`` calls (EOS stopping disabled, so exactly N new tokens are
produced each time; the timing includes the prompt prefill, KV cache on as HF
does by default) and prints ONE JSON line on stdout::

    {"hf_tokens_per_s": <median>, "runs": [<tokens/s per run>...],
     "torch": "...", "transformers": "...", ...}

Everything else (load logs, progress bars) goes to stderr. The JSON also has
``loadavg_1m`` (before/after): torch's OpenMP threads spin-wait, so on a 2-core
machine any other busy process makes 2-thread decode several times slower --
treat a result taken with a 1-minute load average well above 0 as unreliable.

Environment: the separate venv described in tools/make_golden.py (say
``.venv-hf``). The caller may run this file with any python and pass
``--python .venv-hf/bin/python``: the script then re-runs itself under that
interpreter and relays its output. ``--gguf`` defaults to where jaxspec caches
the pinned GGUF (``$JAXSPEC_CACHE``, default ``~/.cache/jaxspec``; any jaxspec
run on ``smollm2-135m`` fetches it).

Example::

    .venv-hf/bin/python benchmarks/bench_hf.py --repeats 5
    python3 benchmarks/bench_hf.py --python .venv-hf/bin/python --prompt "Hello"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("JAXSPEC_CACHE") or Path.home() / ".cache" / "jaxspec")  # where jaxspec fetches the GGUF
DEFAULT_GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "The history of the Roman Empire began when"
_CHILD_ENV = "JAXSPEC_BENCH_HF_CHILD"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="HF transformers greedy-decode tokens/s benchmark")
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the GGUF model file (default: %(default)s)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (tokenized as HF does by default)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    ap.add_argument("--python", default=None,
                    help="interpreter with torch/transformers/gguf; re-runs this script under it")
    return ap.parse_args(argv)


def _reexec(args: argparse.Namespace) -> int:
    argv = sys.argv[1:]
    cleaned: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--python":
            skip = True
            continue
        if a.startswith("--python="):
            continue
        cleaned.append(a)
    env = dict(os.environ)
    env[_CHILD_ENV] = "1"
    proc = subprocess.run([args.python, os.path.abspath(__file__), *cleaned], env=env)
    return proc.returncode


def main() -> int:
    args = parse_args()
    if args.python and not os.environ.get(_CHILD_ENV):
        return _reexec(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    gguf_path = os.path.abspath(args.gguf)
    gdir, gname = os.path.split(gguf_path)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    load_s = time.perf_counter() - t0
    print(f"loaded in {load_s:.1f}s", file=sys.stderr)

    # No EOS stopping: exactly max_new_tokens per run. transformers >= 5 fills unset
    # GenerationConfig fields from model.generation_config, so clear EOS there too.
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
    )
    input_ids = torch.tensor([tok(args.prompt).input_ids], dtype=torch.long)
    attn = torch.ones_like(input_ids)
    n_prompt = int(input_ids.shape[1])

    def one_run() -> tuple[float, int]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attn, generation_config=gen_cfg)
        dt = time.perf_counter() - t
        return dt, int(out.shape[1]) - n_prompt

    load_before = os.getloadavg()[0]
    dt, n_new = one_run()  # warm-up, excluded
    print(f"warm-up: {n_new} tokens in {dt:.2f}s", file=sys.stderr)
    runs_s: list[float] = []
    runs_tps: list[float] = []
    for i in range(args.repeats):
        dt, n_new = one_run()
        if n_new != args.max_new_tokens:
            print(f"ERROR: generated {n_new} tokens, expected {args.max_new_tokens}", file=sys.stderr)
            return 1
        runs_s.append(dt)
        runs_tps.append(n_new / dt)
        print(f"run {i}: {n_new} tokens in {dt:.2f}s = {n_new / dt:.2f} tok/s", file=sys.stderr)

    result = {
        "hf_tokens_per_s": round(statistics.median(runs_tps), 3),
        "runs": [round(x, 3) for x in runs_tps],
        "runs_s": [round(x, 4) for x in runs_s],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "prompt_tokens": n_prompt,
        "new_tokens": args.max_new_tokens,
        "dtype": "float32",
        "includes_prefill": True,
        "load_s": round(load_s, 2),
        # 1-min load average before/after timing: with torch's OpenMP spin-waiting, any other
        # busy process on a 2-core box slows 2-thread decode by up to ~10x; check these.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
