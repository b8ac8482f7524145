"""Skip-mask search: Bayesian optimization (scikit-optimize, Gaussian process) of which sublayers the draft skips.

**Objective** (what users feel): end-to-end greedy SSD decode tokens/s on the calibration prompts, on this device,
with the adaptive threshold on, relative to autoregressive decoding measured in the same run. Compiling the decode
loop for one mask takes tens of seconds, so the GP optimizes a *proxy* of that objective that needs no compilation
per mask, and only the best few candidates are compiled and timed for real:

1. ``calibrate.calibrate``: greedy AR continuations of the calibration prompts (one batched run) give the targets,
   and the final KV cache holds the full model's keys and values at every committed position.
2. ``proxy.Proxy``: one jitted function, with the mask as traced ``lax.cond`` gates, computes for every continuation
   position the draft's top-1 token and top-1 probability given the *full model's* KV for the context — exactly
   what the draft sees for its first token of a cycle (later drafts of a cycle see their own KV; ignored).
3. ``simulate.simulate``: replay the draft policy (stop below θ, at ``max_draft`` or at the budget; the adaptive θ rule)
   over those per-position agreements and confidences: drafts, accepted tokens and draft steps per cycle.
4. ``cost.CostModel``: a draft step's time is linear in the sublayers kept (timed once: full step, all attention
   skipped, all MLP skipped) and a verify pass's time is timed per chunk length, all relative to an AR step and
   interleaved so machine noise hits them alike. Predicted speedup = AR step time × tokens / cycle time.
5. ``timing.measure``: the top candidates are compiled and timed end to end against AR (warm-up excluded, interleaved
   repeats, medians) and the profile records those real numbers.

``optimize`` holds the GP, ``masks`` the encoding of masks as points and the starting points, ``run`` the whole
search, ``plot`` and ``device`` what goes into the profile's report.
"""

from jaxspec.search.calibrate import Calibration, calibrate, fit_prompts
from jaxspec.search.cost import CostModel, Prediction, measure_costs, predict
from jaxspec.search.masks import mask_to_x, starting_points, x_to_mask
from jaxspec.search.optimize import optimize, random_masks
from jaxspec.search.plot import plot
from jaxspec.search.proxy import Proxy
from jaxspec.search.run import SearchOptions, SearchResult, search
from jaxspec.search.simulate import SimulatedRun, simulate
from jaxspec.search.timing import Candidate, Timing, measure, robust_speedup

__all__ = ["Calibration", "Candidate", "CostModel", "Prediction", "Proxy", "SearchOptions", "SearchResult",
           "SimulatedRun", "Timing", "calibrate", "fit_prompts", "mask_to_x", "measure", "measure_costs", "optimize",
           "plot", "predict", "random_masks", "robust_speedup", "search", "simulate", "starting_points", "x_to_mask"]
