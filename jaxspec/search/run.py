"""The search: calibrate, optimize the proxy over masks × draft precision × head width (× max_draft × θ₀), time
the best self-drafts, the n-gram drafter and hybrid for real against AR, write a profile."""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.costmodel import measure_costs
from jaxspec.draft_model import DraftSpec, rank_tokens
from jaxspec.model import Params
from jaxspec.profile import ADOPT_MARGIN, DEFAULT, Profile, adopt, model_id
from jaxspec.search.calibrate import calibrate, fit_prompts
from jaxspec.search.device import device_info
from jaxspec.search.masks import mask_to_x, starting_points, x_to_mask
from jaxspec.search.optimize import optimize
from jaxspec.search.proxy import Proxy
from jaxspec.search.simulate import Prediction, predict
from jaxspec.search.timing import OBJECTIVE, Candidate, Timing, measure


@dataclass
class SearchOptions:
    budget: int = 60  # proxy evaluations (masks scored, each at every precision and head width)
    method: str = "gp"  # or "random"
    max_new: int = 48  # new tokens per calibration prompt (targets and real timings)
    drafts: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)  # max_draft values the proxy chooses from, per mask
    thetas: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # initial θ values the proxy chooses from
    precisions: tuple[str, ...] = ("float32", "int8", "bfloat16")  # draft weight precisions (draft_model)
    heads: tuple[int, ...] = (0, 16384, 4096)  # draft head widths, most frequent tokens (0: the whole vocabulary)
    ngram: tuple[tuple[int, int, int], ...] = ((2, 4, 4), (2, 4, 8))  # n-gram settings timed (min, max, k)
    # ... also timed with adaptive k (SpecDecoder.adaptive_k): opt-in, as the timings exclude start-up, where its third
    # compiled verify width costs 0.2-0.3 s per process on CPU (BENCHMARKS.md "Adaptive k")
    ngram_adaptive: tuple[tuple[int, int, int], ...] = ()
    hybrid: bool = True  # also time hybrid (n-gram, else the best self-draft)
    n_initial: int = 8  # random points before the GP takes over
    top: int = 3  # best distinct self-drafts (by the proxy) timed end to end
    real_prompts: int = 6  # calibration prompts timed end to end (the first ones)
    repeats: int = 3  # interleaved rounds of real timing
    margin: float = ADOPT_MARGIN  # a drafter is adopted only if its lowest per-round speedup is at least 1 + margin
    seed: int = 0
    bench: bool = False  # also: random search at the same budget, and the starting points timed for real


@dataclass
class SearchResult:
    profile: Profile
    trace: list[dict[str, Any]]
    timings: list[Timing]
    report: dict[str, Any]


