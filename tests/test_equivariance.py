import math

import numpy as np
import pytest
import torch

from equipipe.equivariance import (
    Decomposition,
    decompose,
    decomposition_from_predictions,
    decomposition_terms,
    example_rotations,
    gradient_norms,
    head_deviation,
    twirl,
)
from equipipe.so3 import octahedral_rotations
from tests.toytask import PairModel, ToyTask, toy_batch


def test_identity_T_equals_M_plus_E_and_unbiased_forms():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    d = decomposition_from_predictions(z, y)
    assert d.k == 7 and d.n_elements == 15
    assert math.isclose(d.total, d.mean + d.equiv, rel_tol=1e-12)
    assert math.isclose(d.equiv_unbiased, 7 / 6 * d.equiv, rel_tol=1e-12)
    assert math.isclose(d.mean_unbiased + d.equiv_unbiased, d.total, rel_tol=1e-12)
    assert math.isclose(d.pct, d.equiv_unbiased / d.total)
    # sums, not means: a hand computation
    zbar = z.mean(0)
    assert math.isclose(d.total, float(((y - z) ** 2).mean(0).sum()), rel_tol=1e-12)
    assert math.isclose(d.mean, float(((y - zbar) ** 2).sum()), rel_tol=1e-12)


def test_exhaustive_has_no_correction_and_k_must_be_two():
    z = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    d = decomposition_from_predictions(z, y, exhaustive=True)
    assert d.equiv_unbiased == d.equiv and d.mean_unbiased == d.mean
    with pytest.raises(ValueError, match="K >= 2"):
        decomposition_from_predictions(z[:1], y)


def test_decompositions_of_disjoint_batches_add():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 3, generator=g, dtype=torch.float64)
    whole = decomposition_from_predictions(z, y)
    parts = decomposition_from_predictions(z[:, :4], y[:4]) + decomposition_from_predictions(
        z[:, 4:], y[4:]
    )
    for name in ("total", "mean", "equiv", "equiv_unbiased", "mean_unbiased", "pct"):
        assert math.isclose(getattr(whole, name), getattr(parts, name), rel_tol=1e-12)
    assert parts.n_units == 2 and parts.n_elements == 30
    assert parts.standard_error("total") > 0


