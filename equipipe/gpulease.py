"""Lease one GPU of a multi-GPU workstation for a job, before torch initialises CUDA.

Snakemake counts GPUs (``--resources gpu=N``) but does not say which one a job gets. Each
training job therefore takes a lock file ``<lock_dir>/gpu<i>.lock`` with ``flock`` (released by
the kernel when the process dies, so a SIGKILLed job never leaks its GPU) and sets
``CUDA_VISIBLE_DEVICES=i``. Under SLURM (``SLURM_JOB_ID`` set) the scheduler's assignment is used.
This module must not import torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def count_gpus() -> int:
    """GPUs on this machine: ``EQUIPIPE_GPU_SLOTS`` if set (tests, overrides), else nvidia-smi."""
    if os.environ.get("EQUIPIPE_GPU_SLOTS"):
        return int(os.environ["EQUIPIPE_GPU_SLOTS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@contextlib.contextmanager
def gpu_slot(lock_dir: Path, n_slots: int, poll_s: float = 0.2) -> Iterator[int]:
    """Hold one free slot in [0, n_slots) for the duration of the block (blocks until free)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(n_slots):
            f = open(lock_dir / f"gpu{i}.lock", "a+")  # noqa: SIM115 - held for the block
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
                yield i
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(poll_s)


@contextlib.contextmanager
def lease_gpu(device: str, lock_dir: Path | None) -> Iterator[int | None]:
    """Set CUDA_VISIBLE_DEVICES to a leased GPU when that is ours to decide; else do nothing."""
    if device == "cpu" or os.environ.get("SLURM_JOB_ID") or lock_dir is None:
        yield None
        return
    n = count_gpus()
    if n == 0:
        yield None
        return
    with gpu_slot(Path(lock_dir), n) as slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
        yield slot
