"""Cheap self-drafts, per component and end to end, side by side in one process (issue 14).

    python benchmarks/bench_draft.py                                   # costs, acceptance, SSD vs AR for --e2e combos
    python benchmarks/bench_draft.py --e2e int8:16384: --e2e int8:8192:light --rounds 5

Prints markdown: the cost of a full decode step, of a draft step for each precision × head × skip mask and of
verify chunks (medians of interleaved rounds, relative to the full step); the draft's teacher-forced top-1
agreement with the model's greedy continuations of held-out prompts (code, chat, story) for every head size; and
for each ``--e2e PRECISION:HEAD:MASK`` the SSD speedup over AR per prompt (interleaved runs), whether the output is
identical, and the speedup the measured costs predict from the cycles actually run. The narrow head's tokens are
ranked by their frequency in the model's own greedy continuations of the builtin calibration prompts.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench import named_masks  # noqa: E402

from jaxspec.checkpoint import load  # noqa: E402
from jaxspec.config import Config, SkipMask  # noqa: E402
from jaxspec.data import calibration  # noqa: E402
from jaxspec.decode import Decoder, generate  # noqa: E402
from jaxspec.draft_model import DraftSpec, draft_bytes, draft_forward, rank_tokens, with_draft  # noqa: E402
from jaxspec.model import KVCache, Params  # noqa: E402
from jaxspec.speculative import SpecDecoder  # noqa: E402


def step_loop(params: Params, cfg: Config, spec: DraftSpec | None, skip: SkipMask, T: int, n: int = 16):  # noqa: ANN201
    """A jitted loop of ``n`` forward passes of a T-token chunk at context 128; returns a zero-argument timer."""
    @jax.jit
    def loop(params: Params, cache: KVCache) -> jax.Array:
        def body(i: int, c: tuple) -> tuple:
            logits, cache = draft_forward(params, cfg, jnp.full((1, T), 7, jnp.int32), c[0], skip, spec)
            return cache.replace(lengths=c[0].lengths), c[1] + logits[0, -1, 7]
        return jax.lax.fori_loop(0, n, body, (cache, jnp.float32(0)))[1]

    cache = KVCache.create(cfg, 1, 256).replace(lengths=jnp.asarray([128], jnp.int32))
    jax.block_until_ready(loop(params, cache))

    def timer() -> float:
        t = time.perf_counter()
        jax.block_until_ready(loop(params, cache))
        return (time.perf_counter() - t) / n
    return timer


def interleaved(timers: dict, rounds: int) -> dict:
    """Median seconds of each timer over ``rounds`` interleaved rounds."""
    ts: dict = {k: [] for k in timers}
    for _ in range(rounds):
        for k, f in timers.items():
            ts[k].append(f())
    return {k: statistics.median(v) for k, v in ts.items()}


def agreement(params: Params, cfg: Config, spec: DraftSpec | None, skip: SkipMask, seqs: list[tuple[list, list]],
              ranking: np.ndarray, heads: list[int]) -> dict[int, float]:
    """Teacher-forced top-1 agreement of the draft with the model's greedy continuation, per head size (the draft
    runs the whole sequence, so its later positions see its own K/V: slightly pessimistic)."""
    fwd = jax.jit(draft_forward, static_argnums=(1, 4, 5))
    hits, total = {h: 0 for h in heads}, 0
    for prompt, cont in seqs:
        seq = prompt + cont
        logits, _ = fwd(params, cfg, jnp.asarray([seq]), KVCache.create(cfg, 1, len(seq)), skip, spec)
        logits = np.asarray(logits[0, len(prompt) - 1 : -1])
        for h in heads:
            cols = np.sort(ranking[:h]) if h else np.arange(cfg.vocab_size)
            hits[h] += int((cols[np.argmax(logits[:, cols], axis=-1)] == np.asarray(cont)).sum())
        total += len(cont)
    return {h: hits[h] / total for h in heads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians)")
    ap.add_argument("--heads", default="4096,8192,16384,32768", help="narrow head sizes for the acceptance table")
    ap.add_argument("--cost-head", type=int, default=16384, help="narrow head size in the cost table")
    ap.add_argument("--masks", default="none,light", help="skip masks: none or bench.py's named masks")
    ap.add_argument("--e2e", action="append", default=[], help="PRECISION:HEAD:MASK[:ROWS] to run end to end (HEAD "
                    "0 = full, MASK empty = none, ROWS: the draft dots' min_rows); repeatable")
    ap.add_argument("--rows", default="0", help="min_rows values for the cost table (0: per backend)")
    ap.add_argument("--calib-new", type=int, default=64, help="tokens generated per calibration prompt (ranking)")
    ap.add_argument("--no-acceptance", action="store_true", help="skip the teacher-forced acceptance table")
    ap.add_argument("--repeats", type=int, default=2, help="end-to-end runs per prompt and decoder")
    args = ap.parse_args()

    cfg, params, tok = load(args.ckpt)
    masks = {"none": SkipMask(), **named_masks(cfg.n_layers)}
    mask_names = args.masks.split(",")
    heads = [int(h) for h in args.heads.split(",")]
    texts = {"code": "def fibonacci(n):", "chat": tok.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea."}]), "story": "Once upon a time"}
    prompts = {k: tok.encode(t) for k, t in texts.items()}
    load_avg = lambda: Path("/proc/loadavg").read_text().split()[0]  # noqa: E731
    print(f"## {args.ckpt}: {jax.devices()[0].device_kind}, load {load_avg()}\n")

    t = time.perf_counter()
    calib = [tok.encode(r["text"]) for r in calibration()]
    gen = generate(Decoder(cfg), params, calib, args.calib_new).tokens
    ranking = rank_tokens([p + g for p, g in zip(calib, gen, strict=True)], cfg.vocab_size)
    print(f"- token ranking: {sum(map(len, gen))} generated + {sum(map(len, calib))} prompt tokens of "
          f"{len(calib)} calibration prompts ({time.perf_counter() - t:.0f} s)")

    rows = [int(r) for r in args.rows.split(",")]
    specs = {(p, h, r): DraftSpec(p, h, r) for p in ("float32", "int8", "bfloat16") for h in (0, args.cost_head)
             for r in (rows if p != "float32" else [0])}
    cheap = {p: with_draft(params, cfg, DraftSpec(p, args.cost_head), ranking) for p in ("float32", "int8", "bfloat16")}
    for p, c in cheap.items():
        print(f"- {p} draft copy (head {args.cost_head}): {draft_bytes(c.draft) / 1e6:.0f} MB added")
    full_heads = {p: with_draft(params, cfg, DraftSpec(p), ranking) for p in ("int8", "bfloat16")}

    # ---- costs -------------------------------------------------------------------------------------------------
    timers = {"full": step_loop(params, cfg, None, SkipMask(), 1)}
    for t in (2, 4, 8, 13):
        timers[f"verify T={t}"] = step_loop(params, cfg, None, SkipMask(), t)
    for (p, h, _), spec in specs.items():
        for m in mask_names:
            pr = cheap[p] if h else full_heads.get(p, cheap[p])
            timers[(p, h, m, spec.rows)] = step_loop(pr, cfg, spec, masks[m], 1)
    cost = interleaved(timers, args.rounds)
    full = cost["full"]
    print(f"\n- full decode step {full * 1e3:.1f} ms (load {load_avg()}); verify / full: " +
          ", ".join(f"{k[7:]}: {v / full:.2f}" for k, v in cost.items() if str(k).startswith("verify")))
    print("\n| draft precision | head | mask | dot rows | draft step / full step |\n|---|---|---|---|---|")
    for k, v in cost.items():
        if isinstance(k, tuple):
            print(f"| {k[0]} | {k[1] or 'full'} | {k[2]} | {k[3]} | {v / full:.2f} |")

    # ---- acceptance (teacher-forced) -----------------------------------------------------------------------------
    if not args.no_acceptance:
        conts = generate(Decoder(cfg), params, list(prompts.values()), args.max_new_tokens).tokens
        seqs = list(zip(prompts.values(), conts, strict=True))
        print("\n| draft precision | mask | top-1 agreement, head full | " +
              " | ".join(f"head {h}" for h in heads) + " |\n|---|---|---|" + "---|" * len(heads))
        for p, m in itertools.product(("float32", "int8", "bfloat16"), mask_names):
            spec = DraftSpec(p) if p != "float32" else None
            acc = agreement(full_heads.get(p, params), cfg, spec, masks[m], seqs, ranking, [0, *heads])
            print(f"| {p} | {m} | " + " | ".join(f"{acc[h]:.3f}" for h in [0, *heads]) + " |")

    # ---- end to end ----------------------------------------------------------------------------------------------
    if not args.e2e:
        return
    print("\n| draft | prompt | AR tok/s | SSD tok/s | speedup | predicted | acceptance | identical |\n"
          "|---|---|---|---|---|---|---|---|")
    ar = Decoder(cfg)
    for combo in args.e2e:
        p, h, m, *r = combo.split(":")
        spec, mask = DraftSpec(p, int(h), int(r[0]) if r else 0), masks[m or "none"]
        pr = with_draft(params, cfg, spec, ranking)
        dec = SpecDecoder(cfg, skip=mask, draft_spec=spec)
        draft_cost = interleaved({"d": step_loop(pr, cfg, spec, mask, 1), "f": timers["full"]}, args.rounds)
        c_draft = draft_cost["d"] / draft_cost["f"]
        c_verify = {t: cost[f"verify T={t}"] / full for t in dec.verify_sizes}
        speedups = []
        generate(ar, params, [prompts["code"]], args.max_new_tokens)
        generate(dec, pr, [prompts["code"]], args.max_new_tokens)  # warm-up
        for name, ids in prompts.items():
            ra, rs = [], []
            for _ in range(args.repeats):
                ra.append(generate(ar, params, [ids], args.max_new_tokens))
                rs.append(generate(dec, pr, [ids], args.max_new_tokens))
            a_tps = statistics.median(r.tokens_per_s for r in ra)
            s_tps = statistics.median(r.tokens_per_s for r in rs)
            st = rs[0].stats
            pred = sum(nd * c_draft + c_verify[min(t for t in dec.verify_sizes if t >= nd + 1)]
                       for nd in st["drafted_trace"][0][: st["verify_calls"][0]])
            speedups.append(s_tps / a_tps)
            same = all(r.tokens == ra[0].tokens for r in rs)
            print(f"| {spec}, {m or 'none'}, rows {spec.rows} (draft {c_draft:.2f}) | {name} | {a_tps:.1f} | "
                  f"{s_tps:.1f} | {s_tps / a_tps:.2f}x | {rs[0].new_tokens / pred:.2f}x | "
                  f"{st['accepted'][0] / max(st['drafted'][0], 1):.2f} | {same} |")
        print(f"| {spec}, {m or 'none'} | **median** | | | **{statistics.median(speedups):.2f}x** | | | |")
    print(f"\nload at the end: {load_avg()}")


if __name__ == "__main__":
    main()
