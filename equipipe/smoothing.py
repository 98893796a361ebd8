"""The study's smoothing for noisy training curves, and the "dip" read off a smoothed curve.

Variable-span exponential moving average (PAPER.md, "Smoothing"): at evaluation i, taken at
training step ``step_i``,

    span_i  = max(1, step_i / s)
    alpha_i = 2 / (span_i + 1)
    y_0     = x_0
    y_i     = alpha_i * x_i + (1 - alpha_i) * y_{i-1}

so early evaluations (step <= s) are kept raw (alpha = 1) and the averaging window grows in
proportion to the step, which matches log-spaced evaluation schedules. The study used
s = 1000 (Proteína curves, head deviation) and s = 100 (gradient-norm trajectory).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_S", "alphas", "dip", "ema"]

DEFAULT_S = 1000.0


def alphas(steps, s: float = DEFAULT_S) -> np.ndarray:
    """Per-evaluation EMA weights ``alpha_i = 2 / (max(1, step_i / s) + 1)``; shape of ``steps``."""
    if s is None or s <= 0:
        raise ValueError(f"smoothing scale s must be > 0, got {s!r}")
    span = np.maximum(1.0, np.asarray(steps, dtype=np.float64) / float(s))
    return 2.0 / (span + 1.0)


def ema(steps, values, s: float | None = DEFAULT_S, *, log: bool = False) -> np.ndarray:
    """Variable-span EMA of ``values`` (1-D) taken at increasing training ``steps``.

    ``s=None`` returns the values unchanged (as float64). ``log=True`` smooths log10 of the
    values and maps back (for quantities plotted on log axes; non-positive values become NaN).
    Non-finite values are skipped: the running average carries over them and their output
    is the running average so far (NaN before the first finite value).
    """
    steps = np.asarray(steps, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    if steps.ndim != 1 or steps.shape != x.shape:
        raise ValueError(
            f"steps and values must be 1-D of equal length: {steps.shape} vs {x.shape}"
        )
    if steps.size and np.any(np.diff(steps) < 0):
        raise ValueError("steps must be non-decreasing (sort the curve by step first)")
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), np.nan)
    if s is None:
        out = x.copy()
    else:
        a = alphas(steps, s)
        out = np.empty_like(x)
        acc = math.nan
        for i in range(x.size):
            xi = x[i]
            if math.isfinite(xi):
                acc = xi if not math.isfinite(acc) else a[i] * xi + (1.0 - a[i]) * acc
            out[i] = acc
    return np.power(10.0, out) if log else out


def dip(
    steps,
    pct,
    window: tuple[float | None, float | None] | None = None,
    s: float | None = DEFAULT_S,
) -> tuple[int, float]:
    """The "dip": ``(step, value)`` at the minimum of the smoothed curve within ``window``.

    The EMA runs over the whole curve (so points inside the window carry their history);
    the minimum is then taken over evaluations with ``lo <= step <= hi`` (``None`` = open).
    Returns the step (int) and the SMOOTHED value there. Ties go to the earliest step.
    Raises ``ValueError`` when no finite point lies in the window.
    """
    steps = np.asarray(steps, dtype=np.float64)
    pct = np.asarray(pct, dtype=np.float64)
    order = np.argsort(steps, kind="stable")
    steps, pct = steps[order], pct[order]
    smooth = ema(steps, pct, s)
    lo, hi = window if window is not None else (None, None)
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    inside = (steps >= lo) & (steps <= hi) & np.isfinite(smooth)
    if not inside.any():
        raise ValueError(f"no finite evaluation within the dip window [{lo}, {hi}]")
    idx = np.flatnonzero(inside)
    best = idx[int(np.argmin(smooth[idx]))]
    return int(steps[best]), float(smooth[best])
