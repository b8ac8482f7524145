"""The packed weights (``model.pack``, what ``generate.py`` loads) against the (K, N) kernel, end to end, in one
process: AR and n-gram decoding of one prompt per task, 128 new tokens, the two alternating each round.

    python benchmarks/ab_packed.py            # 4 rounds
    python benchmarks/ab_packed.py --rounds 6

Figures are medians of decode tokens/s; every output must be the same token for token across settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tasks import task_prompts  # noqa: E402

from jaxspec.checkpoint import fast_cache_dir, load  # noqa: E402
from jaxspec.decode import Decoder, generate  # noqa: E402
from jaxspec.speculative import SpecDecoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    cfg, packed, tok = load(args.ckpt, fast_cache=fast_cache_dir())
    if packed.packed is None:
        sys.exit("error: no packed weights here (the CPU kernels are not available)")
    settings = {"packed": packed, "(K, N)": packed.replace(packed=None)}
    eos = tuple(tok.eos_ids) or cfg.eos_ids
    tasks = {t: ps[0] for t, ps in task_prompts(tok, 1).items()}
    decs = {"AR": Decoder(cfg, eos_ids=eos)} | {
        f"n-gram k={k}": SpecDecoder(cfg, eos_ids=eos, drafter="ngram", ngram_k=k) for k in (4, 8)}
    for d in decs.values():  # compilation and first runs
        for p in settings.values():
            generate(d, p, [next(iter(tasks.values()))], 128)
    tps: dict[tuple[str, str, str], list[float]] = {}
    first: dict[str, list[int]] = {}
    for rnd in range(args.rounds):
        order = list(settings) if rnd % 2 == 0 else list(settings)[::-1]
        for t, prompt in tasks.items():
            for s in order:
                for n, d in decs.items():
                    r = generate(d, settings[s], [prompt], 128)
                    tps.setdefault((t, n, s), []).append(r.new_tokens / r.decode_s)
                    if first.setdefault(t, r.tokens[0]) != r.tokens[0]:
                        sys.exit(f"error: {n} with {s} weights gave other tokens on {t}")
    print("| task | decoder | packed tok/s | (K, N) tok/s | packed / (K, N) |\n|---|---|---|---|---|")
    for t in tasks:
        for n in decs:
            a, b = (statistics.median(tps[t, n, s]) for s in settings)
            print(f"| {t} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
