"""Continuous-rotation voxel evaluation without a resampling floor (issue 11 item 1).

Exactly equivariant predictors (by construction in the continuum) pushed through the REAL
evaluation path (``decompose`` on the task's Haar view: rotated coordinates re-voxelised,
band-limited noise moved with the example, outputs rotated back by splines, inscribed-ball
mask) must show almost no equivariance error, at the embedded grid (read from
config/config.yaml) and at the study's 64^3 / 0.25 Å; a known injected non-equivariant part
must be measured within 3 standard errors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from equipipe.config import load_config, run_spec
from equipipe.equivariance import Decomposition, decompose
from equipipe.so3 import grid_centres
from equipipe.tasks.denoising import DenoisingTask
from equipipe.voxel import ball_mask
from tests.test_denoising import _examples

ROOT = Path(__file__).resolve().parents[1]
# the embedded grid, atoms and noise; the predictors' blur is the issue's 0.5 Å (not the
# config's smoother floor reference), so their residual keeps near-Nyquist noise
EMBEDDED = {
    **run_spec(load_config(ROOT / "config" / "config.yaml"), "dn_default", 0)["task_cfg"],
    "floor_blur_sigma": 0.5,
}
STUDY = {**EMBEDDED, "grid_size": 64, "grid_spacing": 0.25, "atom_radius": 0.5}


class Oracle(DenoisingTask):
    """The task with a hand-made predictor in place of the model (``kind``):

    - ``residual``: clean + 0.1 · blur(noise) — an equivariant residual, total bounded away
      from zero;
    - ``blur``: isotropic blur of the noisy input;
    - ``clean``: the clean grid;  ``identity``: the noisy input;
    plus ``inject``, a fixed grid added in every frame (so it does NOT rotate: a known
    non-equivariant part).
    """

    kind = "residual"
    inject: torch.Tensor | None = None

    def predict(self, model, batch):
        del model  # the reference is computed from the input alone
        noisy, clean = self.model_input(batch)
        out = {
            "residual": lambda: clean + 0.1 * self.blur(noisy - clean),
            "blur": lambda: self.blur(noisy),
            "clean": lambda: clean,
            "identity": lambda: noisy,
        }[self.kind]()
        if self.inject is not None:
            out = out + self.inject
        return {"density": out, "clean": clean}


KINDS = ("residual", "blur", "clean", "identity")


def _haar(task, examples, k, seed, kinds=KINDS) -> dict[str, Decomposition]:
    """Per predictor kind, the Haar-view decomposition summed over examples (one unit each)."""
    out: dict[str, Decomposition] = {}
    for i, ex in enumerate(examples):
        views = task.eval_views(task.collate([ex]), torch.Generator().manual_seed(seed + i))
        view = next(v for lab, v in views if lab["mode"] == "haar")
        for kind in kinds:
            task.kind = kind
            gen = torch.Generator().manual_seed(100 + seed + i)  # same rotations for every kind
            d = decompose(nn.Identity(), task, view, k, gen)["density"]
            out[kind] = out[kind] + d if kind in out else d
    return out


def _check_floor_free(out: dict[str, Decomposition], pct_max: float, clean_max: float):
    for kind in ("residual", "blur"):
        d = out[kind]
        assert d.per_element()["total"] > 1e-5  # bounded away from zero
        assert d.pct <= pct_max, f"{kind}: pct {100 * d.pct:.3f} %"
    ident = out["identity"].per_element()["total"]
    clean_e = out["clean"].per_element()["equiv_unbiased"]
    assert clean_e <= clean_max * ident, f"clean: E_unb {clean_e:.2e} vs identity {ident:.2e}"


def test_exactly_equivariant_predictors_show_no_floor_at_the_embedded_grid():
    task = Oracle({**EMBEDDED, "eval_modes": ["haar"]})
    _check_floor_free(_haar(task, _examples(), 4, 0), 0.01, 0.01)


def test_exactly_equivariant_predictors_show_no_floor_at_the_study_grid():
    task = Oracle({**STUDY, "eval_modes": ["haar"]})
    _check_floor_free(_haar(task, _examples()[:1], 2, 0), 0.005, 0.005)


def test_injected_non_equivariant_part_is_measured_within_3_se():
    task = Oracle({**EMBEDDED, "eval_modes": ["haar"]})
    G, spacing = task.grid_size, task.spacing
    x = grid_centres((G,) * 3, spacing, dtype=torch.float64)  # Å
    g = torch.exp(-x.pow(2).sum(-1) / 3.0**2)
    u = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    eps = 0.03
    task.inject = (eps * (x @ u) * g).float()[None, None]  # a(x), in every channel
    # Haar variance of a(R x) at x: eps^2 |x|^2 g^2 / 3 (u.Rx has mean 0, variance |x|^2 / 3)
    var = eps**2 * x.pow(2).sum(-1) * g.pow(2) / 3
    expected = float(var[ball_mask(G)].mean())
    d = _haar(task, _examples(), 4, 0, ["residual"])["residual"]
    d = d + _haar(task, _examples(), 4, 10, ["residual"])["residual"]
    measured = d.per_element()["equiv_unbiased"]
    se = d.standard_error("equiv_unbiased")
    assert d.n_units == 6 and se > 0
    assert abs(measured - expected) <= 3 * se, (measured, expected, se)
    assert (
        d.pct > 0.03
    )  # far above the predictor's own floor (<= 1 %): the part is what is measured
