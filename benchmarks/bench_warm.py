"""Cold vs warm start of ``generate.py``: whole-command wall time, load_s, ttft_s, against ``import jax`` alone.

    python benchmarks/bench_warm.py --runs 3  # a fresh compilation cache, then warm runs; medians of the warm ones
    python benchmarks/bench_warm.py --runs 3 --mode ar  # plain decoding instead of the default (no mode flags)

Each run is a new process (what a user pays); the first one fills a temporary persistent compilation cache
(``JAXSPEC_CACHE`` points there, so the checkpoint must already be converted).
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JAXSPEC_CACHE": tmp}
        cmd = [sys.executable, str(GENERATE), "--ckpt", args.ckpt, "--chat", "--prompt", args.prompt,
               "--max-new-tokens", str(args.max_new_tokens), "--json"] + ([] if args.mode == "default" else
                                                                          ["--mode", args.mode])
        rows, first = [], None
        for i in range(args.runs + 1):
            wall, cpu, out = timed(cmd, env)
            imp, imp_cpu, _ = timed([sys.executable, "-c", "import jax"], env)
            res = json.loads(out.strip().splitlines()[-1])
            stats, first = res["stats"], first or res["token_ids"]
            rows.append({"run": "cold" if i == 0 else "warm", "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "import_jax_s": round(imp, 2), "import_jax_cpu_s": round(imp_cpu, 2),
                         **{k: stats[k] for k in ("load_s", "prefill_s", "compile_s", "ttft_s", "new_tokens",
                                                  "tokens_per_s")},
                         "identical_to_cold": res["token_ids"] == first})
            print(json.dumps(rows[-1]), flush=True)
    warm = rows[1:]
    print(json.dumps({k: statistics.median(r[k] for r in warm) for k in warm[0] if k != "run"} | {"run": "warm median",
                      "mode": args.mode, "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
