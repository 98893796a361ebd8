"""Lease GPUs of a multi-GPU workstation for a job, before torch initialises CUDA.

Snakemake counts GPUs (``--resources gpu=N``) but does not say which one a job gets. Each
training job therefore takes lock files ``<lock_dir>/gpu<id>.lock`` with ``flock`` (released by
the kernel when the last process holding them dies, so a SIGKILLed job never leaks its GPU)
and sets ``CUDA_VISIBLE_DEVICES`` to the leased ids. A job that needs several GPUs takes them
all at once or none (no hold-and-wait, so two such jobs cannot deadlock). Waiting jobs poll
every ``poll_s`` (50 ms): a freed GPU is taken within about that time.

Nothing is leased under SLURM (``SLURM_JOB_ID`` set: the scheduler's assignment is used),
inside a torchrun worker (``LOCAL_RANK`` set: the launcher's parent holds the lease and the
workers inherit its ``CUDA_VISIBLE_DEVICES``), for ``device="cpu"``, without a lock folder, or
on a machine without GPUs. The GPUs considered are ``EQUIPIPE_GPU_SLOTS`` fake ones (tests),
else the entries of a ``CUDA_VISIBLE_DEVICES`` set by the user, else every GPU nvidia-smi
lists. The lock files stay open across ``exec`` (inheritable descriptors), so a job that
leases GPUs and then replaces itself by ``torchrun`` keeps them. This module must not import
torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def count_gpus() -> int:
    """GPUs on this machine: ``EQUIPIPE_GPU_SLOTS`` if set (tests, overrides), else nvidia-smi."""
    if os.environ.get("EQUIPIPE_GPU_SLOTS"):
        return int(os.environ["EQUIPIPE_GPU_SLOTS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def candidate_devices() -> list[str]:
    """The GPU ids a lease chooses from (see the module docstring for the order of sources)."""
    if os.environ.get("EQUIPIPE_GPU_SLOTS"):
        return [str(i) for i in range(int(os.environ["EQUIPIPE_GPU_SLOTS"]))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(count_gpus())]


def _lock_name(device: str) -> str:
    return "gpu" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _try_lock(path: Path) -> IO[str] | None:
    f = open(path, "a+")  # held for the lease, closed on release
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    os.set_inheritable(f.fileno(), True)  # survives exec (e.g. into torchrun)
    return f


def _release(files: list[IO[str]]) -> None:
    for f in files:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextlib.contextmanager
def gpu_slots(
    lock_dir: Path, devices: list[str], count: int = 1, poll_s: float = 0.05
) -> Iterator[list[str]]:
    """Hold ``count`` free devices of ``devices`` for the block (blocks until they are free).

    All-or-nothing: a try that finds fewer than ``count`` free releases what it took, so jobs
    asking for several GPUs never hold some while waiting for others.
    """
    if count < 1 or count > len(devices):
        raise ValueError(
            f"a job asks for {count} GPU(s) but {len(devices)} can be leased here "
            f"({', '.join(devices) or 'none'}); lower the experiment's resources.gpu"
        )
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        held: list[tuple[str, IO[str]]] = []
        for d in devices:
            f = _try_lock(lock_dir / _lock_name(d))
            if f is not None:
                held.append((d, f))
                if len(held) == count:
                    break
        if len(held) == count:
            break
        _release([f for _, f in held])
        time.sleep(poll_s)
    try:
        for _, f in held:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        yield [d for d, _ in held]
    finally:
        _release([f for _, f in held])


@contextlib.contextmanager
def gpu_slot(lock_dir: Path, n_slots: int, poll_s: float = 0.05) -> Iterator[int]:
    """Hold one free slot in [0, n_slots) for the block (blocks until one is free)."""
    with gpu_slots(lock_dir, [str(i) for i in range(n_slots)], 1, poll_s) as (slot,):
        yield int(slot)


def lease_needed(device: str, lock_dir: Path | None) -> bool:
    """Whether this process should lease GPUs itself (see the module docstring)."""
    return not (
        device == "cpu"
        or lock_dir is None
        or os.environ.get("SLURM_JOB_ID")
        or os.environ.get("LOCAL_RANK") is not None
    )


@contextlib.contextmanager
def lease_gpu(device: str, lock_dir: Path | None, count: int = 1) -> Iterator[list[str] | None]:
    """Lease ``count`` GPUs and set CUDA_VISIBLE_DEVICES when that is ours to decide.

    Yields the leased device ids, or None when nothing was leased (SLURM, torchrun worker,
    CPU, no lock folder, no GPUs). The previous CUDA_VISIBLE_DEVICES is restored afterwards.
    """
    if not lease_needed(device, lock_dir):
        yield None
        return
    devices = candidate_devices()
    if not devices:
        yield None
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with gpu_slots(Path(lock_dir), devices, count) as leased:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
        try:
            yield leased
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
