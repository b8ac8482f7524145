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
   The draft is also searched at lower precision (int8, bfloat16: ``draft_model``'s copy) and with a narrow head
   (the most frequent tokens of those continuations); every head width is read off one pass per precision.
4. ``costmodel.CostModel`` (``jaxspec/costmodel.py``): per component, relative to an AR step and timed in
   interleaved rounds: the draft's layers at each precision (linear in the sublayers kept), its head at each width,
   verify passes per chunk length. Predicted speedup = AR step time × tokens / cycle time (``simulate.predict``).
5. ``timing.measure``: the top self-drafts, the n-gram drafter and hybrid are compiled and timed end to end against
   AR (warm-up excluded, interleaved repeats, medians); the profile records those real numbers, the winner (adopted
   only when every round beats AR by 3%) and the best self-draft.

``optimize`` holds the GP, ``masks`` the encoding of masks as points and the starting points, ``run`` the whole
search, ``plot`` and ``device`` what goes into the profile's report.
"""

from jaxspec.costmodel import CostModel, measure_costs
from jaxspec.search.calibrate import Calibration, calibrate, fit_prompts
from jaxspec.search.masks import mask_to_x, starting_points, x_to_mask
from jaxspec.search.optimize import optimize, random_masks
from jaxspec.search.plot import plot
from jaxspec.search.proxy import Proxy
from jaxspec.search.run import SearchOptions, SearchResult, search
from jaxspec.search.simulate import Prediction, SimulatedRun, predict, simulate
from jaxspec.search.timing import Candidate, Timing, measure, robust_speedup

__all__ = ["Calibration", "Candidate", "CostModel", "Prediction", "Proxy", "SearchOptions", "SearchResult",
           "SimulatedRun", "Timing", "calibrate", "fit_prompts", "mask_to_x", "measure", "measure_costs", "optimize",
           "plot", "predict", "random_masks", "robust_speedup", "search", "simulate", "starting_points", "x_to_mask"]
