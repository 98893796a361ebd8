"""Stochastic Lanczos quadrature (equipipe.slq) against exact Hessians."""

from __future__ import annotations

import numpy as np
import torch

from equipipe import landscape as ls
from equipipe.slq import Density, slq

TAUS = 10.0 ** np.arange(-6.0, 0.0)


def _agree(d: Density, e: Density, taus=TAUS) -> int:
    """SLQ and exact: λmax; eigenvalue counts above τ λmax within 3 SE + the resolution + 2;
    κ(τ) within a factor 2 wherever the count is resolved (resolution <= max(2, 10 %), as the
    analysis marks it). Returns how many thresholds were resolved."""
    assert np.isclose(d.lambda_max, e.lambda_max, rtol=1e-6)
    c, se = d.count_above(taus)
    ce, _ = e.count_above(taus)
    res = d.resolution(taus)
    assert np.all(np.abs(c - ce) <= 3 * np.nan_to_num(se) + res + 2), (c, se, res, ce)
    k, ke = d.kappa(taus), e.kappa(taus)
    resolved = (res <= np.maximum(2.0, 0.1 * c)) & np.isfinite(ke)
    assert np.all(np.abs(np.log10(k[resolved] / ke[resolved])) < np.log10(2)), (k, ke, res)
    return int(resolved.sum())


def test_slq_matches_a_known_indefinite_spectrum():
    """An indefinite spectrum, dense near zero over six decades of |λ| (n = 600)."""
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.normal(0, 1e-5, 250), 10 ** rng.uniform(-5, 0, 330),
                         [2, 3, 5, 8, 13, 20, 30, 50, 80, 100, 150, 200, 300, 400, 500, 700, 800,
                          900, 950, 1000]])  # fmt: skip
    Q, _ = np.linalg.qr(rng.normal(size=(ev.size, ev.size)))
    H = torch.tensor((Q * ev) @ Q.T)
    d = slq(lambda v: H @ v, ev.size, 10, 50, torch.Generator().manual_seed(0))
    assert np.isclose(d.weights.sum(), 1.0)
    e = Density.exact(ev)
    assert _agree(d, e) >= 4
    # the exact κ(τ) is the usual κ at rel_tol = τ
    for tau in TAUS:
        assert np.isclose(e.kappa([tau])[0], ls.condition_number(ev, tau)["kappa"])


def test_negative_share_of_a_resolved_indefinite_spectrum():
    rng = np.random.default_rng(1)
    ev = np.concatenate([-(10 ** rng.uniform(1, 2, 120)), 10 ** rng.uniform(1, 3, 280)])
    Q, _ = np.linalg.qr(rng.normal(size=(ev.size, ev.size)))
    H = torch.tensor((Q * ev) @ Q.T)
    d = slq(lambda v: H @ v, ev.size, 10, 30, torch.Generator().manual_seed(1))
    assert abs(d.fraction_negative() - Density.exact(ev).fraction_negative()) < 0.05
    assert abs(d.fraction_negative() - 0.3) < 0.05


def test_slq_on_the_hessians_of_a_nonlinear_block_matches_the_exact_ones(escaip_setup):
    """The force head's feed-forward weight of a small EScAIP-like model (hidden 20: 400
    parameters, through the GELU: indefinite): SLQ of the L_mean and L_equiv Hessians by
    Hessian-vector products agrees with their exact eigenvalues (double backward)."""
    task, model, batches = escaip_setup(B=2, n_batches=1, hidden=20)
    views = ls.make_views(task, batches, 4, torch.Generator().manual_seed(0))
    obj = ls.BlockObjective(model, task, views, param="force_head.ffn.up.weight")
    assert obj.n_params == 400
    hess = obj.hessians()
    hvps = obj.hvps()
    for i, loss in enumerate(("mean", "equiv")):
        ev = torch.linalg.eigvalsh(hess[loss]).numpy()
        assert (ev < -1e-8 * ev.max()).any()  # indefinite
        d = slq(hvps[loss], obj.n_params, 6, 30, torch.Generator().manual_seed(i))
        assert _agree(d, Density.exact(ev), 10.0 ** np.arange(-5.0, 0.0)) >= 2


def test_linear_head_kappa_of_mean_and_equiv_coincide_at_every_threshold(escaip_setup):
    """Derived in landscape.py: on the direct force head with an invariant backbone both
    Hessians are built from one H x H matrix, so their positive eigenvalues coincide and
    κ(L_mean) = κ(L_equiv) at every threshold, by construction."""
    from equipipe.so3 import octahedral_rotations

    task, model, batches = escaip_setup(B=2, n_batches=1)
    views = ls.make_views(task, batches, 24, torch.Generator().manual_seed(0),
                          octahedral_rotations(torch.float64))  # fmt: skip
    obj = ls.BlockObjective(model, task, views)
    quad = obj.quadratic_model(1.0)
    k = {n: Density.exact(torch.linalg.eigvalsh(quad.hess[n]).numpy()).kappa(TAUS)
         for n in ("mean", "equiv")}  # fmt: skip
    np.testing.assert_allclose(k["mean"], k["equiv"], rtol=1e-6)
