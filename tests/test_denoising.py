"""Denoising task: protocol, group action on atoms/noise/grids, both evaluation modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from equipipe.equivariance import decompose
from equipipe.so3 import haar_rotations, octahedral_rotations, rotate_grid
from equipipe.tasks import make_task
from equipipe.tasks.base import Task
from equipipe.tasks.denoising import DenoisingTask
from equipipe.voxel import ball_mask

CFG = {"grid_size": 16, "grid_spacing": 0.5, "model_overrides": {"dropout": 0.0}}


def _examples(smiles=("CC(=O)Nc1ccccc1", "OCC(Cl)CBr", "c1ccsc1F")):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    out = []
    for i, s in enumerate(smiles):
        m = Chem.AddHs(Chem.MolFromSmiles(s))
        AllChem.EmbedMolecule(m, randomSeed=i + 1)
        p = m.GetConformer().GetPositions()
        z = np.array([a.GetAtomicNum() for a in m.GetAtoms()], dtype=np.int8)
        out.append({"pos": (p - p.mean(0)).astype(np.float32), "z": z, "energy": np.float64(0)})
    return out


class Blur(nn.Module):
    """Isotropic blur as the 'model': exactly equivariant in the continuum."""

    def __init__(self, task: DenoisingTask):
        super().__init__()
        self.task = task

    def forward(self, x):
        return self.task.blur(x)


@pytest.fixture()
def task():
    return make_task("denoising", CFG)


@pytest.fixture()
def batch(task):
    return task.collate(_examples())


def test_protocol_and_layout(task, batch):
    assert isinstance(task, Task) and task.fields == ("density",)
    assert task.num_examples(batch) == 3
    big = task.repeat(batch, 4)
    assert task.num_examples(big) == 12
    n = batch["pos"].shape[0]
    assert torch.equal(big["batch"][2 * n : 3 * n], batch["batch"] + 2 * 3)  # copy-major
    g = torch.Generator().manual_seed(0)
    view = task.eval_views(batch, g)[0][1]
    pred = task.predict(Blur(task), task.repeat(view, 2))["density"]
    assert pred.shape == (6, 8, 16, 16, 16)
    assert torch.equal(pred[:3], pred[3:])  # same fixed noise in every copy


def test_eval_views_and_rotation_sets(task, batch):
    views = task.eval_views(batch, torch.Generator().manual_seed(0))
    assert [labels for labels, _ in views] == [{"mode": "octahedral"}, {"mode": "haar"}]
    assert torch.equal(views[0][1]["noise_seed"], views[1][1]["noise_seed"])
    R = task.rotation_set({"mode": "octahedral"})
    assert R.shape == (24, 3, 3) and task.rotation_set({"mode": "haar"}) is None
    assert task.element_mask(views[0][1]) is None
    mask = task.element_mask(views[1][1])["density"]
    assert mask.shape == (3, 8, 16, 16, 16) and torch.equal(mask[1, 4], ball_mask(16))
    only = make_task("denoising", {**CFG, "eval_modes": ["haar"]})
    assert [lab for lab, _ in only.eval_views(batch, torch.Generator())] == [{"mode": "haar"}]


def test_blur_has_zero_equivariance_error_under_octahedral_evaluation(task, batch):
    labels, view = task.eval_views(batch, torch.Generator().manual_seed(0))[0]
    R = task.rotation_set(labels)
    for strategy in ("sequential", "batched"):
        d = decompose(Blur(task), task, view, 24, None, strategy, rotations=R)["density"]
        assert d.exhaustive and d.k == 24 and d.n_elements == 3 * 8 * 16**3
        assert d.total > 0 and d.equiv <= 1e-10 * d.total


def test_octahedral_action_is_exact_on_inputs_noise_and_outputs(task, batch):
    view = task.eval_views(batch, torch.Generator().manual_seed(0))[0][1]
    noisy, clean = task.model_input(view)
    for R in octahedral_rotations()[1:6]:
        Rb = R.expand(3, 3, 3)
        rb = task.rotate(view, Rb)
        noisy_r, clean_r = task.model_input(rb)
        assert (clean_r - rotate_grid(clean, R)).abs().max() < 1e-6
        assert (noisy_r - rotate_grid(noisy, R)).abs().max() < 1e-5
        back = task.canonicalize({"density": noisy_r}, Rb)["density"]
        assert (back - noisy).abs().max() < 1e-5


def test_training_noise_is_fresh_and_unrotated(task, batch):
    g = torch.Generator().manual_seed(3)
    tb = task.prepare_train(None, batch, g)
    H = haar_rotations(3, torch.Generator().manual_seed(1))
    assert torch.equal(task.noise(tb), task.noise(task.rotate(tb, H)))  # i.i.d., not moved
    ev = task.eval_views(batch, g)[1][1]
    assert not torch.equal(task.noise(ev), task.noise(task.rotate(ev, H)))  # fixed: moved
    assert not torch.equal(tb["noise_seed"], task.prepare_train(None, batch, g)["noise_seed"])


def test_haar_view_and_interpolation_floor(task, batch):
    view = task.eval_views(batch, torch.Generator().manual_seed(0))[1][1]
    floor = task.interpolation_floor(view, torch.Generator().manual_seed(5), 4)["density"]
    direct = decompose(Blur(task), task, view, 4, torch.Generator().manual_seed(5))["density"]
    assert floor.k == 4 and not floor.exhaustive
    assert floor.n_elements == 3 * 8 * int(ball_mask(16).sum()) == direct.n_elements
    assert floor.total == pytest.approx(direct.total, rel=1e-6)
    assert floor.equiv == pytest.approx(direct.equiv, rel=1e-6)
    assert 0 < floor.pct < 1  # resampling error only: nonzero for continuous rotations


def test_haar_clean_input_is_the_voxelised_rotated_molecule(task, batch):
    H = haar_rotations(3, torch.Generator().manual_seed(2))
    clean = task.target(batch)["density"]
    rotated = task.target(task.rotate(batch, H))["density"]
    back = task.canonicalize({"density": rotated}, H)["density"]
    m = ball_mask(16)
    err = (back - clean)[..., m].pow(2).mean() / clean[..., m].pow(2).mean()
    assert err < 0.2  # 0.47 A-wide atoms on a 0.5 A grid are not band-limited (see
    # test_voxel_continuous for band-limited densities, where the resampling is exact)
    assert (rotated.sum((2, 3, 4)) - clean.sum((2, 3, 4))).abs().max() < 0.05 * clean.sum()


def test_augment_shifts_each_example_rigidly(task, batch):
    out = task.augment(batch, torch.Generator().manual_seed(0))
    d = out["pos"] - batch["pos"]
    for b in range(3):
        db = d[batch["batch"] == b]
        assert torch.allclose(db, db[:1].expand_as(db))
        assert db[0].norm() <= 0.5 + 1e-6


def test_training_step_with_tiny_model(task, batch):
    torch.manual_seed(0)
    model = task.build_model("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        tb = task.prepare_train(model, task.augment(batch, g), g)
        pred = task.predict(model, tb)
        loss = task.loss(pred, tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    acc = task.accuracy(pred, tb)
    assert acc["denoise_mse"][1] == "density^2" and acc["denoise_mse"][0] > 0
    state = task.fit(_examples())
    assert sum(state["channel_atoms"]) == sum(len(e["z"]) for e in _examples())


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="eval_modes"):
        DenoisingTask({"eval_modes": ["cubic"]})
    with pytest.raises(ValueError, match="grid_size"):
        DenoisingTask({"grid_size": 20})
    with pytest.raises(ValueError, match="density_form"):
        DenoisingTask({"density_form": "box"})


def test_each_example_is_a_unit_of_the_standard_errors(task, batch):
    # one batch of 3 examples used to be ONE unit, so total_se / equiv_se were NaN
    labels, view = task.eval_views(batch, torch.Generator().manual_seed(0))[0]
    R = task.rotation_set(labels)
    model = nn.Conv3d(8, 8, 3, padding=1)  # not equivariant: a nonzero, varying E per example
    d = decompose(model, task, view, 24, None, rotations=R)["density"]
    assert d.n_units == 3
    assert np.isfinite(d.standard_error("total")) and d.standard_error("equiv_unbiased") > 0
    singles = []
    for i, ex in enumerate(_examples()):  # the same example, noise seed and view, alone
        one = task._with_noise(task.collate([ex]), view["noise_seed"][i : i + 1], True, False)
        singles.append(decompose(model, task, one, 24, None, rotations=R)["density"])
    assert d.equiv == pytest.approx(sum(s.equiv for s in singles), rel=1e-5)


def test_gradient_norms_flow_through_the_continuous_view(task, batch):
    """The trainer takes the gradient-norm ratio in the Haar (continuous) view, whose
    predictions are rotated back by splines: it must differentiate them (the paper grid's
    voxmol jobs failed with "element 0 of tensors does not require grad")."""
    from equipipe.equivariance import evaluate_view

    labels, view = next(lv for lv in task.eval_views(batch, torch.Generator().manual_seed(0))
                         if task.rotation_set(lv[0]) is None)  # fmt: skip
    model = nn.Conv3d(8, 8, 3, padding=1)
    res = evaluate_view(model, task, view, 3, torch.Generator().manual_seed(1), gradients=True)
    g = res.gradient_norms()
    assert g["grad_norm_equiv"] > 0 and g["grad_norm_mean"] > 0 and np.isfinite(g["grad_ratio"])
