"""A long document to summarize: AR vs SmolLM2's default n-gram drafting (2..4, adaptive k 2..4, its phrase table)
and session 17's (adaptive k 4..8), side by side in one process (interleaved rounds after a warm-up round; medians
of decode tokens/s).

    python benchmarks/bench_longdoc.py                   # aclsum evaluation documents joined to ~1,800 tokens
    python benchmarks/bench_longdoc.py --tokens 3500 --rounds 5

The benchmark's own summaries are a few hundred tokens, where attention is a small part of a step; here it is
~40% with exact 4-bit weights (2k tokens of K/V per step). To compare two versions, run this in each checkout (a
``git worktree``), alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxspec import data, phrases  # noqa: E402
from jaxspec.checkpoint import fast_cache_dir, load  # noqa: E402
from jaxspec.decode import Decoder, generate  # noqa: E402
from jaxspec.speculative import SpecDecoder  # noqa: E402

TABLE = Path(__file__).resolve().parents[1] / "jaxspec" / "profiles" / "smollm2-135m.phrases.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1800, help="join documents until they are this long")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg, params, tok = load("smollm2-135m", fast_cache=fast_cache_dir())
    text = ""
    for doc in (p["text"] for p in data.prompts("summarization", "evaluation")):
        if len(tok.encode(text)) >= args.tokens:
            break
        text += doc + "\n\n"
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text + "Summarize the documents above."}]))
    eos = tuple(tok.eos_ids)
    with_table = params.replace(phrases=phrases.load(TABLE, cfg.vocab_size))
    ngram = dict(cfg=cfg, eos_ids=eos, drafter="ngram", ngram_min=2, ngram_max=4)
    decoders = {"AR": (Decoder(cfg, eos_ids=eos), params),
                "k 2..4 adaptive + phrases (default)": (SpecDecoder(**ngram, ngram_k=4, adaptive_k=True), with_table),
                "k 4..8 adaptive + phrases": (SpecDecoder(**ngram, ngram_k=8, adaptive_k=True), with_table)}
    tps: dict[str, list[float]] = {k: [] for k in decoders}
    out: dict[str, list[int]] = {}
    for r in range(args.rounds + 1):  # round 0 compiles and grows the cache's windows
        for name, (dec, p) in decoders.items():
            res = generate(dec, p, [ids], args.max_new_tokens)
            out[name] = res.tokens[0]
            if r:
                tps[name].append(res.tokens_per_s)
    ar = statistics.median(tps["AR"])
    print(f"prompt {len(ids)} tokens, {len(out['AR'])} new: AR {ar:.1f} tokens/s; " + "; ".join(
        f"{k} {statistics.median(v):.1f} ({statistics.median(v) / ar:.2f}x, identical: {out[k] == out['AR']})"
        for k, v in tps.items() if k != "AR"))


if __name__ == "__main__":
    main()
