"""Power-law fits on log-log axes: the one fitting routine of the project.

Used for the efficiency gap's α (loss against compute, :mod:`equipipe.efficiency`) and for the
decay rates of the loss parts during training. One routine, so the fit window and the interval
method are stated the same way wherever a slope is reported.

Method: ordinary least squares of log10 y on log10 x over the points inside the window;
``se`` is the residual standard error of the slope; ``lo``/``hi`` are the 16-84 % percentiles of
a pairs bootstrap over the fitted points. Points of one training curve are autocorrelated, so
both intervals understate the run-to-run spread (compare across seeds where there are several).
"""

from __future__ import annotations

import math

import numpy as np

Z1 = (15.865, 84.135)  # percentiles of a ±1σ interval
INTERVAL_METHOD = (
    "least squares on log10-log10; ± residual SE of the slope; [16-84 % pairs bootstrap]"
)


def power_law_fit(compute, loss, n_boot: int = 1000, seed: int = 0) -> dict:
    """Fit log10 L = a - α log10 C by least squares.

    Returns:
        {"alpha", "se" (residual SE of the slope), "lo", "hi" (16-84 % pairs bootstrap),
        "intercept", "n", "boot" (bootstrap α draws, array)}; NaNs with fewer than 3 points.
    """
    c, y = np.asarray(compute, float), np.asarray(loss, float)
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0) & (y > 0)
    x, y = np.log10(c[ok]), np.log10(y[ok])
    n = int(x.size)
    nan = {"alpha": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan}
    if n < 3 or np.ptp(x) == 0:
        return {**nan, "intercept": math.nan, "n": n, "boot": np.array([])}
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    sxx = float(((x - x.mean()) ** 2).sum())
    se = math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if np.ptp(x[i]) > 0:
            boot.append(-np.polyfit(x[i], y[i], 1)[0])
    boot = np.asarray(boot)
    lo, hi = np.percentile(boot, Z1) if boot.size else (math.nan, math.nan)
    return {
        "alpha": float(-slope),
        "se": se,
        "lo": float(lo),
        "hi": float(hi),
        "intercept": float(intercept),
        "n": n,
        "boot": boot,
    }
