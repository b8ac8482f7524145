"""Cold vs warm start of ``generate.py``: whole-command wall time, load_s, ttft_s, against ``import jax`` alone.

    python benchmarks/bench_warm.py --runs 3  # a fresh compilation cache, then warm runs; medians of the warm ones
    python benchmarks/bench_warm.py --runs 3 --mode ar  # plain decoding instead of the default (no mode flags)
    git worktree add /tmp/base HEAD~1 && python benchmarks/bench_warm.py --runs 10 --against /tmp/base

Each run is a new process (what a user pays); the first one fills a temporary persistent compilation cache
(``JAXSPEC_CACHE`` points there, so the checkpoint must already be converted). ``--against`` alternates the warm
runs of this checkout with another checkout's (its own cache; its checkpoint converted too) and prints both medians
and their ratio: warm starts move +-10% between minutes here, so only side-by-side runs compare versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GENERATE = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, the child's CPU s: user + system, stdout) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--prompt", default="Tell me a short story about a cat.")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3, help="warm runs after the cold one")
    ap.add_argument("--mode", choices=["default", "ar", "ssd"], default="default",
                    help="generate.py's --mode (default: none given, what a user gets with no flags)")
    ap.add_argument("--against", type=Path, help="another jaxspec checkout: its warm runs alternate with these")
    args = ap.parse_args()
    if args.against and not (args.against / "scripts" / "generate.py").is_file():
        ap.error(f"--against {args.against}: not a jaxspec checkout (no scripts/generate.py)")
    trees = [GENERATE.parents[1]] + ([args.against.resolve()] if args.against else [])
    flags = ["--ckpt", args.ckpt, "--chat", "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens),
             "--json"] + ([] if args.mode == "default" else ["--mode", args.mode])
    rows: dict[Path, list[dict]] = {t: [] for t in trees}
    first: dict[Path, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def one(tree: Path, run: str) -> None:
            env = {**os.environ, "JAXSPEC_CACHE": str(Path(tmp) / str(trees.index(tree)))}
            wall, cpu, out = timed([sys.executable, str(tree / "scripts" / "generate.py"), *flags], env)
            imp, imp_cpu, _ = timed([sys.executable, "-c", "import jax"], env)
            res = json.loads(out.strip().splitlines()[-1])
            stats = res["stats"]
            first.setdefault(tree, res["token_ids"])
            rows[tree].append({"run": run, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                               "import_jax_s": round(imp, 2), "import_jax_cpu_s": round(imp_cpu, 2),
                               **{k: stats[k] for k in ("load_s", "prefill_s", "compile_s", "ttft_s", "new_tokens",
                                                        "tokens_per_s")},
                               "identical_to_cold": res["token_ids"] == first[tree]})
            print(json.dumps(rows[tree][-1] | ({"tree": str(tree)} if args.against else {})), flush=True)

        for tree in trees:
            one(tree, "cold")
        for i in range(args.runs):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                one(tree, "warm")
    medians = {}
    for tree in trees:
        warm = rows[tree][1:]
        medians[tree] = {k: statistics.median(r[k] for r in warm) for k in warm[0] if k != "run"}
        print(json.dumps(medians[tree] | {"run": "warm median", "mode": args.mode, "load_avg": os.getloadavg()[0]}
                         | ({"tree": str(tree)} if args.against else {})))
    if args.against:
        this, other = (medians[t]["wall_s"] for t in trees)
        print(f"warm command: this checkout {this:.2f} s, {args.against} {other:.2f} s: {other / this:.2f}x")

if __name__ == "__main__":
    main()
