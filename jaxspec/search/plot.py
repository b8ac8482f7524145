"""A PNG of a search from its profile (needs matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxspec.config import SkipMask
from jaxspec.profile import Profile


def plot(profile: Profile, path: str | Path) -> str:
    """PNG of a search from its profile (predicted speedup per evaluation with the measured ones as stars;
    predicted acceptance vs skipped sublayers); returns a note. Needs matplotlib (the optional ``plot`` extra);
    without it the plot is skipped and the note says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'jaxspec[plot]')"
    info = profile.info
    traces = {info["method"]: info["trace"]}
    if "bench" in info:
        traces[info["bench"]["other_method"]] = info["bench"]["other_trace"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, tr in traces.items():
        s = [t["predicted_speedup"] for t in tr]
        ax1.plot(s, ".", alpha=0.5, label=f"{name}: predicted")
        ax1.plot(np.maximum.accumulate([v if t["skipped"] else 0.0 for v, t in zip(s, tr, strict=True)]), "-",
                 label=f"{name}: best so far, >= 1 sublayer skipped")
        ax2.plot([t["skipped"] for t in tr], [t["acceptance"] for t in tr], ".", alpha=0.6, label=name)
    for c in info["candidates"][1:]:
        if c.get("drafter", "skip") != "skip":  # n-gram and hybrid: horizontal lines, not search points
            ax1.axhline(c["speedup"], ls="--", lw=0.8, color="tab:green" if c["drafter"] == "ngram" else "tab:red",
                        label=f"{c['label']}: measured")
            continue
        idx = next((t["i"] for t in info["trace"] if SkipMask.from_json(t) == SkipMask.from_json(c["mask"])), None)
        if idx is not None:
            ax1.plot([idx], [c["speedup"]], "k*", ms=10)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xlabel="evaluation", ylabel="speedup over AR (stars: measured)", title="search")
    ax2.set(xlabel="skipped sublayers", ylabel="predicted acceptance rate", title="acceptance vs skipping")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
