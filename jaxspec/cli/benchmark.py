"""The paper's table in one command: AR and every drafting mode on summarization, code and chat, side by side.

    python scripts/benchmark.py                                  # default: ~25 min on 2 CPU cores (SmolLM2-135M)
    python scripts/benchmark.py --limit 1 --no-peers             # smoke run, < 3 min
    python scripts/benchmark.py --update BENCHMARKS.md --hf-python /path/to/venv-hf/bin/python
    python scripts/benchmark.py --from-json bench-out/benchmark.json --update BENCHMARKS.md   # report only

Default sample counts (chosen so the default run fits 30 minutes on a 2-core CPU): 8 aclsum test abstracts
(1-shot), 8 HumanEval odd tasks, 8 MT-Bench first turns, 128 new tokens at most (256 for code: SmolLM2 closes its
fenced answer within ~40-60 tokens and stops by ~90-135, so no function is cut; HumanEval's stop sequences then trim
what follows it, the same for every mode), every mode once per prompt (interleaved), then the peers on the first 2
prompts of each task. Writes DIR/benchmark.json (every raw figure), DIR/benchmark.md and PNG plots; ``--update FILE``
splices the section into FILE. Quality metrics need ``pip install -e '.[bench]'``; peers need llama-cpp-python
(``.[llama]``) or a Python with torch + transformers + gguf (``.[hf]``, passed as ``--hf-python``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxspec.cli import exit_on_interrupt, import_jax  # noqa: E402

exit_on_interrupt()  # Ctrl-C during the slow imports below: exit 130, no traceback
import_jax()  # without etils.epath: 50-70 ms less of every command

import jax  # noqa: E402

from jaxspec import cli  # noqa: E402
from jaxspec.bench import modes as modes_mod  # noqa: E402
from jaxspec.bench import report  # noqa: E402
from jaxspec.checkpoint import CheckpointError, cache_dir, fast_cache_dir, load, resolve, smollm2_gguf_path  # noqa: E402
from jaxspec.data import TASKS  # noqa: E402
from jaxspec.profile import find_profile  # noqa: E402

DEFAULT_LIMIT = 8
DEFAULT_PEER_LIMIT = 2
CODE_MAX_NEW = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m", help="registered name or checkpoint directory")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--modes", default=",".join(modes_mod.MODES),
                    help=f"comma-separated, from {', '.join(modes_mod.MODES)} (ar always runs)")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="prompts per task (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="new tokens at most, summarization and chat "
                    "(default %(default)s)")
    ap.add_argument("--code-max-new-tokens", type=int, default=CODE_MAX_NEW,
                    help="new tokens at most for code (default %(default)s: room for a whole HumanEval function)")
    ap.add_argument("--out", default="bench-out", help="output directory (default %(default)s)")
    ap.add_argument("--update", metavar="FILE", help="splice the generated section into this markdown file")
    ap.add_argument("--hf-python", help="Python of a venv with torch + transformers + gguf for the HF peer rows")
    ap.add_argument("--peer-limit", type=int, default=DEFAULT_PEER_LIMIT,
                    help="prompts per task for the peers (default %(default)s; 0 = no peers)")
    ap.add_argument("--no-peers", action="store_true", help="same as --peer-limit 0")
    ap.add_argument("--samples", type=int, default=0, help="code: also this many samples per problem at "
                    "temperature 0.6, top-p 0.95 for pass@1/pass@10 (10 in the paper; default off: 10x the code time)")
    ap.add_argument("--from-json", help="regenerate the report and plots from a result JSON; run nothing")
    return ap.parse_args(argv)


def write_reports(res: dict, out: Path, update: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.save_json(out / "benchmark.json", res)
    pngs = report.plots(res, out)
    report.save_text(out / "benchmark.md", report.markdown(res, "." if pngs else None))
    if update:
        rel = os.path.relpath(out, Path(update).resolve().parent) if pngs else None
        report.update_markdown(Path(update), report.markdown(res, rel))
    print(f"wrote {out / 'benchmark.json'}, {out / 'benchmark.md'}" + (f", {len(pngs)} plots" if pngs else "")
          + (f"; updated {update}" if update else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        try:
            res = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read result JSON {args.from_json}: {e}") from None
        write_reports(res, out, args.update)
        return 0
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in task_names if t not in TASKS]
    if bad or not task_names:
        raise ValueError(f"unknown task(s) {', '.join(bad) or '(none)'}: choose from {', '.join(TASKS)}")
    if min(args.limit, args.max_new_tokens, args.code_max_new_tokens) < 1 or min(args.peer_limit, args.samples) < 0:
        raise ValueError("--limit and --(code-)max-new-tokens must be >= 1, --peer-limit and --samples >= 0")
    from jaxspec.bench import suite  # after argument checks: imports JAX models

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    cfg, params, tok = load(args.ckpt, fast_cache=fast_cache_dir())  # as generate.py loads them
    if tok is None:
        raise CheckpointError(f"checkpoint {args.ckpt} has no tokenizer")
    prof = find_profile(resolve(args.ckpt), cfg)  # its own, else the project's shipped one for this model
    modes = modes_mod.build([m.strip() for m in args.modes.split(",") if m.strip()], cfg,
                            tuple(tok.eos_ids) or cfg.eos_ids, prof)
    peer_limit = 0 if args.no_peers else min(args.peer_limit, args.limit)
    gguf = smollm2_gguf_path() if peer_limit and args.ckpt == "smollm2-135m" else None
    shown = [a if a != args.hf_python else "PYTHON_WITH_TORCH" for a in (argv if argv is not None else sys.argv[1:])]
    command = "python scripts/benchmark.py " + shlex.join(shown)  # no machine paths in the committed report
    max_new = {t: args.code_max_new_tokens if t == "code" else args.max_new_tokens for t in task_names}
    res = suite.benchmark(args.ckpt, cfg, params, tok, modes, task_names, dict.fromkeys(task_names, args.limit),
                          max_new, peer_limit, gguf, args.hf_python, command.strip(), args.samples)
    write_reports(res, out, args.update)
    for line in res["lossless_failures"]:
        print(f"error: greedy output differs from AR: {line}", file=sys.stderr)
    return 1 if res["lossless_failures"] else 0


def entry() -> None:
    """Console script ``jaxspec-benchmark`` (and ``python scripts/benchmark.py``)."""
    cli.exit(cli.run(main))


if __name__ == "__main__":
    entry()
