"""Flow-matching task: batches, group action, time law, loss, views, accuracy, equivariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from equipipe.so3 import haar_rotations
from equipipe.tasks import make_task
from equipipe.tasks.base import Task
from equipipe.tasks.flowmatching import DEFAULTS, FlowMatchingTask


def _examples(lengths=(12, 20, 7), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        # a random walk with 0.38 nm steps, like a C-alpha trace
        steps = rng.normal(size=(n, 3))
        steps *= 0.38 / np.linalg.norm(steps, axis=1, keepdims=True)
        pos = np.cumsum(steps, axis=0) + rng.normal(size=3)  # deliberately off-centre
        out.append(
            {
                "pos": pos.astype(np.float32),
                "residue": rng.integers(0, 20, n).astype(np.int8),
                "chain_break": np.zeros(n, dtype=bool),
            }
        )
    return out


class EquivariantToy(nn.Module):
    """v_i = a(t) x_i + sum_j phi(|x_i - x_j|) (x_i - x_j) + b x_sc,i: exactly equivariant."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.7))
        self.w = nn.Parameter(torch.tensor([0.9, -0.4]))
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x_t, t, mask, x_sc=None, chain_break=None):
        del chain_break  # the flow task's model signature
        m = mask.to(x_t.dtype)
        d = x_t[:, :, None] - x_t[:, None]  # (B, L, L, 3)
        r = d.norm(dim=-1, keepdim=True)
        phi = torch.tanh(self.w[0] * r) * self.w[1] * (m[:, :, None] * m[:, None, :])[..., None]
        v = self.a * (1 - t)[:, None, None] * x_t + (phi * d).sum(2)
        if x_sc is not None:
            v = v + self.b * x_sc
        return v * m[..., None]


@pytest.fixture
def task():
    return FlowMatchingTask({})


def test_registry_protocol_and_config(task):
    assert isinstance(make_task("flowmatching", {}), FlowMatchingTask)
    assert isinstance(task, Task)
    assert task.fields == ("x1",) and task.units == {"x1": "nm^2"} and task.primary_field == "x1"
    assert task.cfg["eval_t"] == [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99] == DEFAULTS["eval_t"]
    with pytest.raises(ValueError, match="eval_t"):
        FlowMatchingTask({"eval_t": [1.0]})
    with pytest.raises(ValueError, match="self_cond_prob"):
        FlowMatchingTask({"self_cond_prob": 2})
    model = task.build_model("tiny")
    assert model.decoder.linear.out_features == 3


def test_collate_pads_and_centres(task):
    b = task.collate(_examples())
    assert b["x1"].shape == (3, 20, 3) and b["mask"].sum(1).tolist() == [12, 20, 7]
    assert b["residue"].dtype == torch.int64 and b["chain_break"].dtype == torch.bool
    assert torch.equal(b["x1"][~b["mask"]], torch.zeros(21, 3))
    centre = b["x1"].sum(1) / b["mask"].sum(1, keepdim=True)
    torch.testing.assert_close(centre, torch.zeros(3, 3), atol=1e-6, rtol=0)
    assert task.fit(_examples()) == {"n_train": 3, "mean_length": 13.0}


def test_time_law_mixture(task):
    t = task.sample_t(200_000, torch.Generator().manual_seed(0)).double()
    assert 0 <= t.min() and t.max() <= 1
    # 0.98 Beta(1.9, 1) + 0.02 U(0, 1): mean 0.98 * 1.9 / 2.9 + 0.02 * 0.5
    assert abs(t.mean().item() - (0.98 * 1.9 / 2.9 + 0.01)) < 3e-3
    # CDF at 0.5: 0.98 * 0.5^1.9 + 0.02 * 0.5
    assert abs((t < 0.5).double().mean().item() - (0.98 * 0.5**1.9 + 0.01)) < 4e-3


def test_rotate_canonicalize_repeat(task):
    b = task.prepare_train(
        EquivariantToy(), task.collate(_examples()), torch.Generator().manual_seed(1)
    )
    R = haar_rotations(3, torch.Generator().manual_seed(2))
    rb = task.rotate(b, R)
    for key in ("x1", "x0"):
        torch.testing.assert_close(rb[key], torch.einsum("bij,blj->bli", R, b[key]))
    torch.testing.assert_close(
        task.interpolate(rb), torch.einsum("bij,blj->bli", R, task.interpolate(b))
    )
    back = task.canonicalize({"x1": rb["x1"]}, R)
    torch.testing.assert_close(back["x1"], b["x1"], atol=1e-6, rtol=0)
    big = task.repeat(b, 4)
    assert task.num_examples(big) == 12
    for key, value in b.items():
        torch.testing.assert_close(big[key].reshape(4, *value.shape)[2], value)  # copy-major
    m = task.element_mask(b)["x1"]
    assert m.shape == b["x1"].shape and m.sum().item() == 3 * 39


