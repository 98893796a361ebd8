"""One training step, the same for the training loop and the GPU benchmark.

:func:`train_step` is the whole optimiser step that :class:`equipipe.train.Trainer` takes and
``bench/gpu_check.py`` times, readable top to bottom: set the step's learning rate; for each of
``accumulate`` micro-batches draw the step's generator, rotate examples by Haar rotations
with probability ``augment_prob``, apply the task's own augmentation, then ``prepare_train``,
forward and loss under bf16 autocast, and backward (the DDP all-reduce on the last micro-batch
only); then clip the gradient norm, step the optimiser and update the EMA weights.

Its only randomness is ``step_generator(seed, step, micro + 1000 * rank)``, so a step is a pure
function of (weights, optimiser and EMA state, batches, seed, step): the benchmark's step and
the loop's step give the same weights on the same batches, and a resumed run repeats an
uninterrupted one.

The recipe (:class:`TrainConfig`), the learning-rate schedule, the optimiser and the EMA live
here too. This module imports torch, numpy and polars-free parts of ``equipipe`` only: the
lent GPU machine has no polars (``bench/gpu_check.py`` blocks it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from equipipe import distributed as ddp
from equipipe.so3 import haar_rotations
from equipipe.tasks.base import Batch, Task

# micro-batch index -> (collated batch on the model's device, its DDP loss weight; 1.0 alone)
MicroBatches = Callable[[int], tuple[Batch, float]]


@dataclass
class TrainConfig:
    """Training recipe (the ``train`` block of a task or experiment in the config)."""

    steps: int = 1000
    batch_size: int = 16
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    lr_floor: float = 0.5  # cosine floor as a fraction of the peak lr
    grad_clip: float | None = None
    ema: float | None = 0.999
    ema_warmup: bool = True
    augment_prob: float = 0.0
    accumulate: int = 1
    threads: int = 1
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False
    sample_per_cluster: bool = False  # one random example per store key each epoch (Proteina)
    checkpoint_every: int = 200
    analysis_step: int = 500
    keep_steps: list[int] = field(default_factory=list)  # named checkpoints/step<N>.pt
    tensorboard: bool = False  # TensorBoard event files next to metrics.parquet

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_keys(cls, d, "train")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def check_keys(config_class: type, d: dict[str, Any], block: str) -> None:
    """ValueError naming the keys of ``d`` that are not fields of the dataclass, and the
    allowed ones (``block``: the config block, for the message)."""
    known = {f.name for f in fields(config_class)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {block} keys {sorted(unknown)}; allowed: {sorted(known)}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step``: linear warm-up, then constant or cosine to the floor."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        floor = cfg.lr_floor * cfg.lr
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"schedule={cfg.schedule!r}; allowed: 'constant', 'cosine'")


ADAM_EPS_FLOOR = 1e-16


def _adam_eps(eps: float) -> float:
    """``eps: 0`` (VoxMol's AdamW) as ``ADAM_EPS_FLOOR`` = 1e-16 instead of 0.

    With eps exactly 0, torch divides 0/0 for every element whose gradient has been exactly 0
    so far (a NaN parameter at step 1, seen on the miniature paper grid). With the smallest
    normal float (the earlier floor, 1.2e-38) an element whose gradient is tiny but not zero
    still blows up: for |g| below ~1e-21, g^2 underflows to 0 in float32 and the update is
    lr * g / 1.2e-38 (|g| = 2.6e-23 gave a weight of 1e12 in one step). With 1e-16 such an
    element moves by at most a small fraction of lr, and every gradient above ~1e-12 gets eps
    0's update to within 1e-4 relative.
    """
    return eps if eps > 0 else ADAM_EPS_FLOOR


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser (AdamW, Adam or SGD) over ``params``."""
    adam = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}.get(cfg.optimizer)
    if adam is not None:
        return adam(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=_adam_eps(cfg.eps),
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optimizer={cfg.optimizer!r}; allowed: 'adamw', 'adam', 'sgd'")


class EMA:
    """Exponential moving average of the weights, with the usual warm-up (1+n)/(10+n)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                e.copy_(p)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): resumable randomness."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % (2**62))


def augment_rotations(task: Task, batch: Batch, prob: float, generator: torch.Generator) -> Batch:
    """Rotate each example by a Haar rotation with probability ``prob`` (identity otherwise)."""
    B = task.num_examples(batch)
    R = haar_rotations(B, generator)
    keep = torch.rand(B, generator=generator) >= prob
    R[keep] = torch.eye(3)
    device = next(iter(batch.values())).device
    return task.rotate(batch, R.to(device))


class NonFiniteLoss(FloatingPointError):
    """A micro-batch's training loss was NaN or infinite (every DDP rank raises together)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite training loss at step {step}")
        self.step = step


def train_step(
    model: nn.Module,
    task: Task,
    opt: torch.optim.Optimizer,
    ema: EMA | None,
    cfg: TrainConfig,
    step: int,
    seed: int,
    micro_batches: MicroBatches,
    *,
    forward_model: nn.Module | None = None,
    autocast: bool | None = None,
    rank: int = 0,
) -> float:
    """Take optimiser step ``step`` (0-based) on ``cfg.accumulate`` micro-batches.

    Args:
        model: the unwrapped module (its parameters are clipped, stepped and averaged).
        forward_model: what runs the forward (the DDP and/or torch.compile wrapper of
            ``model``); ``model`` when None.
        micro_batches: ``micro_batches(i)`` gives micro-batch ``i``'s collated batch on the
            device and its DDP loss weight (``equipipe.distributed.local_weight``; 1.0 alone).
        autocast: bf16 autocast on the model's device type; None: ``cfg.bf16`` on CUDA only
            (the benchmark forces it on the CPU to catch dtype mismatches).
        rank: the DDP rank, whose generator stream is ``micro + 1000 * rank``.

    Returns the global batch's mean loss (summed over micro-batches, each divided by
    ``cfg.accumulate``). Raises :class:`NonFiniteLoss` before any backward of a NaN/inf loss.
    """
    fwd = model if forward_model is None else forward_model
    device_type = next(model.parameters()).device.type
    use_bf16 = (cfg.bf16 and device_type == "cuda") if autocast is None else autocast
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(cfg.accumulate):
        gen = step_generator(seed, step, micro + 1000 * rank)
        batch, weight = micro_batches(micro)
        if cfg.augment_prob > 0:
            batch = augment_rotations(task, batch, cfg.augment_prob, gen)
        batch = task.augment(batch, gen)
        last = micro == cfg.accumulate - 1
        with ddp.no_sync(fwd, sync=last):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
                batch = task.prepare_train(fwd, batch, gen)
                pred = task.predict(fwd, batch)
                loss = task.loss(pred, batch) * weight / cfg.accumulate
            # every rank stops together (a lone rank raising would hang the others)
            if ddp.agree_max(int(not torch.isfinite(loss))):
                raise NonFiniteLoss(step)
            loss.backward()
        total += float(ddp.all_reduce_mean(loss.detach()))  # the global batch's mean loss
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if ema is not None:
        ema.update(model)
    return total
