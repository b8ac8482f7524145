"""Build a phrase table (``jaxspec/phrases.py``) from a checkpoint's own greedy answers to calibration prompts.

    python tools/make_phrases.py                                      # smollm2-135m: the table the project ships
    python tools/make_phrases.py --ckpt llama2-7b --out checkpoints/llama2-7b/phrases.npz --per-task 64

Calibration halves only (aclsum train, even HumanEval / MT-Bench items: ``jaxspec/data.py``), so the evaluation
prompts of the benchmarks never feed the table; licenses in ``jaxspec/calib/NOTICE.md``. Use it with
``generate.py --phrases FILE`` (or name it in a profile's ``"phrases"``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec import cli  # noqa: E402

cli.import_jax()

from jaxspec import data, phrases  # noqa: E402
from jaxspec.checkpoint import fast_cache_dir, load  # noqa: E402
from jaxspec.decode import Decoder, generate  # noqa: E402
from jaxspec.profile import SHIPPED  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=SHIPPED / f"smollm2-135m{phrases.SUFFIX}")
    ap.add_argument("--per-task", type=int, default=40, help="calibration prompts per task (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=8, help="tokens kept per entry (default %(default)s)")
    args = ap.parse_args(argv)
    if min(args.per_task, args.max_new_tokens, args.batch_size, args.k) < 1:
        raise ValueError("--per-task, --max-new-tokens, --batch-size and --k must be >= 1")
    cfg, params, tok = load(args.ckpt, fast_cache=fast_cache_dir())
    if tok is None:
        raise ValueError(f"checkpoint {args.ckpt} has no tokenizer")
    texts = [p["text"] for task in data.TASKS for p in data.prompts(task, "calibration")[: args.per_task]]
    chat = tok.chat_template is not None
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]) if chat else t) for t in texts]
    dec, outs, t0 = Decoder(cfg, eos_ids=tuple(tok.eos_ids) or cfg.eos_ids), [], time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        outs += generate(dec, params, prompts[i : i + args.batch_size], args.max_new_tokens).tokens
        print(f"{len(outs)}/{len(prompts)} answers, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    tables = phrases.build(outs, k=args.k)
    phrases.save(args.out, tables)
    sizes = ", ".join(f"n={t.keys.shape[1]}: {int((t.counts > 0).sum())} entries" for t in tables)
    print(f"wrote {args.out} ({sum(map(len, outs))} tokens of answers; {sizes})")
    return 0


if __name__ == "__main__":
    cli.exit(cli.run(main))
