"""Data-parallel training (DDP through torchrun) for jobs with ``gpu > 1``; no-ops otherwise.

A training job that asks for G > 1 GPUs runs G processes started by ``torchrun --standalone``
(one node; ``exec_torchrun``). Each process calls ``init_from_env()``, which reads the
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and returns
``(rank, world, local_rank)``; without them it returns ``(0, 1, 0)`` and every function here
is the identity, so the single-process loop needs no branches.

Data: every rank computes the SAME global batch (the training order is a pure function of
seed and step) and keeps its contiguous block ``shard(rows, rank, world)``, so concatenating
the shards in rank order gives the single-process batch. DDP averages gradients over ranks;
that equals the gradient of the union batch's mean loss when every rank's loss is a mean over
its shard and is multiplied by ``local_weight(n_local, n_global, world)`` (1 when the batch
divides evenly). Losses that average over atoms or residues instead of examples are then
exact only up to the shards' different atom counts.

Evaluation, checkpoints and output files are the main rank's job (``is_main()``); the others
wait in ``barrier()`` (the process group's timeout is 2 h, EQUIPIPE_DDP_TIMEOUT_S to change,
so a long evaluation on rank 0 does not time the others out). A stop signal (SIGTERM) reaches
every rank at slightly different steps, so the loop asks ``agree_max(signal_or_0)`` once per
step and all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_launcher() -> bool:
    """True inside a process started by torchrun (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """The process that evaluates, checkpoints and writes outputs (rank 0)."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group torchrun described in the environment; (0, 1, 0) without one.

    Backend: ``nccl`` when CUDA is available (and the device is set to ``cuda:local_rank``),
    else ``gloo``. Idempotent.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or not under_launcher():
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    if not is_active():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("EQUIPIPE_DDP_TIMEOUT_S", 7200)))
        dist.init_process_group(
            backend or ("nccl" if use_cuda else "gloo"),
            rank=int(os.environ["RANK"]),
            world_size=world_size,
            timeout=timeout,
        )
    return dist.get_rank(), dist.get_world_size(), local_rank


def device_for(local_rank: int) -> torch.device:
    """``cuda:local_rank`` when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    if is_active():
        dist.destroy_process_group()


def wrap(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (already on its device) when world > 1.

    Keep the unwrapped module for state_dict, EMA, evaluation and attribute access
    (``unwrap``); use the wrapper only for the training forward (then torch.compile it).
    """
    if world() == 1:
        return model
    p = next(model.parameters())
    device_ids = [p.device.index] if p.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on gradient-accumulation micro-steps (``sync=False``)."""
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if sync or not isinstance(inner, nn.parallel.DistributedDataParallel):
        yield
    else:
        with inner.no_sync():
            yield


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block of n items; sizes differ by at most one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(rows: Sequence[T], rank: int, world: int) -> Sequence[T]:
    """Rank's contiguous block of the global batch; the blocks in rank order are ``rows``.

    Works on lists, numpy arrays and tensors (slicing). A rank can get an empty block when the
    batch is smaller than the world; the loop should then skip its loss (weight 0).
    """
    start, stop = shard_bounds(len(rows), rank, world)
    return rows[start:stop]


def local_weight(n_local: int, n_global: int, world: int) -> float:
    """Factor on a rank's mean loss so that DDP's gradient average equals the union mean."""
    return n_local * world / n_global if n_global else 0.0


def all_reduce_mean(x: Tensor | float) -> Tensor | float:
    """Mean over ranks of a tensor (returns a new tensor) or a float; identity when world == 1."""
    if world() == 1:
        return x
    is_tensor = isinstance(x, Tensor)
    t = x.detach().clone() if is_tensor else torch.tensor(float(x), dtype=torch.float64)
    t = _to_comm_device(t)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / world()
    return t.to(x.device) if is_tensor else float(t)


def agree_max(value: int) -> int:
    """Max of an int over ranks (e.g. a pending stop signal, 0 for none); identity alone."""
    if world() == 1:
        return int(value)
    t = _to_comm_device(torch.tensor(int(value), dtype=torch.int64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects); identity alone."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _to_comm_device(t: Tensor) -> Tensor:
    if dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.cpu()


def torchrun_argv(nproc: int, args: Sequence[str], module: str = "equipipe.cli") -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m module args...``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={int(nproc)}", "-m", module, *args,
    ]  # fmt: skip


def exec_torchrun(nproc: int, args: Sequence[str], module: str = "equipipe.cli") -> NoReturn:
    """Replace this process by torchrun running ``nproc`` copies of ``python -m module args``.

    exec (not a child process): signals from Snakemake or SLURM reach torchrun directly, which
    forwards them to the ranks, and GPU leases (inheritable lock descriptors) stay held.
    """
    argv = torchrun_argv(nproc, args, module)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
