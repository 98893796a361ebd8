"""Where a training job's wall time goes: accumulated seconds per named part.

``Timer`` sums ``time.perf_counter`` intervals by name (``with timer("eval_decomposition"):``).
The training loop times its evaluation parts, I/O and set-up with it; ``run.json`` records the
totals next to ``train_seconds`` (``equipipe.train.run_info``) and ``bench/embedded_budget.py``
prints them per job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

# The evaluation's parts, in the order bench/embedded_budget.py prints them.
EVAL_PARTS = (
    "decomposition",  # the K rotated forwards of every view and their decompositions
    "gradient_norms",  # the backward passes of the gradient-norm ratio
    "accuracy",  # the unrotated (and EMA) forward of each view and its accuracy
    "spectrum",  # the per-irrep spectra of the recorded outputs and hidden features
    "floor",  # the voxel task's interpolation floor (step 0 only)
    "logging",  # metric rows of the evaluation
)


class Timer:
    """Accumulated wall seconds per name; ``seconds`` is a plain dict (JSON-able)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def get(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


def process_seconds() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere).

    Covers what a job spends before the training loop can time anything: interpreter start and
    imports.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None
