"""Crash-safe checkpoint files: one atomic write, every random state, a test-only crash hook.

A training checkpoint is ONE file holding the model, optimiser, EMA, the metric rows logged up
to its step and every random state the loop draws from. It is written to ``<name>.tmp``,
flushed and fsynced, then renamed over the old file (and the folder fsynced), so a kill at any
instant leaves either the previous checkpoint or the new one, never a mixture and never a
half-written file that a resume would have to read.

``EQUIPIPE_CRASH_AT=<point>[@<step>]`` (tests only) ends the process with ``os._exit`` at the
named point of :func:`atomic_save` (at the given step, or the first time the point is reached),
so a test can kill a run at each exact instant between "metrics logged" and "checkpoint in
place" without relying on timing. The points, in order, are :data:`CRASH_POINTS`.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CRASH_ENV = "EQUIPIPE_CRASH_AT"
CRASH_EXIT = 70
CRASH_POINTS = (
    "before_write",  # rows of this step logged in memory, nothing written yet
    "mid_write",  # half of the temporary file written (a kill during the write)
    "before_rename",  # temporary file complete and fsynced, old checkpoint still in place
    "after_rename",  # new checkpoint in place (the folder entry not yet fsynced)
)


def crash_point(name: str, step: int) -> bool:
    """True when ``EQUIPIPE_CRASH_AT`` names this point (and this step, if it gives one)."""
    want = os.environ.get(CRASH_ENV, "")
    if not want:
        return False
    point, _, at = want.partition("@")
    if point not in CRASH_POINTS:
        raise ValueError(f"{CRASH_ENV}={want!r}: unknown point; allowed: {', '.join(CRASH_POINTS)}")
    return point == name and (not at or int(at) == step)


def _crash(name: str, step: int) -> None:
    if crash_point(name, step):
        os._exit(CRASH_EXIT)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path, step: int = -1) -> None:
    """``torch.save(obj)`` to ``path`` as one atomic unit (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    _crash("before_write", step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if crash_point("mid_write", step):
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os._exit(CRASH_EXIT)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _crash("before_rename", step)
    os.replace(tmp, path)
    _crash("after_rename", step)
    _fsync_dir(path.parent)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every process-global random state a training loop may draw from (torch, CUDA, numpy,
    Python), in types that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def checkpoint_step(path: Path) -> int | None:
    """Step of the checkpoint at ``path`` (None when there is none yet)."""
    if not Path(path).exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