def test_loss_matches_definition_and_masks_padding(task):
    b = task.prepare_train(
        EquivariantToy(), task.collate(_examples()), torch.Generator().manual_seed(3)
    )
    b["t"] = torch.tensor([0.1, 0.5, 0.9])
    pred = task.predict(EquivariantToy(), b)
    n = b["mask"].sum(1).double()
    sq = ((b["x1"] - pred["x1"]).double() ** 2).sum((1, 2))
    want = (sq / (3 * n) / ((1 - b["t"].double()) ** 2 + 1e-5)).mean()
    torch.testing.assert_close(task.loss(pred, b).double(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(task.loss({"x1": pred["x1"]}, b).double(), want, rtol=1e-4, atol=0)
    assert torch.equal(pred["x1"][~b["mask"]], torch.zeros_like(pred["x1"][~b["mask"]]))
    b["t"] = torch.ones(3)  # at t = 1 x1_hat = x_t = x1: zero loss, no overflow
    assert task.loss(task.predict(EquivariantToy(), b), b).item() == 0.0


def test_prepare_train_self_conditioning(task):
    b = task.collate(_examples())
    on = FlowMatchingTask({"self_cond_prob": 1.0})
    off = FlowMatchingTask({"self_cond_prob": 0.0})
    model = on.build_model("tiny")
    b_on = on.prepare_train(model, b, torch.Generator().manual_seed(4))
    assert "x_sc" in b_on and not b_on["x_sc"].requires_grad
    assert torch.equal(b_on["x_sc"][~b["mask"]], torch.zeros(21, 3))
    b_off = off.prepare_train(model, b, torch.Generator().manual_seed(4))
    assert "x_sc" not in b_off
    torch.testing.assert_close(b_on["t"], b_off["t"])  # t and x0 drawn before the coin flip
    torch.testing.assert_close(b_on["x0"], b_off["x0"])
    again = task.prepare_train(model, b, torch.Generator().manual_seed(4))
    torch.testing.assert_close(again["x0"], b_off["x0"])
    x0 = b_off["x0"]
    torch.testing.assert_close(x0.sum(1), torch.zeros(3, 3), atol=1e-5, rtol=0)  # centred


def test_eval_views_fix_noise_per_example(task):
    b = task.collate(_examples())
    views = task.eval_views(b, torch.Generator().manual_seed(5))
    assert [lab["t"] for lab, _ in views] == task.cfg["eval_t"]
    x0 = views[0][1]["x0"]
    for lab, v in views:
        assert torch.equal(v["x0"], x0) and torch.all(v["t"] == lab["t"]) and "x_sc" not in v
    again = task.eval_views(b, torch.Generator().manual_seed(5))
    assert torch.equal(again[3][1]["x0"], x0)
    assert torch.equal(x0[~b["mask"]], torch.zeros(21, 3))
    # each example's noise depends only on its own draws: a batch of just the first chain
    first = task.eval_views(task.collate(_examples()[:1]), torch.Generator().manual_seed(5))
    torch.testing.assert_close(first[0][1]["x0"][0], x0[0, :12])


def test_accuracy_is_centred_rmsd_in_nm(task):
    b = task.eval_views(task.collate(_examples()), torch.Generator().manual_seed(6))[2][1]
    assert task.accuracy({"x1": b["x1"].clone()}, b)["x1_rmsd"] == (0.0, "nm")
    shifted = (b["x1"] + torch.tensor([1.0, -2.0, 0.5])) * b["mask"][..., None]
    assert task.accuracy({"x1": shifted}, b)["x1_rmsd"][0] == pytest.approx(0.0, abs=1e-6)
    noisy = b["x1"].clone()
    noisy[..., 0] += 0.3 * torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0)  # nearly mean-free
    noisy = noisy * b["mask"][..., None]
    value = task.accuracy({"x1": noisy}, b)["x1_rmsd"][0]
    assert 0.25 < value < 0.31


def test_tiny_model_fits_one_batch(task):
    torch.manual_seed(0)
    model = task.build_model("tiny")
    b = task.collate(_examples((30, 40, 25), seed=7))
    view = task.eval_views(b, torch.Generator().manual_seed(8))[4][1]  # t = 0.8
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = task.loss(task.predict(model, view), view)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.5 * first


def test_equivariant_toy_has_zero_equivariance_error_at_every_t(task):
    """Last on purpose: prefers the integrator's decompose, else checks the action directly."""
    model = EquivariantToy().double()
    b = task.collate(_examples())
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    views = task.eval_views(b, torch.Generator().manual_seed(9))
    views = [
        (lab, {k: (v.double() if v.is_floating_point() else v) for k, v in view.items()})
        for lab, view in views
    ]
    R = haar_rotations(3, torch.Generator().manual_seed(10), dtype=torch.float64)
    for _, view in views:  # direct: canonicalize(predict(rotate(view))) == predict(view)
        z = task.canonicalize(task.predict(model, task.rotate(view, R)), R)["x1"]
        torch.testing.assert_close(z, task.predict(model, view)["x1"], atol=1e-10, rtol=0)
    from equipipe.equivariance import decompose

    nonequiv = task.build_model("tiny").double()
    for lab, view in views:
        gen = torch.Generator().manual_seed(11)
        d = decompose(model, task, view, 4, gen)["x1"]
        assert d.total > 0 and d.equiv <= 1e-10 * d.total, (lab, d)  # float32 rotations
        assert d.n_elements == 3 * 39
        d2 = decompose(nonequiv, task, view, 4, torch.Generator().manual_seed(11))["x1"]
        assert d2.equiv > 1e-8  # the tiny Proteína is not equivariant at initialisation