def test_mask_excludes_padding():
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    y = torch.randn(2, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    d = decomposition_from_predictions(z, y, mask=mask)
    ref = decomposition_from_predictions(z[:, mask], y[mask])
    assert d.n_elements == 9 and math.isclose(d.total, ref.total, rel_tol=1e-12)


@pytest.mark.parametrize("strategy", ["sequential", "batched"])
def test_exactly_equivariant_model_has_zero_equivariance_error(strategy):
    task, batch = ToyTask(), toy_batch()
    model = PairModel(equivariant=True)
    dec = decompose(model, task, batch, 10, torch.Generator().manual_seed(0), strategy)
    for f in ("v", "s"):
        assert dec[f].equiv <= 1e-6 * dec[f].total
        assert dec[f].pct < 1e-6


def test_batched_and_sequential_agree():
    task, batch = ToyTask(), toy_batch()
    model = PairModel(equivariant=False)
    a = decompose(model, task, batch, 6, torch.Generator().manual_seed(3), "sequential")["v"]
    b = decompose(model, task, batch, 6, torch.Generator().manual_seed(3), "batched")["v"]
    assert a.equiv > 1e-3 * a.total
    assert math.isclose(a.total, b.total, rel_tol=1e-10) and math.isclose(
        a.equiv, b.equiv, rel_tol=1e-10
    )
    with pytest.raises(ValueError, match="allowed"):
        decompose(model, task, batch, 6, torch.Generator(), "gpu")


def test_rotations_are_per_example_and_reproducible():
    R1 = example_rotations(4, 3, torch.Generator().manual_seed(0))
    R2 = example_rotations(4, 3, torch.Generator().manual_seed(0))
    assert R1.shape == (3, 4, 3, 3) and torch.equal(R1, R2)
    assert not torch.allclose(R1[:, 0], R1[:, 1])


def _linear_model_closed_form(A, x, y):
    """For f(x) = A x, E_R[R^T A R] = tr(A)/3 I; equivariance error = E||(R^T A R - tr(A)/3 I) x||^2."""
    a = torch.trace(A) / 3
    twirled = a * x
    L_mean = float(((y - twirled) ** 2).sum())
    D = A - a * torch.eye(3, dtype=A.dtype)
    # E_R ||R^T D R x||^2 = E ||D R x||^2 = ||D||_F^2 |x|^2 / 3 (second moments of R only)
    L_equiv = float((D**2).sum() * (x**2).sum() / 3)
    return L_mean, L_equiv


def test_unbiased_estimators_match_closed_form_monte_carlo():
    """Over many independent K=4 decompositions, E_unb and M_unb average to the exact values."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)
    L_mean, L_equiv = _linear_model_closed_form(A, x[0], y[0])

    class Lin(torch.nn.Module):
        def forward(self, b):
            return {"v": b["x"] @ A.T, "s": b["x"].sum((1, 2)) * 0}

    task, batch = ToyTask(), {"x": x, "y": y, "ys": torch.zeros(1, dtype=torch.float64)}
    gen = torch.Generator().manual_seed(1)
    eu, mu, raw_m = [], [], []
    for _ in range(1500):
        d = decompose(Lin(), task, batch, 4, gen)["v"]
        eu.append(d.equiv_unbiased)
        mu.append(d.mean_unbiased)
        raw_m.append(d.mean)
    eu, mu, raw_m = map(lambda v: torch.tensor(v, dtype=torch.float64), (eu, mu, raw_m))
    se = lambda v: float(v.std() / math.sqrt(len(v)))  # noqa: E731
    assert abs(float(eu.mean()) - L_equiv) < 3 * se(eu)
    assert abs(float(mu.mean()) - L_mean) < 3 * se(mu)
    # the raw twirled error M is biased high by V/K = L_equiv/K
    assert float(raw_m.mean()) - L_mean > 3 * se(raw_m)
    # the 24 octahedral rotations give the exact value in one go (second moments only)
    d = decompose(Lin(), task, batch, 0, None, rotations=octahedral_rotations(torch.float64))["v"]
    assert math.isclose(d.equiv, L_equiv, rel_tol=1e-10)
    assert math.isclose(d.mean, L_mean, rel_tol=1e-10)


def test_twirl_reduces_to_group_average():
    task, batch = ToyTask(), toy_batch()
    model = PairModel(equivariant=False)
    tw = twirl(model, task, batch, 24, None, rotations=octahedral_rotations(torch.float64))
    # octahedral twirl of the linear part A x is tr(A)/3 x exactly
    eq = PairModel(equivariant=True)
    expected = eq(batch)["v"] + torch.trace(model.A.detach()) / 3 * batch["x"]
    assert torch.allclose(tw["v"], expected, atol=1e-10)


def test_gradient_norms_match_independent_autograd():
    task, batch = ToyTask(), toy_batch()
    model = PairModel(equivariant=False)
    k = 5
    out = gradient_norms(model, task, batch, k, torch.Generator().manual_seed(9))
    # independent computation: explicit loops, scalar losses, .backward()
    R = example_rotations(6, k, torch.Generator().manual_seed(9), dtype=torch.float64)
    zs = []
    for i in range(k):
        rb = task.rotate(batch, R[i])
        zs.append(task.canonicalize(model(rb), R[i])["v"])
    z = torch.stack(zs)
    zbar = z.mean(0)
    n = batch["y"].numel()
    e_unb = k / (k - 1) * ((z - zbar) ** 2).mean(0).sum() / n
    m = ((batch["y"] - zbar) ** 2).sum() / n
    params = list(model.parameters())
    ge = torch.autograd.grad(e_unb, params, retain_graph=True)
    gm = torch.autograd.grad(m, params)
    ne = math.sqrt(sum(float((g**2).sum()) for g in ge))
    nm = math.sqrt(sum(float((g**2).sum()) for g in gm))
    assert math.isclose(out["grad_norm_equiv"], ne, rel_tol=1e-8)
    assert math.isclose(out["grad_norm_mean"], nm, rel_tol=1e-8)
    assert math.isclose(out["grad_ratio"], ne / (nm + 1e-8), rel_tol=1e-8)


def test_decomposition_terms_are_differentiable():
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t, m, e, n = decomposition_terms(z, torch.zeros(4, dtype=torch.float64))
    (t + m + e).backward()
    assert z.grad is not None and n == 4


def test_head_deviation():
    W = torch.ones(3, 8)
    assert head_deviation(W) == 0
    W[0] += 1.0
    # rows (2,1,1) around mean 4/3: variance over rows per column = 2/9
    assert math.isclose(head_deviation(W), 2 / 9, rel_tol=1e-6)
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 3, bias=False)
    torch.nn.init.xavier_uniform_(lin.weight)
    assert 0.008 < head_deviation(lin.weight) < 0.0125  # PAPER.md: Xavier H=128 ~0.0102
    with pytest.raises(ValueError):
        head_deviation(torch.ones(4, 8))


def test_decomposition_type():
    assert isinstance(
        decomposition_from_predictions(torch.randn(2, 3), torch.randn(3)), Decomposition
    )


def test_examples_are_the_units_of_the_standard_errors():
    """With ``n_examples`` (and the ragged ``index``) every example is a unit: the moments and
    standard errors equal those of per-example decompositions added together."""
    g = torch.Generator().manual_seed(3)
    sizes = [3, 5, 2, 7, 4, 6]
    index = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    y = torch.randn(int(index.numel()), 3, generator=g, dtype=torch.float64)
    scale = torch.rand(len(sizes), generator=g, dtype=torch.float64)[index].unsqueeze(-1)
    z = y + scale * torch.randn(6, *y.shape, generator=g, dtype=torch.float64)
    d = decomposition_from_predictions(z, y, n_examples=len(sizes), index=index)
    parts = [decomposition_from_predictions(z[:, index == b], y[index == b]) for b in range(6)]
    ref = parts[0]
    for p in parts[1:]:
        ref = ref + p
    assert d.n_units == ref.n_units == 6
    for name in ("total", "equiv_unbiased", "pct"):
        assert math.isclose(d.standard_error(name), ref.standard_error(name), rel_tol=1e-10)
    # padded (B, L, 3) with a mask: per-example units straight from the leading dim
    zp = torch.randn(4, 5, 8, 3, generator=g, dtype=torch.float64)
    yp = torch.randn(5, 8, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 8, generator=g) > 0.3
    dp = decomposition_from_predictions(zp, yp, mask=mask, n_examples=5)
    sums = [decomposition_from_predictions(zp[:, b : b + 1], yp[b : b + 1], mask=mask[b : b + 1])
            for b in range(5)]  # fmt: skip
    refp = sums[0]
    for p in sums[1:]:
        refp = refp + p
    assert dp.n_units == 5 and math.isclose(dp.pct, refp.pct, rel_tol=1e-12)
    assert math.isclose(dp.standard_error("pct"), refp.standard_error("pct"), rel_tol=1e-10)


def test_pct_standard_error_is_calibrated():
    """Over repeated held-out sets of 40 examples whose equivariance error and total vary (and
    covary) from example to example, the spread of pct matches its logged standard error."""
    g = torch.Generator().manual_seed(4)
    pcts, ses = [], []
    for _ in range(400):
        B = 40
        y = torch.randn(B, 6, 3, generator=g, dtype=torch.float64)
        err = torch.rand(B, 1, 1, generator=g, dtype=torch.float64) ** 2  # per-example error
        bias = err * torch.randn(B, 6, 3, generator=g, dtype=torch.float64)
        eq = 0.3 * err * torch.randn(10, B, 6, 3, generator=g, dtype=torch.float64)
        d = decomposition_from_predictions(y + bias + eq, y, n_examples=B)
        pcts.append(d.pct)
        ses.append(d.standard_error("pct"))
    ratio = float(np.std(pcts, ddof=1) / np.mean(ses))
    assert 0.85 < ratio < 1.15, ratio
