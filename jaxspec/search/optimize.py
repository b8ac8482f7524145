"""Bayesian optimization (scikit-optimize Gaussian process) or random search over binary skip masks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def random_masks(rng: np.random.Generator, n_dims: int, n: int) -> np.ndarray:
    """``n`` random points: the number of skipped sublayers uniform in 1..n_dims/2, then which ones uniformly."""
    X = np.zeros((n, n_dims), np.int8)
    for row in X:
        row[rng.choice(n_dims, size=rng.integers(1, max(n_dims // 2, 1) + 1), replace=False)] = 1
    return X


def _neighbours(rng: np.random.Generator, X: np.ndarray, y: np.ndarray, n_random: int = 300) -> np.ndarray:
    """Acquisition candidates: every 1-flip of the 5 best points, 2–3-flips of them, and fresh random points."""
    n_dims = X.shape[1]
    best = X[np.argsort(y)[:5]]
    flips = [b ^ np.eye(n_dims, dtype=np.int8) for b in best]
    for b in best:
        for _ in range(60):
            c = b.copy()
            c[rng.choice(n_dims, size=rng.integers(2, 4), replace=False)] ^= 1
            flips.append(c[None])
    return np.unique(np.concatenate([*flips, random_masks(rng, n_dims, n_random)]), axis=0)


def optimize(objective: Callable[[np.ndarray], float], n_dims: int, budget: int, starts: Sequence[Sequence[int]],
             method: str = "gp", n_initial: int = 8, seed: int = 0, refit_every: int = 5) -> float:
    """Minimize ``objective`` over {0, 1}^n_dims in ``budget`` evaluations (starting points first); returns the
    seconds spent in the optimizer itself.

    ``gp``: after the starts and ``n_initial`` random points, a scikit-optimize Gaussian process (Matern 5/2 with
    one length scale per sublayer, Gaussian noise; hyperparameters refit every ``refit_every`` points) scores
    candidates by expected improvement (``skopt.acquisition.gaussian_ei``) and the best unevaluated one is
    evaluated next. The candidates are neighbours of the best points so far plus random sparse masks: skopt's own
    acquisition optimizer samples uniform points, which in 2^n_dims almost never land near the good, sparse masks.
    ``random``: the starts, then ``random_masks`` points.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from skopt.acquisition import gaussian_ei
    from skopt.learning import GaussianProcessRegressor
    from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    if method not in ("gp", "random"):
        raise ValueError(f"unknown search method {method!r}: gp or random")
    rng = np.random.default_rng(seed)
    X: list[np.ndarray] = []
    y: list[float] = []
    seen: set[bytes] = set()
    opt_s = 0.0
    queue = [np.asarray(s, np.int8) for s in starts]
    kernel = ConstantKernel(1.0, (0.01, 1000.0)) * Matern(np.ones(n_dims), [(0.01, 100.0)] * n_dims, nu=2.5) \
        + WhiteKernel(1e-2, (1e-6, 1e1))
    while len(y) < budget:
        t0 = time.perf_counter()
        if queue:
            x = queue.pop(0)
        elif method == "random" or len(y) < len(starts) + n_initial:
            x = random_masks(rng, n_dims, 1)[0]
        else:
            refit = (len(y) - len(starts) - n_initial) % refit_every == 0
            gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, noise="gaussian", n_restarts_optimizer=0,
                                          optimizer="fmin_l_bfgs_b" if refit else None, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gp.fit(np.asarray(X, float), np.asarray(y))
            if refit:  # keep the fitted hyperparameters, noise included, for the next fits
                kernel = gp.kernel_.k1 + WhiteKernel(max(gp.noise_ or 0.0, 1e-6), (1e-6, 1e1))
            cands = _neighbours(rng, np.asarray(X), np.asarray(y))
            cands = cands[[c.tobytes() not in seen for c in cands]]
            ei = gaussian_ei(cands.astype(float), gp, y_opt=float(np.min(y)))
            x = cands[int(np.argmax(ei))]
        opt_s += time.perf_counter() - t0
        if x.tobytes() in seen:
            continue
        seen.add(x.tobytes())
        X.append(x)
        y.append(objective(x))
    return opt_s
