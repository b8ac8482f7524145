"""Search the self-speculative draft (skipped sublayers × draft precision × head width × max_draft × θ₀) for one
checkpoint on this device, time the best ones against the n-gram drafter, hybrid and AR; write its profile.

    python scripts/search_skip.py --ckpt smollm2-135m                    # GP search, 60 masks, builtin prompts
    python scripts/search_skip.py --ckpt smollm2-135m --budget 100 --calib my_prompts.jsonl --out prof.json
    python scripts/search_skip.py --ckpt smollm2-135m --bench            # + random search and baselines, timed

A proxy (teacher-forced draft agreement replayed through the adaptive draft policy, times a per-component measured
cost model) scores each mask at every draft precision and head width without compiling it; the best ``--top``
self-drafts, the n-gram drafter and hybrid are then compiled and timed end to end against autoregressive decoding,
and the profile (``checkpoints/NAME/skip_profile.json`` by default) records the measured numbers: the winner (what
``scripts/generate.py`` uses with no mode flags; ``use_ssd: false``, i.e. AR, when nothing beats AR by 3% in every
round) and the best self-draft (what ``--drafter skip`` uses).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxspec.cli import exit_on_interrupt, import_jax  # noqa: E402

exit_on_interrupt()  # Ctrl-C during the slow imports below: exit 130, no traceback
import_jax()  # without etils.epath: 50-70 ms less of every command

from jaxspec import cli, validate  # noqa: E402
from jaxspec.checkpoint import CheckpointError, fast_cache_dir, load, resolve  # noqa: E402
from jaxspec.data import calibration  # noqa: E402
from jaxspec.draft_model import PRECISIONS  # noqa: E402
from jaxspec.profile import PROFILE_NAME, save_profile  # noqa: E402
from jaxspec.search import SearchOptions, plot, search  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SearchOptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="registered name or checkpoint directory")
    ap.add_argument("--budget", type=int, default=d.budget, help=f"masks scored by the proxy (default {d.budget})")
    ap.add_argument("--calib", default="builtin", help="'builtin' or a JSON-lines file with a 'text' per line")
    ap.add_argument("--out", type=Path, help=f"profile path (default: the checkpoint's {PROFILE_NAME})")
    ap.add_argument("--method", choices=["gp", "random"], default=d.method)
    ap.add_argument("--max-new", type=int, default=d.max_new, help=f"new tokens per prompt (default {d.max_new})")
    ap.add_argument("--top", type=int, default=d.top, help=f"masks timed end to end (default {d.top})")
    ap.add_argument("--real-prompts", type=int, default=d.real_prompts,
                    help=f"prompts timed end to end (default {d.real_prompts})")
    ap.add_argument("--repeats", type=int, default=d.repeats, help=f"interleaved timing rounds (default {d.repeats})")
    ap.add_argument("--margin", type=float, default=d.margin, help="use SSD only if each round's speedup >= 1 + margin")
    ap.add_argument("--precisions", default=",".join(d.precisions),
                    help=f"draft weight precisions searched (default {','.join(d.precisions)})")
    ap.add_argument("--heads", default=",".join(map(str, d.heads)),
                    help="draft head widths searched, most frequent tokens (0 = whole vocabulary; default "
                         f"{','.join(map(str, d.heads))})")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--bench", action="store_true",
                    help="also run the other method at the same budget and time the baselines for real")
    ap.add_argument("--plot", type=Path, help="PNG of the search (default: the profile path with .png)")
    ap.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate.flags(args)
    precisions = tuple(p for p in args.precisions.split(",") if p)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"--precisions takes a comma-separated subset of {','.join(PRECISIONS)}, "
                         f"got {args.precisions!r}")
    try:
        heads = tuple(int(w) for w in args.heads.split(","))
    except ValueError:
        raise ValueError(f"--heads takes comma-separated token counts, got {args.heads!r}") from None
    if not heads or min(heads) < 0:
        raise ValueError(f"--heads takes token counts >= 0 (0: the whole vocabulary), got {args.heads!r}")
    rows = calibration(args.calib)
    ckpt_dir = resolve(args.ckpt)
    cfg, params, tok = load(args.ckpt, fast_cache=fast_cache_dir())  # as generate.py loads them
    if tok is None:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no tokenizer: cannot encode calibration prompts")
    chat = tok.chat_template is not None and not args.raw
    texts = [tok.apply_chat_template([{"role": "user", "content": r["text"]}]) if chat else r["text"] for r in rows]
    prompts = [tok.encode(t) for t in texts]
    eos = tuple(tok.eos_ids) or cfg.eos_ids
    opts = SearchOptions(budget=args.budget, method=args.method, max_new=args.max_new, top=args.top,
                         real_prompts=args.real_prompts, repeats=args.repeats, margin=args.margin, seed=args.seed,
                         bench=args.bench, precisions=precisions, heads=heads)
    res = search(params, cfg, prompts, eos, opts, progress=not args.no_progress, calib_name=args.calib)
    out = args.out or ckpt_dir / PROFILE_NAME
    save_profile(out, res.profile)
    note = plot(res.profile, args.plot or out.with_suffix(".png"))
    info, p = res.profile.info, res.profile
    summary = {"profile": str(out), "use_ssd": p.use_ssd, "winner": info["winner"], "self_draft": p.self_draft,
               "ar_tokens_per_s": info["ar_tokens_per_s"],
               "measured": {t["label"]: t["speedup"] for t in info["candidates"][1:]}, **res.report, "plot": note}
    if "bench" in info:
        b = info["bench"]
        summary["bench"] = {**{k: v for k, v in b.items() if k != "other_trace"},
                            "real": {t["label"]: t["speedup"] for t in info["candidates"]}}
    print(json.dumps(summary))
    return 0


def entry() -> None:
    """Console script ``jaxspec-search-skip`` (and ``python scripts/search_skip.py``)."""
    cli.exit(cli.run(main))


if __name__ == "__main__":
    entry()