def search(params: Params, cfg: Config, prompts: Sequence[Sequence[int]], eos_ids: tuple[int, ...],
           opts: SearchOptions | None = None, progress: bool = True, calib_name: str = "builtin") -> SearchResult:
    """Find a profile for ``cfg``/``params`` on this device (see the package docstring for the method)."""
    from tqdm import tqdm

    opts = opts or SearchOptions()
    if opts.budget < 1 or opts.top < 1 or opts.repeats < 1 or opts.real_prompts < 1:
        raise ValueError("budget, top, repeats and real_prompts must be >= 1")
    t_start = time.perf_counter()
    L = cfg.n_layers
    heads = tuple(dict.fromkeys(w if w < cfg.vocab_size else 0 for w in opts.heads))
    toks = fit_prompts(prompts, opts.max_new, max(max(opts.drafts), *(k for *_, k in opts.ngram + opts.ngram_adaptive)))
    calib = calibrate(params, cfg, toks, opts.max_new, eos_ids)
    # The narrow heads' tokens: the model's own continuations of the calibration prompts, most frequent first; of
    # the prompts not timed end to end when there are any, so the real timings judge a head on text it was not made
    # from (the proxy's acceptance of a narrow head is optimistic on the prompts it was counted on).
    conts = [t[:n] for t, n in zip(calib.targets.tolist(), calib.lengths, strict=True)]
    held_out = len(conts) > opts.real_prompts
    ranking = rank_tokens(conts[opts.real_prompts:] if held_out else conts, cfg.vocab_size)
    vocab = ranking[: max(heads)] if max(heads) else None
    proxies = {p: Proxy(params, cfg, calib, precision=p, heads=heads, ranking=ranking) for p in opts.precisions}
    context = int(np.median([len(p) for p in toks])) + opts.max_new // 2
    cost = measure_costs(params, cfg, 256, context, opts.drafts, opts.precisions, heads, ranking)
    starts = starting_points(L)

    def run_search(method: str, label: str) -> tuple[list[dict[str, Any]], float]:
        trace: list[dict[str, Any]] = []
        names = {tuple(mask_to_x(m, L)): name for name, m in starts.items()}
        bar = tqdm(total=opts.budget, desc=f"{label} search", disable=not progress, leave=True)

        def objective(x: np.ndarray) -> float:
            mask = x_to_mask(x)
            preds: list[Prediction] = []
            for prec, proxy in proxies.items():
                agree, conf = proxy(mask)
                preds += [predict(agree[j], conf[j], calib.lengths, mask, cost, L, opts.drafts, opts.thetas,
                                  DraftSpec(prec, w)) for j, w in enumerate(heads)]
            pred = max(preds, key=lambda p: p.speedup)
            trace.append({"i": len(trace), "source": names.get(tuple(int(v) for v in x), method),
                          **mask.to_json(), "skipped": len(mask.attn) + len(mask.mlp),
                          "precision": pred.spec.precision, "head": pred.spec.head,
                          "predicted_speedup": round(pred.speedup, 4), "acceptance": round(pred.acceptance, 4),
                          "tokens_per_cycle": round(pred.tokens_per_cycle, 3), "max_draft": pred.max_draft,
                          "theta": pred.theta, "draft_cost": round(pred.draft_cost, 4),
                          "variants": {f"{p.spec.precision}/{p.spec.head}": [round(p.speedup, 4),
                                                                             round(p.acceptance, 4)] for p in preds}})
            bar.update(1)
            bar.set_postfix_str(f"best predicted speedup {max(t['predicted_speedup'] for t in trace):.3f}x")
            return -pred.speedup

        opt_s = optimize(objective, 2 * L, opts.budget, [mask_to_x(m, L) for m in starts.values()], method,
                         opts.n_initial, opts.seed)
        bar.close()
        return trace, opt_s

    trace, opt_s = run_search(opts.method, opts.method.upper())

    def cand(t: dict[str, Any], label: str, drafter: str = "skip",
             ngram: tuple[int, int, int] = (2, 4, 8)) -> Candidate:
        return Candidate(label, SkipMask.from_json(t), t["max_draft"], t["theta"], t["predicted_speedup"], drafter,
                         ngram, DraftSpec(t["precision"], t["head"]))

    def best_of(trace: list[dict[str, Any]], k: int, label: str) -> list[Candidate]:
        ranked = sorted(trace, key=lambda t: -t["predicted_speedup"])[:k]
        return [cand(t, f"{label}#{n + 1}" if k > 1 else label) for n, t in enumerate(ranked)]

    cands = best_of(trace, opts.top, opts.method)
    bench: dict[str, Any] = {}
    if opts.bench:
        other = "random" if opts.method == "gp" else "gp"
        t0 = time.perf_counter()
        other_trace, _ = run_search(other, other.upper())

        def top_pred(tr: list[dict[str, Any]], skipping: bool = False) -> float:
            return max((t["predicted_speedup"] for t in tr if t["skipped"] or not skipping), default=0.0)

        bench = {"other_method": other, "other_search_s": round(time.perf_counter() - t0, 1),
                 "best_predicted": top_pred(trace), "other_best_predicted": top_pred(other_trace),
                 "best_predicted_skipping": top_pred(trace, True),
                 "other_best_predicted_skipping": top_pred(other_trace, True), "other_trace": other_trace}
        cands += best_of(other_trace, 1, other) + best_of([t for t in other_trace if t["skipped"]], 1,
                                                          f"{other}-skipping")
        for name in ("none", "every-other-middle"):
            cands.append(cand(next(t for t in trace if t["source"] == name), name))
    best_pred = max(trace, key=lambda t: t["predicted_speedup"])
    for ng, adaptive in [(ng, False) for ng in opts.ngram] + [(ng, True) for ng in opts.ngram_adaptive]:
        label = "ngram" + (" (default)" if ng == DEFAULT.ngram and not adaptive else "") + \
            f" {ng[0]}..{ng[1]} k{ng[2]}" + (" adaptive" if adaptive else "")
        cands.append(Candidate(label, SkipMask(), 12, 0.6, None, "ngram", tuple(ng), ngram_adaptive=adaptive))
    if opts.hybrid and opts.ngram:
        cands.append(cand(best_pred, f"hybrid ({opts.method}#1)", "hybrid", tuple(opts.ngram[0])))
    unique: dict[tuple[Any, ...], Candidate] = {}
    for c in cands:  # one timing per distinct decoder; labels of duplicates are joined
        key = tuple(str(v) for v in c.settings.values()) if c.drafter != "ngram" else (c.drafter, c.ngram,
                                                                                         c.ngram_adaptive)
        if key in unique:
            unique[key].label += f"={c.label}"
        else:
            unique[key] = c
    t_real = time.perf_counter()
    timings = measure(params, cfg, toks[: opts.real_prompts], opts.max_new, eos_ids, list(unique.values()),
                      opts.repeats, ranking=ranking)
    real_s = time.perf_counter() - t_real
    wall_s = time.perf_counter() - t_start
    ar, measured = timings[0], timings[1:]
    selfs = [t for t in measured if t.candidate.drafter == "skip"] or measured
    best_self = max(selfs, key=lambda t: t.speedup)
    adopted = [t for t in measured if t.lossless and adopt([1.0] * len(t.speedups), t.speedups, opts.margin)]
    incumbent = next((t for t in adopted if t.candidate.drafter == "ngram" and t.candidate.ngram == DEFAULT.ngram
                      and not t.candidate.ngram_adaptive), None)
    if incumbent is not None:  # the no-profile default changes only for a drafter that beats it in every round too
        adopted = [t for t in adopted if t is incumbent or adopt(incumbent.speedups, t.speedups, opts.margin)]
    win = max(adopted, key=lambda t: t.speedup) if adopted else max(measured, key=lambda t: t.speedup)
    compile_s = sum(p.compile_s for p in proxies.values()) + calib.compile_s + cost.compile_s + sum(
        t.compile_s for t in timings)
    warm_s = sum(t.warmup_s for t in timings)
    search_s = wall_s - (bench.get("other_search_s", 0.0) if opts.bench else 0.0)
    proxy_s, calls = sum(p.eval_s for p in proxies.values()), max(len(trace), 1)
    report = {
        "wall_s": round(wall_s, 1), "search_s": round(search_s, 1), "compile_s": round(compile_s, 1),
        "compile_share": round(compile_s / search_s, 4), "warmup_s": round(warm_s, 1),
        "compile_and_warmup_share": round((compile_s - sum(t.compile_s for t in timings) + warm_s) / search_s, 4),
        "calibrate_s": round(calib.run_s, 1), "proxy_eval_s": round(proxy_s, 1),
        "proxy_per_mask_s": round(proxy_s / calls, 3), "optimizer_s": round(opt_s, 1),
        "real_timing_s": round(real_s, 1),
    }

    def summary(t: Timing) -> dict[str, Any]:
        return {**t.candidate.settings, "label": t.label, "speedup": round(t.speedup, 4),
                "lowest_round": round(min(t.speedups), 4), "predicted_speedup": t.predicted,
                "acceptance_rate": round(t.acceptance_rate, 4), "mean_accepted": round(t.mean_accepted, 3),
                "lossless": t.lossless}

    info = {
        "objective": OBJECTIVE.format(repeats=opts.repeats),
        "proxy": "teacher-forced draft top-1 agreement/confidence (the draft copy at each precision, each head "
                 "width) with the full model's KV as context, replayed through the adaptive-θ draft policy, times a "
                 "per-component measured cost model (jaxspec/costmodel.py, jaxspec/search/)",
        "device": device_info(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget": opts.budget, "method": opts.method, "precisions": list(opts.precisions), "heads": list(heads),
        "ar_tokens_per_s": round(ar.tokens_per_s, 3), "winner": summary(win) | {"adopted": bool(adopted)},
        "calibration": {"set": calib_name, "prompts": len(toks), "real_timing_prompts": min(opts.real_prompts,
                        len(toks)), "max_new": opts.max_new, "repeats": opts.repeats},
        "search_time": report, "cost_model": cost.to_json(),
        "draft_vocab_from": f"calibration prompts {opts.real_prompts + 1}.." if held_out else "all calibration prompts",
        "candidates": [t.to_json() for t in timings],
        "trace": trace,
        "draft": win.candidate.spec.to_json(),
    }
    if vocab is not None:
        info["draft_vocab"] = [int(v) for v in vocab]
    if not adopted:
        info["note"] = (f"no drafter beat AR decoding by {opts.margin:.0%} in every round on this device "
                        f"(best: {win.label} at {win.speedup:.3f}x, lowest round {min(win.speedups):.3f}x): use AR")
    if bench:
        info["bench"] = bench
    c = win.candidate
    prof = Profile(mask=c.mask if c.drafter != "ngram" else SkipMask(), threshold=c.theta, max_draft=c.max_draft,
                   model_id=model_id(cfg), use_ssd=bool(adopted), drafter=c.drafter, ngram=c.ngram,
                   ngram_adaptive=c.ngram_adaptive,
                   speedup=round(win.speedup, 4), self_draft=summary(best_self), info=info)
    return SearchResult(prof, trace, timings, report)
