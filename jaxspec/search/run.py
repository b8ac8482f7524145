"""The search: calibrate, optimize the proxy over masks, time the best candidates for real, write a profile."""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxspec.config import Config, SkipMask
from jaxspec.model import Params
from jaxspec.profile import ADOPT_MARGIN, Profile, adopt, model_id
from jaxspec.search.calibrate import calibrate, fit_prompts
from jaxspec.search.cost import measure_costs, predict
from jaxspec.search.device import device_info
from jaxspec.search.masks import mask_to_x, starting_points, x_to_mask
from jaxspec.search.optimize import optimize
from jaxspec.search.proxy import Proxy
from jaxspec.search.timing import OBJECTIVE, Candidate, Timing, measure


@dataclass
class SearchOptions:
    budget: int = 60  # proxy evaluations (masks scored)
    method: str = "gp"  # or "random"
    max_new: int = 48  # new tokens per calibration prompt (targets and real timings)
    drafts: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)  # max_draft values the proxy chooses from, per mask
    thetas: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # initial θ values the proxy chooses from
    n_initial: int = 8  # random points before the GP takes over
    top: int = 3  # best distinct masks (by the proxy) timed end to end
    real_prompts: int = 6  # calibration prompts timed end to end (the first ones)
    repeats: int = 3  # interleaved rounds of real timing
    margin: float = ADOPT_MARGIN  # SSD is used only if its lowest per-round speedup is at least 1 + margin
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
    """Find a skip profile for ``cfg``/``params`` on this device (see the module docstring for the method)."""
    from tqdm import tqdm

    opts = opts or SearchOptions()
    if opts.budget < 1 or opts.top < 1 or opts.repeats < 1 or opts.real_prompts < 1:
        raise ValueError("budget, top, repeats and real_prompts must be >= 1")
    t_start = time.perf_counter()
    L = cfg.n_layers
    toks = fit_prompts(prompts, opts.max_new, max(opts.drafts))
    calib = calibrate(params, cfg, toks, opts.max_new, eos_ids)
    proxy = Proxy(params, cfg, calib)
    context = int(np.median([len(p) for p in toks])) + opts.max_new // 2
    cost = measure_costs(params, cfg, 256, context, opts.drafts)
    starts = starting_points(L)

    def run_search(method: str, label: str) -> tuple[list[dict[str, Any]], float]:
        trace: list[dict[str, Any]] = []
        names = {tuple(mask_to_x(m, L)): name for name, m in starts.items()}
        bar = tqdm(total=opts.budget, desc=f"{label} search", disable=not progress, leave=True)

        def objective(x: np.ndarray) -> float:
            mask = x_to_mask(x)
            agree, conf = proxy(mask)
            pred = predict(agree, conf, calib.lengths, mask, cost, L, opts.drafts, opts.thetas)
            trace.append({"i": len(trace), "source": names.get(tuple(int(v) for v in x), method),
                          **mask.to_json(), "skipped": len(mask.attn) + len(mask.mlp),
                          "predicted_speedup": round(pred.speedup, 4), "acceptance": round(pred.acceptance, 4),
                          "tokens_per_cycle": round(pred.tokens_per_cycle, 3), "max_draft": pred.max_draft,
                          "theta": pred.theta})
            bar.update(1)
            bar.set_postfix_str(f"best predicted speedup {max(t['predicted_speedup'] for t in trace):.3f}x")
            return -pred.speedup

        opt_s = optimize(objective, 2 * L, opts.budget, [mask_to_x(m, L) for m in starts.values()], method,
                         opts.n_initial, opts.seed)
        bar.close()
        return trace, opt_s

    trace, opt_s = run_search(opts.method, opts.method.upper())

    def best_of(trace: list[dict[str, Any]], k: int, label: str) -> list[Candidate]:
        ranked = sorted(trace, key=lambda t: -t["predicted_speedup"])[:k]
        return [Candidate(f"{label}#{n + 1}" if k > 1 else label, SkipMask.from_json(t), t["max_draft"], t["theta"],
                          t["predicted_speedup"]) for n, t in enumerate(ranked)]

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
            t = next(t for t in trace if t["source"] == name)
            cands.append(Candidate(name, starts[name], t["max_draft"], t["theta"], t["predicted_speedup"]))
    unique: dict[tuple[SkipMask, int, float], Candidate] = {}
    for c in cands:  # one timing per distinct decoder; labels of duplicates are joined
        key = (c.mask, c.max_draft, c.theta)
        if key in unique:
            unique[key].label += f"={c.label}"
        else:
            unique[key] = c
    t_real = time.perf_counter()
    timings = measure(params, cfg, toks[: opts.real_prompts], opts.max_new, eos_ids, list(unique.values()),
                      opts.repeats)
    real_s = time.perf_counter() - t_real
    wall_s = time.perf_counter() - t_start
    ar, ours = timings[0], timings[1: 1 + opts.top]
    best = max(ours, key=lambda t: t.speedup)
    use = adopt([1.0] * len(best.speedups), best.speedups, opts.margin) and best.lossless
    compile_s = calib.compile_s + proxy.compile_s + cost.compile_s + sum(t.compile_s for t in timings)
    warm_s = sum(t.warmup_s for t in timings)
    search_s = wall_s - (bench.get("other_search_s", 0.0) if opts.bench else 0.0)
    report = {
        "wall_s": round(wall_s, 1), "search_s": round(search_s, 1), "compile_s": round(compile_s, 1),
        "compile_share": round(compile_s / search_s, 4), "warmup_s": round(warm_s, 1),
        "compile_and_warmup_share": round((compile_s - sum(t.compile_s for t in timings) + warm_s) / search_s, 4),
        "calibrate_s": round(calib.run_s, 1), "proxy_eval_s": round(proxy.eval_s, 1),
        "proxy_per_mask_s": round(proxy.eval_s / max(proxy.calls, 1), 3), "optimizer_s": round(opt_s, 1),
        "real_timing_s": round(real_s, 1),
    }
    info = {
        "objective": OBJECTIVE.format(repeats=opts.repeats),
        "proxy": "teacher-forced draft top-1 agreement/confidence with the full model's KV as context, replayed "
                 "through the adaptive-θ draft policy, times a measured cost model (see jaxspec/search/)",
        "device": device_info(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget": opts.budget, "method": opts.method,
        "ar_tokens_per_s": round(ar.tokens_per_s, 3), "ssd_tokens_per_s": round(best.tokens_per_s, 3),
        "speedup": round(best.speedup, 4), "predicted_speedup": best.predicted,
        "acceptance_rate": round(best.acceptance_rate, 4), "mean_accepted": round(best.mean_accepted, 3),
        "calibration": {"set": calib_name, "prompts": len(toks), "real_timing_prompts": min(opts.real_prompts,
                        len(toks)), "max_new": opts.max_new, "repeats": opts.repeats},
        "search_time": report,
        "cost_model": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in cost.__dict__.items()},
        "candidates": [t.to_json() for t in timings],
        "trace": trace,
    }
    if not use:
        info["note"] = (f"no mask beat autoregressive decoding on this device (best real speedup "
                        f"{best.speedup:.3f}x{'' if best.lossless else ', output differed from AR'}): use AR")
    if bench:
        info["bench"] = bench
    prof = Profile(mask=best.mask, threshold=best.theta, max_draft=best.max_draft, model_id=model_id(cfg),
                   use_ssd=bool(use), info=info)
    return SearchResult(prof, trace, timings, report)
