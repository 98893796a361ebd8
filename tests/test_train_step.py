"""One training step: the GPU bench times the very step the training loop takes."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equipipe.train import Trainer
from equipipe.train_step import EMA, TrainConfig, make_optimizer, step_generator
from tests.test_train import spec, tiny_store  # noqa: F401 - the session fixture

ROOT = Path(__file__).resolve().parent.parent


def test_train_step_module_does_not_import_polars():
    code = "import sys, equipipe.train_step; print(sorted(m for m in sys.modules if 'polars' in m))"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_step_generator_depends_only_on_seed_step_and_stream():
    draw = lambda *a: torch.rand(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 6, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 5, 2))
    assert not torch.equal(draw(0, 5, 1), draw(1, 5, 1))


def test_bench_step_and_trainer_step_give_bitwise_identical_weights(tiny_store, tmp_path):  # noqa: F811
    """3 steps on one pinned batch: 2 accumulated micro-batches, rotation augmentation with
    probability 0.5, gradient clipping, AdamW and the EMA; the weights agree bit for bit."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    s = spec(steps=3, accumulate=2, augment_prob=0.5, grad_clip=0.5, ema=0.9, lr=3e-3)
    tr = Trainer(s, tiny_store["store"], tiny_store["split"], tiny_store["subset"], tmp_path)
    examples = tr.data.train_examples(0)
    tr.data.train_examples = lambda _i: examples  # the same batch at every (micro-)step
    init = copy.deepcopy(tr.model.state_dict())

    # the bench's step, as check_train builds it, on a copy of the initial weights
    ctx = gpu_check.Ctx(torch, tr.device, gpu_check.QUICK, autocast=False)
    batch = {k: v.to(tr.device) for k, v in tr.task.collate(examples).items()}
    w = gpu_check.Workload("escaip tiny", "", tr.task, copy.deepcopy(tr.model), batch, tr.tcfg)
    w.model.train()
    opt = make_optimizer(w.model.parameters(), w.recipe)
    ema = EMA(w.model, w.recipe.ema, w.recipe.ema_warmup)
    bench_step = gpu_check.make_step(ctx, w, w.model, opt, ema)

    for i in range(3):
        tr.model.train()
        tr.train_step()
        tr.step += 1
        bench_step(i)

    assert tr.ema is not None and ema.updates == tr.ema.updates == 3
    trainer_weights, bench_weights = tr.model.state_dict(), w.model.state_dict()
    for name, value in trainer_weights.items():
        assert torch.equal(value, bench_weights[name]), name
    for name, value in tr.ema.model.state_dict().items():
        assert torch.equal(value, ema.model.state_dict()[name]), name
    # not vacuous: the weights moved, and the EMA differs from them
    assert any(not torch.equal(v, init[n]) for n, v in trainer_weights.items())
    assert any(not torch.equal(v, trainer_weights[n]) for n, v in ema.model.state_dict().items())


def test_adam_eps_zero_survives_gradients_whose_square_underflows():
    """eps 0 (VoxMol's AdamW): |g| = 2.6e-23 has g^2 = 0 in float32; the element must move by
    less than lr, not by lr * g / eps (1e12 in one step with eps = 1.2e-38)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([p], TrainConfig(optimizer="adamw", lr=1e-3, eps=0.0, betas=(0.99, 0.999)))
    p.grad = torch.tensor([2.6e-23, 0.0, -1e-6])
    opt.step()
    assert torch.isfinite(p).all()
    assert abs(float(p[0]) - 1.0) < 1e-3 and float(p[1]) == 1.0
    assert float(p[2]) == pytest.approx(1.001, abs=1e-6)  # ordinary gradients: eps 0's lr step
