"""Hessians (exact and Lanczos), conditioning, grids, and the complementary-subspace fact."""

import math

import numpy as np
import pytest
import torch

from equipipe import landscape as ls
from equipipe.equivariance import decompose
from equipipe.so3 import octahedral_rotations

F64 = torch.float64


def known_quadratic(P=24, n_null=5, seed=0):
    """f(θ) = ½ θᵀAθ + bᵀθ with A = Q diag(λ) Qᵀ, λ: n_null zeros then a log-spaced spectrum."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    lam = torch.cat([torch.zeros(n_null, dtype=F64), torch.logspace(-3, 2, P - n_null, dtype=F64)])
    A = Q @ torch.diag(lam) @ Q.T
    b = torch.randn(P, generator=g, dtype=F64)
    return (lambda x: 0.5 * x @ A @ x + b @ x), A, lam


def test_exact_hessian_of_a_known_quadratic():
    fn, A, lam = known_quadratic()
    theta = torch.randn(len(lam), dtype=F64)
    H = ls.exact_hessian(fn, theta)
    torch.testing.assert_close(H, A, rtol=1e-10, atol=1e-12)
    ev = torch.linalg.eigh(H).eigenvalues
    torch.testing.assert_close(ev[5:], lam[5:], rtol=1e-9, atol=1e-12)
    c = ls.condition_number(ev, rel_tol=1e-8)
    assert math.isclose(c["kappa"], 1e5, rel_tol=1e-8)
    assert c["n_null"] == 5 and c["n_negative"] == 0
    assert math.isclose(c["lambda_min_pos"], 1e-3, rel_tol=1e-8)


@pytest.mark.parametrize("k", [24, 40])
def test_lanczos_recovers_the_spectrum_and_kappa(k):
    fn, A, lam = known_quadratic()
    x = torch.randn(len(lam), dtype=F64, requires_grad=True)
    hvp = ls.hvp_function(fn(x), x)  # the autograd Hessian-vector product path
    ev, vecs = ls.lanczos(hvp, len(lam), k, torch.Generator().manual_seed(1))
    c = ls.condition_number(ev, rel_tol=1e-8)
    assert math.isclose(c["lambda_max"], 100.0, rel_tol=1e-9)
    assert math.isclose(c["kappa"], 1e5, rel_tol=1e-7)
    pos = ev[ev > 1e-8 * ev.max()]
    torch.testing.assert_close(pos, lam[5:], rtol=1e-7, atol=1e-10)
    # Ritz vectors are eigenvectors: A v = λ v
    top = vecs[:, -1]
    torch.testing.assert_close(A @ top, ev[-1] * top, rtol=1e-7, atol=1e-8)


def test_lanczos_stops_on_an_invariant_krylov_space():
    P = 30
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    lam = torch.tensor([0.0] * 10 + [1.0] * 10 + [7.0] * 10, dtype=F64)  # 3 distinct values
    A = Q @ torch.diag(lam) @ Q.T
    ev, _ = ls.lanczos(lambda v: A @ v, P, 20, g)
    assert len(ev) <= 4
    c = ls.condition_number(ev, rel_tol=1e-8)
    assert math.isclose(c["kappa"], 7.0, rel_tol=1e-9)


def test_quadratic_fit_and_condition_edge_cases():
    a, b = np.meshgrid(ls.grid_offsets(20, 0.1), ls.grid_offsets(20, 0.1), indexing="ij")
    z = 1.0 + 0.3 * a - 0.2 * b + 2.0 * a * a + 0.5 * a * b + 8.0 * b * b
    fit = ls.quadratic_fit(a, b, z)
    assert math.isclose(fit["r2"], 1.0, rel_tol=1e-12)
    assert math.isclose(fit["curvature_alpha"], 4.0, rel_tol=1e-9)
    assert math.isclose(fit["curvature_ratio"], 4.0, rel_tol=1e-9)
    assert math.isnan(ls.quadratic_fit(a, b, np.full_like(a, 3.0))["r2"])
    assert math.isnan(ls.condition_number(np.zeros(4))["kappa"])
    assert np.allclose(ls.grid_offsets(4, 1.0), [-1.5, -0.5, 0.5, 1.5])


# --- the model objective -------------------------------------------------------------------


@pytest.fixture(scope="module")
def octahedral_objective(escaip_setup):
    task, model, batches = escaip_setup()
    views = ls.make_views(
        task, batches, 24, torch.Generator().manual_seed(0), octahedral_rotations(F64)
    )
    return ls.BlockObjective(model, task, views)


def test_objective_is_the_unbiased_decomposition_and_leaves_the_model_alone(escaip_setup):
    task, model, batches = escaip_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    views = ls.make_views(task, batches, 5, torch.Generator().manual_seed(3))
    obj = ls.BlockObjective(model, task, views)
    assert obj.param_name == "force_head.linear.weight" and obj.n_params == 36
    vals = obj.values()
    # the same rotations through equivariance.decompose (the generator order is decompose's;
    # decompose rounds them to float32, hence rel 1e-6)

    gen = torch.Generator().manual_seed(3)
    dec = None
    for b in batches:
        b64 = {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
        d = decompose(obj.model, task, b64, 5, gen)["forces"]
        dec = d if dec is None else dec + d
    per = dec.per_element()
    assert math.isclose(vals["equiv"], per["equiv_unbiased"], rel_tol=1e-6)
    assert math.isclose(vals["mean"], per["mean_unbiased"], rel_tol=1e-6)
    assert math.isclose(vals["total"], per["total"], rel_tol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_quadratic_model_autograd_and_lanczos_paths_agree(octahedral_objective, escaip_setup):
    obj = octahedral_objective
    quad = obj.quadratic_model()
    auto = obj.hessians()
    vals = obj.values()
    for name in ls.LOSSES:
        scale = float(auto[name].abs().max())
        torch.testing.assert_close(quad.hess[name], auto[name], rtol=0, atol=1e-9 * scale)
        assert math.isclose(quad.value[name], vals[name], rel_tol=1e-10)
    # the gradient of the quadratic model is the autograd gradient
    L = obj.losses_from_predictions(obj.predictions(grad=True))
    (g,) = torch.autograd.grad(L["equiv"], obj.param)
    torch.testing.assert_close(quad.grad["equiv"], g.reshape(-1).double(), rtol=1e-8, atol=1e-12)
    z0, A = obj.jacobian(obj.views[0])
    assert obj.affine_error(z0, A, 0.5) < 1e-13  # a final linear map: predictions are affine
    assert obj.quadratic_model(check_radius=0.5).affine_error < 1e-13
    # Lanczos on a smaller objective (each Hessian-vector product is a forward with graph)
    task, model, batches = escaip_setup(B=2, n_batches=1)
    small = ls.BlockObjective(
        model, task, ls.make_views(task, batches, 24, None, octahedral_rotations(F64))
    )
    exact = ls.spectra(small, quad=small.quadratic_model())
    lanc = ls.spectra(small, exact_max=0, lanczos_k=16, seed=0)
    for name in ls.LOSSES:
        assert exact[name].method == "exact" and lanc[name].method == "lanczos"
        ev, rv = exact[name].eigenvalues, lanc[name].eigenvalues
        # the extreme Ritz values converge first: λmax to rounding (interior ones, λmin+
        # among them, are estimates; κ is checked on the known quadratic above)
        assert math.isclose(float(rv.max()), float(ev.max()), rel_tol=1e-9)
        assert float(rv.min()) >= float(ev.min()) - 1e-12 * float(ev.max())


def test_complementary_subspaces_for_the_invariant_backbone_head(octahedral_objective):
    """L_mean depends on w̄, L_equiv on dW: Hessians on complementary subspaces (PAPER.md)."""
    obj = octahedral_objective
    H = obj.hessians()
    scale = float(H["equiv"].abs().max())
    assert float((H["mean"] @ H["equiv"]).abs().max()) < 1e-10 * scale**2
    sp = {n: torch.linalg.eigh(h) for n, h in H.items()}
    hidden = obj.n_params // 3
    c_eq = ls.condition_number(sp["equiv"].eigenvalues, 1e-8)
    c_mean = ls.condition_number(sp["mean"].eigenvalues, 1e-8)
    # null spaces: H_equiv = (I - 11ᵀ/3) ⊗ S' has dimension hidden + 2k, H_mean = 11ᵀ/9 ⊗ S'
    # has 2 hidden + k, with k = nullity of the H x H feature matrix S (0 when S has full rank)
    k = (c_eq["n_null"] - hidden) // 2
    assert k >= 0 and c_eq["n_null"] == hidden + 2 * k and c_mean["n_null"] == 2 * hidden + k
    # derived: both are built from the same H x H matrix S (H_mean = 11ᵀ/9 ⊗ 2S/n,
    # H_equiv = (I - 11ᵀ/3) ⊗ 2S/3n), so their positive spectra, hence κ, coincide
    assert math.isclose(c_eq["kappa"], c_mean["kappa"], rel_tol=1e-6)
    # L_mean is flat along L_equiv's top eigenvector (and its λmin+ one): the study's view
    top = sp["equiv"].eigenvectors[:, -1]
    assert float(top @ H["mean"] @ top) < 1e-10 * c_eq["lambda_max"]
    res = ls.run_landscape(obj, n=6, step=0.05, rel_tol=1e-8)
    fits = {(r["axes"], r["loss"]): r for r in res["fit"]}
    assert fits[("equiv", "equiv")]["r2"] > 0.999999
    assert fits[("equiv", "mean")]["range"] < 1e-9 * fits[("equiv", "equiv")]["range"]
    assert res["curvature"].startswith("quadratic") and res["affine_error"] < 1e-12
    assert set(res["surface_method"].values()) == {"quadratic"}
    kap = {r["loss"]: r for r in res["kappa"]}
    assert kap["equiv"]["n_null"] == hidden + 2 * k
    grid = [r for r in res["grid"] if r["axes"] == "equiv" and r["loss"] == "equiv"]
    assert len(grid) == 36 and min(r["value"] for r in grid) >= 0


def test_quadratic_surface_equals_point_by_point_evaluation(octahedral_objective):
    obj = octahedral_objective
    quad = obj.quadratic_model()
    u, v = ls.spectra(obj, quad=quad)["equiv"].axes(1e-8)
    fast = ls.surface(obj, u, v, n=3, step=0.1, quad=quad)
    slow = ls.surface(obj, u, v, n=3, step=0.1)
    assert fast["method"] == "quadratic" and slow["method"] == "evaluated"
    for name in ls.LOSSES:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-9, atol=1e-12)


def test_nonlinear_block_takes_the_autograd_route(escaip_setup):
    task, model, batches = escaip_setup(B=2, n_batches=1)
    views = ls.make_views(task, batches, 4, torch.Generator().manual_seed(0))
    # through the GELU of the head's feed-forward: not affine (ffn.down would still be affine)
    obj = ls.BlockObjective(model, task, views, param="force_head.ffn.up.weight")
    res = ls.run_landscape(obj, n=3, step=0.01, rel_tol=1e-8, planes=["equiv"])
    assert res["curvature"].startswith("autograd") and res["affine_error"] > 1e-10
    assert res["surface_method"] == {"equiv": "evaluated"}
    kap = {r["loss"]: r for r in res["kappa"]}
    assert kap["equiv"]["lambda_max"] > 0 and kap["equiv"]["n_eigenvalues"] == obj.n_params


def test_haar_mean_is_nearly_flat_along_equiv_axes(escaip_setup):
    """With K Haar rotations per example the flatness holds up to finite-K sampling."""
    task, model, batches = escaip_setup()
    views = ls.make_views(task, batches, 16, torch.Generator().manual_seed(0))
    obj = ls.BlockObjective(model, task, views)
    H = obj.hessians()
    ev = torch.linalg.eigh(H["equiv"])
    top = ev.eigenvectors[:, -1]
    assert abs(float(top @ H["mean"] @ top)) < 0.15 * float(ev.eigenvalues[-1])


def test_default_block_errors_name_the_key():
    with pytest.raises(ValueError, match="'param'"):
        ls.default_block(torch.nn.Linear(2, 2))
