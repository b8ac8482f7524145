"""Per-task speedups of the draft sources over AR, measured side by side in one process (interleaved rounds).

    python benchmarks/bench_tasks.py  # summarization, code, chat/story: AR vs n-gram drafting
    python benchmarks/bench_tasks.py --drafter ngram --drafter hybrid --skip-attn 10,12 --rounds 3
    python benchmarks/bench_tasks.py --prompt-set benchmark --per-task 8 --ngram-set 2,4,4 --ngram-set 2,4,8,adaptive
    python benchmarks/bench_tasks.py --lookup-cost  # n-gram lookup cost vs one decode step, 128 and 4k history
    python benchmarks/bench_tasks.py --verify-cost  # cycles verifying T tokens vs forward(T) vs one AR step

Prompts: aclsum evaluation abstracts ("summarize"), HumanEval evaluation functions, MT-Bench evaluation questions
plus story requests, each in the chat template. A round runs every prompt with every decoder back to back, in an
order rotated per prompt and round; a task's ratio in a round is its tokens/s over AR's in that round. The table
gives the median ratio over rounds and the lowest (the lower bound ``profile.adopt`` uses).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec import data, phrases  # noqa: E402
from jaxspec.checkpoint import fast_cache_dir, load  # noqa: E402
from jaxspec.config import SkipMask  # noqa: E402
from jaxspec.decode import Decoder, capacity, generate, window_len  # noqa: E402
from jaxspec.model import KVCache, forward  # noqa: E402
from jaxspec.profile import adopt  # noqa: E402
from jaxspec.speculative import SpecDecoder, ngram_propose  # noqa: E402

RATIOS = ("acceptance_rate", "mean_accepted", "theta")  # SpecStats.summary ratios: not summable over prompts
STORIES = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Tell me a bedtime story about a dragon who is afraid of the dark."]


def task_prompts(tok, per_task: int, prompt_set: str = "zero-shot") -> dict[str, list[list[int]]]:  # noqa: ANN001
    """Token ids per task: ``zero-shot`` (the requests alone, stories for chat) or ``benchmark`` (the full benchmark's
    items, ``jaxspec.bench.tasks``: 1-shot aclsum summaries, HumanEval, MT-Bench)."""
    if prompt_set == "benchmark":
        from jaxspec.bench import tasks

        return {t: [tasks.prompt_ids(it, tok) for it in tasks.load(t, per_task)] for t in ("summarization", "code",
                                                                                          "chat")}
    chat = data.prompts("chat", "evaluation")[: max(per_task - len(STORIES), 1)]
    texts = {"summarization": [p["text"] for p in data.prompts("summarization", "evaluation")[:per_task]],
             "code": [p["text"] for p in data.prompts("code", "evaluation")[:per_task]],
             "chat/story": [p["text"] for p in chat] + STORIES[: per_task - len(chat)]}
    return {t: [tok.encode(tok.apply_chat_template([{"role": "user", "content": x}])) for x in xs]
            for t, xs in texts.items()}


def lookup_cost(params, cfg, n: int = 64) -> None:  # noqa: ANN001
    """Seconds per n-gram lookup and per decode step (batch 1) at 128 and 4k tokens of history/context."""
    def timed(f, *a) -> float:  # noqa: ANN001
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) / n

    for ctx in (128, 4096):
        cap = ctx + 256
        hist = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, cap)), jnp.int32)

        @jax.jit
        def look(h: jax.Array, ctx: int = ctx) -> jax.Array:
            def body(i: int, acc: jax.Array) -> jax.Array:
                d, c = ngram_propose(h, jnp.asarray([ctx - (i % 2)]), 2, 4, 8)
                return acc + d[0, 0] + c[0]
            return jax.lax.fori_loop(0, n, body, jnp.int32(0))

        @jax.jit
        def step(p, cache: KVCache) -> jax.Array:  # noqa: ANN001
            def body(i: int, c: tuple) -> tuple:
                logits, cache = forward(p, cfg, jnp.full((1, 1), 7, jnp.int32), c[0])
                return cache.replace(lengths=c[0].lengths), c[1] + logits[0, -1, 0]
            return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

        cache = KVCache.create(cfg, 1, cap).replace(lengths=jnp.asarray([ctx], jnp.int32))
        t_look, t_step = timed(look, hist), timed(step, params, cache)
        print(f"- history/context {ctx}: n-gram lookup {t_look * 1e3:.3f} ms, decode step {t_step * 1e3:.2f} ms, "
              f"ratio {t_look / t_step:.4f}")


@dataclass(frozen=True)
class ForcedDrafts(SpecDecoder):
    """A probe: the n-gram decoder (lookup still run) made to propose exactly ``force`` tokens every cycle (its
    lookup's tokens where it found some; they are mostly rejected, so each cycle emits about one token)."""

    force: int = 0

    def draft(self, params, state, key):  # noqa: ANN001, ANN201
        drafts, n_draft, n_ng, n_ph, q, cache, steps = super().draft(params, state, key)
        room = jnp.where(state.done, 0, state.budget - state.n_out)
        n = jnp.clip(jnp.minimum(self.force, room - 1), 0, None).astype(jnp.int32)
        return drafts, n, jnp.minimum(n_ng, n), jnp.minimum(n_ph, n), q, cache, steps


def verify_cost(params, cfg, prompt: list[int], n: int, rounds: int, widths: tuple[int, ...] = (1, 2, 3, 5, 9),
                reps: int = 32) -> None:  # noqa: ANN001
    """Per verify width T: seconds per cycle of an n-gram decoder forced to verify T tokens every cycle
    (``ForcedDrafts``, k = T - 1: its compiled verify lengths are 1 and T, so a cycle runs exactly T; with one k for
    all widths every T below k + 1 ran at k + 1), seconds per isolated ``forward`` of T tokens (a jitted loop of
    ``reps`` at the cache window and mid-request length the cycles see), both over seconds per AR step of
    ``generate``; interleaved rounds."""
    cycles = {t: ForcedDrafts(cfg, drafter="ngram", ngram_min=2, ngram_max=4, ngram_k=max(t - 1, 1), force=t - 1)
              for t in widths}
    window = window_len(len(prompt) + n + cycles[widths[0]].extra, capacity(cycles[widths[0]], len(prompt) + n))
    cache = KVCache.create(cfg, 1, window).replace(lengths=jnp.asarray([len(prompt) + n // 2], jnp.int32))

    @functools.partial(jax.jit, static_argnums=2)
    def fwd(p, cache: KVCache, t: int) -> jax.Array:  # noqa: ANN001
        base = cache.lengths
        def body(i: int, c: tuple) -> tuple:
            logits, cache = forward(p, cfg, jnp.full((1, t), 7, jnp.int32) + i, c[0].replace(lengths=base + i % 2))
            return cache.replace(lengths=c[0].lengths), c[1] + jnp.argmax(logits, -1).sum()
        return jax.lax.fori_loop(0, reps, body, (cache, jnp.int32(0)))[1]

    def run(name: str) -> float:
        if name == "ar":
            return generate(Decoder(cfg), params, [prompt], n).decode_s / n
        kind, t = name.split(":")
        if kind == "cycle":
            res = generate(cycles[int(t)], params, [prompt], n)
            return res.decode_s / int(res.stats.verify_calls[0])
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, cache, int(t)))
        return (time.perf_counter() - t0) / reps

    names = ["ar"] + [f"{kind}:{t}" for t in widths for kind in ("cycle", "forward")]
    for name in names:  # compile and first execution
        run(name)
    per: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in np.roll(names, -r):
            per[name].append(run(name))
    ar = np.asarray(per["ar"])
    print(f"window {window}, prompt {len(prompt)} tokens, {n} new tokens; isolated forward at length "
          f"{len(prompt) + n // 2}; verify sizes compiled (1, T) each; AR step "
          f"{np.median(ar) * 1e3:.1f} ms; ratios to AR: median (lowest..highest round)\n")
    print("| T | in-cycle | isolated forward(T) | cycle / forward |\n|---|---|---|---|")
    for t in widths:
        c, f = np.asarray(per[f"cycle:{t}"]) / ar, np.asarray(per[f"forward:{t}"]) / ar
        print(f"| {t} | **{np.median(c):.3f}x** ({c.min():.2f}..{c.max():.2f}) | {np.median(f):.3f}x "
              f"({f.min():.2f}..{f.max():.2f}) | {np.median(c / f):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--per-task", type=int, default=3, help="prompts per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--task", action="append", help="only these tasks (summarization, code, chat/story)")
    ap.add_argument("--drafter", action="append", help="ngram (default), hybrid, skip; repeatable")
    ap.add_argument("--skip-attn", default="", help="skip mask of skip/hybrid drafters")
    ap.add_argument("--skip-mlp", default="")
    ap.add_argument("--ngram-k", type=int, default=8)
    ap.add_argument("--prompt-set", choices=["zero-shot", "benchmark"], default="zero-shot",
                    help="zero-shot requests (default) or the full benchmark's items (1-shot summaries)")
    ap.add_argument("--ngram-set", action="append", default=[], metavar="MIN,MAX,K[,adaptive]",
                    help="the n-gram drafter with these settings (SpecDecoder.adaptive_k with ',adaptive'), instead "
                    "of --drafter's default; repeatable")
    ap.add_argument("--phrases", action="append", default=[], help="also every n-gram decoder with this phrase table "
                    "(jaxspec/phrases.py); repeatable")
    ap.add_argument("--adaptive-k", action="store_true", help="also each drafter with adaptive n-gram proposal "
                    "length (SpecDecoder.adaptive_k)")
    ap.add_argument("--lookup-cost", action="store_true", help="only time the n-gram lookup against a decode step")
    ap.add_argument("--verify-cost", action="store_true", help="only time cycles verifying T tokens against an "
                    "isolated forward(T) and an AR step")
    ap.add_argument("--widths", default="1,2,3,5,9", help="verify widths T of --verify-cost")
    args = ap.parse_args()
    ngram_sets = []  # (label, min, max, k, adaptive), checked before the model loads
    for spec in args.ngram_set:
        lo, hi, k, *adaptive = spec.split(",")
        if adaptive not in ([], ["adaptive"]) or not (lo + hi + k).isdigit():
            ap.error(f"--ngram-set takes MIN,MAX,K or MIN,MAX,K,adaptive, got {spec!r}")
        ngram_sets.append((f"ngram {lo}..{hi} k={k}{' adaptive' if adaptive else ''}", int(lo), int(hi), int(k),
                           bool(adaptive)))

    cfg, params, tok = load(args.ckpt, fast_cache=fast_cache_dir())  # as generate.py loads them
    print(f"## {args.ckpt}: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, {cfg.dtype}, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    if args.lookup_cost:
        lookup_cost(params, cfg)
        return
    if args.verify_cost:
        verify_cost(params, cfg, task_prompts(tok, 1)["chat/story"][0], args.max_new_tokens, max(args.rounds, 3),
                    tuple(int(x) for x in args.widths.split(",")))
        return
    mask = SkipMask(tuple(int(x) for x in args.skip_attn.split(",") if x),
                    tuple(int(x) for x in args.skip_mlp.split(",") if x))
    eos = tuple(tok.eos_ids) or cfg.eos_ids
    decs = {"ar": Decoder(cfg, eos_ids=eos)}
    for d in args.drafter or ([] if args.ngram_set else ["ngram"]):
        decs[d] = SpecDecoder(cfg, eos_ids=eos, skip=mask, drafter=d, ngram_k=args.ngram_k)
        if args.adaptive_k:
            decs[f"{d} adaptive k"] = SpecDecoder(cfg, eos_ids=eos, skip=mask, drafter=d, ngram_k=args.ngram_k,
                                                  adaptive_k=True)
    for label, lo, hi, k, adaptive in ngram_sets:
        decs[label] = SpecDecoder(cfg, eos_ids=eos, drafter="ngram", ngram_min=lo, ngram_max=hi, ngram_k=k,
                                  adaptive_k=adaptive)
    pars = dict.fromkeys(decs, params)
    for path in args.phrases:
        table, tag = params.replace(phrases=phrases.load(path, cfg.vocab_size)), Path(path).name.split(".")[0]
        for n in [n for n, d in decs.items() if getattr(d, "drafter", None) == "ngram" and pars[n] is params]:
            decs[f"{n} + {tag if len(args.phrases) > 1 else 'phrases'}"] = decs[n]
            pars[f"{n} + {tag if len(args.phrases) > 1 else 'phrases'}"] = table
    tasks = {t: p for t, p in task_prompts(tok, args.per_task, args.prompt_set).items()
             if not args.task or t in args.task}
    names = list(decs)
    for n, d in decs.items():  # warm-up: compilation and first-execution costs
        generate(d, pars[n], [next(iter(tasks.values()))[0]], args.max_new_tokens)
    # secs[task][decoder][round], toks likewise; outputs[task][decoder][prompt]
    secs = {t: {n: np.zeros(args.rounds) for n in names} for t in tasks}
    toks = {t: {n: np.zeros(args.rounds) for n in names} for t in tasks}
    outs: dict = {t: {n: {} for n in names} for t in tasks}
    summ: dict = {t: {n: {} for n in names} for t in tasks}
    for r in range(args.rounds):
        for t, prompts in tasks.items():
            for i, p in enumerate(prompts):
                for j in np.roll(np.arange(len(names)), -(i + r)):
                    n = names[j]
                    res = generate(decs[n], pars[n], [p], args.max_new_tokens)
                    secs[t][n][r] += res.decode_s
                    toks[t][n][r] += res.new_tokens
                    outs[t][n][i] = res.tokens[0]
                    if res.stats is not None and r == 0:
                        for k, v in res.stats.summary().items():
                            if k not in RATIOS:  # ratios are recomputed from the summed counters below
                                summ[t][n][k] = summ[t][n].get(k, 0) + v
    print(f"{args.max_new_tokens} new tokens, greedy, {args.per_task} prompts per task, {args.rounds} interleaved "
          f"rounds; ratio = drafter tokens/s / AR tokens/s (median over rounds, lowest round)\n")
    print("| task | drafter | AR tok/s | tok/s | speedup | lowest round | adopt (+3%) | drafted (ngram/phrase/model) | "
          "accepted (ngram/phrase/model) | accepted per verify | identical |\n" + "|---" * 11 + "|")
    for t in tasks:
        ar_tps = toks[t]["ar"] / secs[t]["ar"]
        for n in names[1:]:
            tps = toks[t][n] / secs[t][n]
            ratio = tps / ar_tps
            s = summ[t][n]
            per_verify = s["accepted"] / s["verify_calls"] if s["verify_calls"] else 0.0
            print(f"| {t} | {n} | {np.median(ar_tps):.1f} | {np.median(tps):.1f} | **{np.median(ratio):.2f}x** | "
                  f"{ratio.min():.2f}x | {adopt(ar_tps, tps)} | "
                  f"{s['drafted_ngram']}/{s['drafted_phrase']}/{s['drafted_model']} | "
                  f"{s['accepted_ngram']}/{s['accepted_phrase']}/{s['accepted_model']} | {per_verify:.2f} | "
                  f"{outs[t][n] == outs[t]['ar']} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
