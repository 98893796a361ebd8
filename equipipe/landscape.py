"""Loss landscape of the decomposition with respect to one named parameter block.

Size (~790 lines, over the project's ~600): the three Hessian routes below share the fixed
view set and the loss closures built over it, and the analysis writes one table from all three;
the stochastic Lanczos densities are in :mod:`equipipe.slq`.

The three losses are the UNBIASED per-element means over a fixed set of held-out views, each
example with K rotations drawn once (``decomposition_terms`` per view, summed, / n_elements):

    L_total = T / n,   L_equiv = K/(K-1) E / n,   L_mean = (M - E/(K-1)) / n    (T = M + E)

(for a finite group applied exhaustively, e.g. the 24 octahedral rotations, the plug-in values
are exact: L_equiv = E / n, L_mean = M / n). Hessians with respect to the block, three routes:

* quadratic (head-sized blocks whose predictions are affine in the block, i.e. a final linear
  map such as ``force_head.linear.weight`` or ``decoder.linear.weight``; checked by a real
  forward far from θ0): the forward-mode Jacobian A of the predictions (one vmapped ``jvp``
  pass, the backbone runs once) gives every loss EXACTLY as value + gradient + Hessian
  (Gram matrices of A), and the grids analytically;
* autograd (head-sized, not affine): full Hessian by double backward, grids point by point;
* Lanczos (blocks over ``exact_max``): Hessian-vector products, full reorthogonalisation.

Conditioning κ = λmax / λmin+, with λmin+ the smallest
eigenvalue above ``rel_tol * λmax``: equivariant directions (add one vector to every head row)
are a null space of L_equiv, hence "smallest positive". Surfaces on 20x20 grids spanned by a
loss's (λmin+, λmax) eigenvectors, with a quadratic fit's R^2.

For the direct force head on an invariant backbone, L_mean depends on w̄ only and L_equiv on
dW = W - 1 w̄^T only, so their Hessians live on complementary subspaces and L_mean is flat along
every eigenvector of L_equiv's Hessian (exactly with the octahedral rotations; up to the
finite-K sampling of the rotations with Haar ones). Derived from the same closed form: both
Hessians are built from one H x H matrix S (H_mean = 11ᵀ/9 ⊗ 2S/n, H_equiv = (I - 11ᵀ/3) ⊗
2S/3n), so their positive eigenvalues coincide (multiplicity 1 vs 2) and so do their κ.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from equipipe.equivariance import (
    broadcast_mask,
    canonical_predictions,
    decomposition_terms,
    example_rotations,
)
from equipipe.tasks.base import Batch, Task

LOSSES: tuple[str, ...] = ("total", "mean", "equiv")
# Blocks tried in order when none is named: the direct force head, the flow-matching decoder.
DEFAULT_BLOCKS: tuple[str, ...] = ("force_head.linear.weight", "decoder.linear.weight")
# The study's grid steps (PAPER.md): EScAIP 0.00164, Proteína 0.002.
DEFAULT_STEPS: dict[str, float] = {
    "force_head.linear.weight": 0.00164,
    "decoder.linear.weight": 0.002,
}


# --------------------------------------------------------------------------------------------
# Generic linear algebra: Hessians, Lanczos, conditioning, quadratic fits


def hessian_of(loss: Tensor, param: Tensor, chunk: int = 64) -> Tensor:
    """Full Hessian (P, P) of a scalar ``loss`` with respect to a leaf tensor ``param``.

    Double backward: the gradient is built with a graph, then differentiated row by row
    (vmapped in chunks, with a plain loop as fallback). Symmetrised. float64.
    """
    n = param.numel()
    if not loss.requires_grad:
        return torch.zeros(n, n, dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, param, create_graph=True)
    g = g.reshape(-1)
    if not g.requires_grad:  # loss linear in param
        return torch.zeros(n, n, dtype=torch.float64)
    rows = []
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    for start in range(0, n, chunk):
        block = eye[start : start + chunk]
        try:
            (r,) = torch.autograd.grad(
                g, param, grad_outputs=block, retain_graph=True, is_grads_batched=True,
                allow_unused=True,
            )  # fmt: skip
            r = torch.zeros(len(block), n, dtype=g.dtype) if r is None else r.reshape(len(block), n)
        except RuntimeError:
            r = torch.stack([_grad_or_zero(g, param, v) for v in block])
        rows.append(r.detach().double().cpu())
    H = torch.cat(rows)
    return 0.5 * (H + H.T)


def _grad_or_zero(g: Tensor, param: Tensor, v: Tensor) -> Tensor:
    (r,) = torch.autograd.grad(g, param, grad_outputs=v, retain_graph=True, allow_unused=True)
    return (
        torch.zeros(param.numel(), dtype=g.dtype, device=g.device) if r is None else r.reshape(-1)
    )


def hvp_function(loss: Tensor, param: Tensor) -> Callable[[Tensor], Tensor]:
    """v (P,) -> H v for a scalar ``loss`` of leaf ``param`` (the graph is kept for reuse)."""
    if not loss.requires_grad:
        return lambda v: torch.zeros_like(v, dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, param, create_graph=True)
    g = g.reshape(-1)
    if not g.requires_grad:
        return lambda v: torch.zeros_like(v, dtype=torch.float64)

    def hvp(v: Tensor) -> Tensor:
        return _grad_or_zero(g, param, v.to(g.dtype).to(g.device)).detach().double().cpu()

    return hvp


def exact_hessian(fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """Hessian (P, P) of a scalar function of a flat vector at ``theta`` (float64)."""
    x = theta.detach().clone().requires_grad_(True)
    return hessian_of(fn(x), x)


def lanczos(
    hvp: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    generator: torch.Generator | None = None,
    breakdown_tol: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalisation on a symmetric operator given by ``hvp``.

    Args:
        hvp: v (n,) float64 -> H v (n,).
        n: dimension; k: number of iterations (at most n).
        generator: seeds the random start vector.
        breakdown_tol: stop when the next residual norm falls below this times the largest
            |α|, |β| seen (the Krylov space is invariant: its Ritz values are exact).

    Returns:
        Ritz values (m,) ascending and Ritz vectors (n, m) as columns, m <= k (float64).
    """
    k = max(1, min(k, n))
    q = torch.randn(n, generator=generator, dtype=torch.float64)
    q = q / q.norm()
    Q = [q]
    alphas, betas = [], []
    scale = 0.0
    for j in range(k):
        w = hvp(Q[j]).double()
        a = float(w @ Q[j])
        alphas.append(a)
        Qm = torch.stack(Q, 1)
        for _ in range(2):  # classical Gram-Schmidt twice against every Lanczos vector
            w = w - Qm @ (Qm.T @ w)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        if j == k - 1 or b <= breakdown_tol * max(scale, 1e-300):
            break
        betas.append(b)
        Q.append(w / b)
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    evals, S = torch.linalg.eigh(T)
    return evals, torch.stack(Q[:m], 1) @ S


def condition_number(eigenvalues: Tensor | np.ndarray, rel_tol: float = 1e-6) -> dict[str, float]:
    """κ = λmax / λmin+ with λmin+ the smallest eigenvalue above ``rel_tol * λmax``.

    Returns lambda_max, lambda_min_pos, kappa (NaN when there is no positive eigenvalue),
    n_null (|λ| <= rel_tol λmax) and n_negative (λ < -rel_tol λmax).
    """
    ev = np.asarray(eigenvalues, dtype=np.float64)
    lmax = float(ev.max()) if ev.size else math.nan
    if not ev.size or not lmax > 0:
        return {"lambda_max": lmax, "lambda_min_pos": math.nan, "kappa": math.nan,
                "n_null": int(ev.size), "n_negative": int((ev < 0).sum())}  # fmt: skip
    thr = rel_tol * lmax
    pos = ev[ev > thr]
    lmin = float(pos.min())
    return {
        "lambda_max": lmax,
        "lambda_min_pos": lmin,
        "kappa": lmax / lmin,
        "n_null": int((np.abs(ev) <= thr).sum()),
        "n_negative": int((ev < -thr).sum()),
    }


def quadratic_fit(alpha: np.ndarray, beta: np.ndarray, value: np.ndarray) -> dict[str, float]:
    """Least-squares z = c0 + c1 a + c2 b + c3 a^2 + c4 ab + c5 b^2 over a surface.

    Returns r2 (NaN for a surface without variation), curvature_alpha = 2 c3,
    curvature_beta = 2 c5, curvature_ratio = curvature_beta / curvature_alpha, and range.
    """
    a, b, z = (np.asarray(x, dtype=np.float64).ravel() for x in (alpha, beta, value))
    X = np.stack([np.ones_like(a), a, b, a * a, a * b, b * b], 1)
    coef, *_ = np.linalg.lstsq(X, z, rcond=None)
    resid = z - X @ coef
    ss_tot = float(((z - z.mean()) ** 2).sum())
    scale = max(float(np.abs(z).max()), 1e-300)
    r2 = (
        1.0 - float((resid**2).sum()) / ss_tot
        if ss_tot > (1e-12 * scale) ** 2 * z.size
        else math.nan
    )
    ca, cb = 2 * float(coef[3]), 2 * float(coef[5])
    return {
        "r2": r2,
        "curvature_alpha": ca,
        "curvature_beta": cb,
        "curvature_ratio": cb / ca if ca != 0 else math.nan,
        "range": float(z.max() - z.min()),
    }


def _canonical_sign(v: Tensor) -> Tensor:
    """Fix an eigenvector's sign (largest-magnitude entry positive) for reproducible axes."""
    i = int(v.abs().argmax())
    return v if v[i] >= 0 else -v


# --------------------------------------------------------------------------------------------
# The objective: the three losses as functions of one parameter block


@dataclass
class View:
    """One evaluation view with its fixed rotations: labels, batch, R (K, B, 3, 3), exhaustive."""

    labels: dict
    batch: Batch
    R: Tensor
    exhaustive: bool


def default_block(model: nn.Module) -> str:
    """The first of DEFAULT_BLOCKS the model has (the output head's final Linear weight)."""
    names = dict(model.named_parameters())
    for name in DEFAULT_BLOCKS:
        if name in names:
            return name
    raise ValueError(
        f"{type(model).__name__} has none of the default blocks {list(DEFAULT_BLOCKS)}; name "
        f"one with the landscape's 'param' key (e.g. one of {list(names)[-5:]})"
    )


def _cast_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def _label_match(labels: dict, wanted: dict | None) -> bool:
    if not wanted:
        return True
    for key, allowed in wanted.items():
        allowed = allowed if isinstance(allowed, list | tuple) else [allowed]
        if key not in labels or not any(_close(labels[key], a) for a in allowed):
            return False
    return True


def _close(a, b) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def make_views(
    task: Task,
    batches: Iterable[Batch],
    k: int,
    generator: torch.Generator,
    rotations: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    labels: dict | None = None,
) -> list[View]:
    """Evaluation views with every random choice fixed, drawn in the training evaluation's order.

    Per batch: ``task.eval_views(batch, generator)``, then per view K
    rotations per example from the same generator (as ``decompose`` draws them), or a finite
    set applied exhaustively (``rotations`` (G, 3, 3), or the task's ``rotation_set(labels)``).
    ``labels`` keeps only views whose labels match (e.g. {"t": [0.2, 0.9]}).
    """
    out = []
    for batch in batches:
        for lab, view in task.eval_views(batch, generator):
            group = rotations if rotations is not None else task.rotation_set(lab)
            R = example_rotations(task.num_examples(view), k, generator, group, dtype=dtype)
            if _label_match(lab, labels):
                out.append(
                    View(dict(lab), _cast_batch(view, dtype), R.contiguous(), group is not None)
                )
    if not out:
        raise ValueError(f"no evaluation view matches labels {labels}")
    return out


class BlockObjective:
    """L_total, L_mean, L_equiv (unbiased, per element) as functions of one parameter block.

    Works on a deep copy of the model (cast to ``dtype``, eval mode, only the block trainable),
    so the caller's model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        views: list[View],
        param: str | None = None,
        field: str | None = None,
        device_strategy: str = "auto",
        dtype: torch.dtype = torch.float64,
    ):
        self.task = task
        self.views = views
        self.field = field or task.primary_field
        self.device_strategy = device_strategy
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.param_name = param or default_block(self.model)
        params = dict(self.model.named_parameters())
        if self.param_name not in params:
            raise ValueError(
                f"parameter block {self.param_name!r} is not in the model; e.g. "
                f"{', '.join(list(params)[-4:])}"
            )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.param = params[self.param_name]
        self.param.requires_grad_(True)
        self.theta0 = self.param.detach().clone().reshape(-1)
        self.dtype = dtype
        self._n_elements: int | None = None

    @property
    def n_params(self) -> int:
        return self.param.numel()

    @property
    def n_elements(self) -> int:
        """Target elements (unmasked) summed over the views: the per-element denominator."""
        if self._n_elements is None:
            total = 0
            for v in self.views:
                y = self.task.target(v.batch)[self.field]
                mask = broadcast_mask(self._mask(v), y)
                total += y.numel() if mask is None else int(mask.sum())
            self._n_elements = total
        return self._n_elements

    def _mask(self, v: View) -> Tensor | None:
        return (self.task.element_mask(v.batch) or {}).get(self.field)

    @staticmethod
    def coefficients(v: View, k: int) -> tuple[float, float]:
        """(c_e, c_m): L_equiv = c_e E, L_mean = M - c_m E for this view's rotations."""
        return (1.0, 0.0) if v.exhaustive else (k / (k - 1), 1.0 / (k - 1))

    def set_block(self, theta: Tensor) -> None:
        with torch.no_grad():
            self.param.copy_(theta.reshape(self.param.shape).to(self.param.dtype))

    def reset(self) -> None:
        self.set_block(self.theta0)

    # --- predictions and losses ---------------------------------------------------------

    def view_predictions(self, v: View, grad: bool = False) -> Tensor:
        """Canonicalised predictions (K, *shape) of the objective's field for one view."""
        with torch.set_grad_enabled(grad):
            z = canonical_predictions(self.model, self.task, v.batch, v.R, self.device_strategy)
        return z[self.field]

    def predictions(self, views: list[View] | None = None, grad: bool = False):
        """Per view: (z (K, *shape), y, mask) for the objective's field."""
        out = []
        for v in views or self.views:
            y = self.task.target(v.batch)[self.field].detach()
            out.append((self.view_predictions(v, grad), y, self._mask(v)))
        return out

    def losses_from_predictions(
        self, preds, views: list[View] | None = None, n_elements: int | None = None
    ) -> dict[str, Tensor]:
        """The three unbiased per-element losses (0-dim tensors) from per-view predictions.

        ``n_elements`` defaults to the objective's total (so a subset of views gives its
        contribution); pass the subset's own count for its own per-element means.
        """
        total = mean = equiv = 0.0
        for v, (z, y, mask) in zip(views or self.views, preds):
            t, m, e, _ = decomposition_terms(z, y, mask)
            ce, cm = self.coefficients(v, z.shape[0])
            total = total + t
            equiv = equiv + ce * e
            mean = mean + m - cm * e
        n = n_elements or self.n_elements
        return {"total": total / n, "mean": mean / n, "equiv": equiv / n}

    def values(
        self, theta: Tensor | None = None, views: list[View] | None = None
    ) -> dict[str, float]:
        """The three losses at ``theta`` (default: the current block) over ``views`` (own means)."""
        if theta is not None:
            self.set_block(theta)
        views = views or self.views
        preds = self.predictions(views)
        n = sum(_count(y, m) for _, y, m in preds)
        return {k: float(v) for k, v in self.losses_from_predictions(preds, views, n).items()}

    # --- exact quadratic model (predictions affine in the block) --------------------------

    def jacobian(self, v: View, max_bytes: int = 1 << 28) -> tuple[Tensor, Tensor]:
        """z0 (K, *shape) and the Jacobian A (P, K, *shape) of one view's predictions at θ0.

        Forward mode (``torch.func.jvp`` vmapped over the P unit tangents): the rest of the
        network runs once per chunk of tangents, only the block's downstream is batched.
        """
        P = self.n_params
        shape = self.param.shape
        theta0 = self.theta0.to(self.param.device)

        def fn(theta: Tensor) -> Tensor:
            with swapped_parameter(self.model, self.param_name, theta.reshape(shape)):
                return self.view_predictions(v)

        with torch.no_grad():
            z0 = fn(theta0)
        per_tangent = z0.numel() * z0.element_size() * 4  # output and a few intermediates
        chunk = int(max(1, min(P, max_bytes // max(per_tangent, 1))))
        eye = torch.eye(P, dtype=theta0.dtype, device=theta0.device)
        cols = []
        for start in range(0, P, chunk):
            tangents = eye[start : start + chunk]
            cols.append(torch.func.vmap(lambda t: torch.func.jvp(fn, (theta0,), (t,))[1])(tangents))
        return z0, torch.cat(cols).detach()

    def quadratic_model(self, check_radius: float | None = None, seed: int = 0) -> Quadratic | None:
        """Exact value, gradient and Hessian of the three losses when predictions are affine.

        With z_k(θ0 + δ) = z0_k + A_kᵀ δ and squared error, every loss is exactly quadratic:
        T: (2/K) Σ_k A_k A_kᵀ, M: 2 Ā Āᵀ, E: (2/K) Σ_k (A_k - Ā)(A_k - Ā)ᵀ (per view, masked),
        combined with the view's unbiased coefficients and divided by n_elements. Sums are in
        float64 (Gram matrices: rounding of A enters the small eigenvalues only to second order).

        ``check_radius``: first test on the first view that a real forward at that distance
        matches the linear model (``affine_error``); returns None when it does not (then the
        block is not a final linear map and this model would be only Gauss-Newton).
        """
        P, n_el = self.n_params, self.n_elements
        value = {name: 0.0 for name in LOSSES}
        grad = {name: torch.zeros(P, dtype=torch.float64) for name in LOSSES}
        hess = {name: torch.zeros(P, P, dtype=torch.float64) for name in LOSSES}
        affine_error = None
        for idx, v in enumerate(self.views):
            z0, A = self.jacobian(v)
            if idx == 0 and check_radius is not None:
                affine_error = self.affine_error(z0, A, check_radius, seed)
                self.last_affine_error = affine_error
                if affine_error > self.affine_tolerance:
                    return None
            y = self.task.target(v.batch)[self.field].detach()
            w = broadcast_mask(self._mask(v), y)
            k = z0.shape[0]
            z0f = z0.reshape(k, -1).double()
            Af = A.reshape(P, k, -1).double()
            yf = y.reshape(-1).double()
            if w is not None:
                wf = w.reshape(-1).to(torch.float64)
                z0f, Af, yf = z0f * wf, Af * wf, yf * wf
            zbar = z0f.mean(0)
            Abar = Af.mean(1)
            dA = Af - Abar[:, None]
            dz = z0f - zbar
            t_val = float((yf - z0f).pow(2).sum()) / k
            m_val = float((yf - zbar).pow(2).sum())
            e_val = float(dz.pow(2).sum()) / k
            g_t = 2.0 / k * torch.einsum("pkn,kn->p", Af, z0f - yf)
            g_m = 2.0 * Abar @ (zbar - yf)
            g_e = 2.0 / k * torch.einsum("pkn,kn->p", dA, dz)
            flat = Af.reshape(P, -1)
            h_t = 2.0 / k * flat @ flat.T
            h_m = 2.0 * Abar @ Abar.T
            dflat = dA.reshape(P, -1)
            h_e = 2.0 / k * dflat @ dflat.T
            ce, cm = self.coefficients(v, k)
            for name, (val, g, h) in {
                "total": (t_val, g_t, h_t),
                "mean": (m_val - cm * e_val, g_m - cm * g_e, h_m - cm * h_e),
                "equiv": (ce * e_val, ce * g_e, ce * h_e),
            }.items():
                value[name] += val / n_el
                grad[name] += g.cpu() / n_el
                hess[name] += h.cpu() / n_el
        hess = {name: 0.5 * (h + h.T) for name, h in hess.items()}
        return Quadratic(value, grad, hess, affine_error)

    @property
    def affine_tolerance(self) -> float:
        """Largest ``affine_error`` taken as float rounding (100 x machine epsilon)."""
        return 1e2 * torch.finfo(self.dtype).eps

    def affine_error(self, z0: Tensor, A: Tensor, radius: float, seed: int = 0) -> float:
        """Deviation of a real forward at θ0 + δ (|δ| = radius, random direction) from the
        linear model z0 + Aᵀδ on the first view, relative to max|z0| + max|Aᵀδ|: a few machine
        epsilons iff the predictions are affine in the block."""
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(self.n_params, generator=g, dtype=torch.float64)
        d = radius * d / d.norm()
        try:
            self.set_block(self.theta0 + d.to(self.theta0))
            with torch.no_grad():
                z = self.view_predictions(self.views[0])
        finally:
            self.reset()
        lin = z0 + torch.einsum("p,p...->...", d.to(A), A)
        scale = float((lin - z0).abs().max()) + float(z0.abs().max())
        err = float((z - lin).abs().max())
        return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)

    # --- autograd curvature (any block) ------------------------------------------------------

    def _view_losses(self, v: View, grad: bool) -> dict[str, Tensor]:
        preds = [(self.view_predictions(v, grad), self.task.target(v.batch)[self.field].detach(),
                  self._mask(v))]  # fmt: skip
        return self.losses_from_predictions(preds, [v])

    def hessians(self) -> dict[str, Tensor]:
        """Hessians (P, P) of the three losses by double backward, accumulated view by view."""
        P = self.n_params
        H = {"mean": torch.zeros(P, P, dtype=torch.float64),
             "equiv": torch.zeros(P, P, dtype=torch.float64)}  # fmt: skip
        for v in self.views:
            L = self._view_losses(v, grad=True)
            for name in H:
                H[name] += hessian_of(L[name], self.param)
        return {"total": H["mean"] + H["equiv"], **H}

    def hvps(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Hessian-vector products of the three losses (one forward with graph per view and call)."""

        def make(names: tuple[str, ...]) -> Callable[[Tensor], Tensor]:
            def hvp(vec: Tensor) -> Tensor:
                out = torch.zeros(self.n_params, dtype=torch.float64)
                for v in self.views:
                    L = self._view_losses(v, grad=True)
                    loss = sum(L[n] for n in names)
                    out += hvp_function(loss, self.param)(vec)
                return out

            return hvp

        return {
            "total": make(("mean", "equiv")),
            "mean": make(("mean",)),
            "equiv": make(("equiv",)),
        }


def _count(y: Tensor, mask: Tensor | None) -> int:
    w = broadcast_mask(mask, y)
    return y.numel() if w is None else int(w.sum())


@contextmanager
def swapped_parameter(model: nn.Module, name: str, value: Tensor):
    """Temporarily make ``model.<name>`` the tensor ``value`` (e.g. a functorch tangent)."""
    *path, leaf = name.split(".")
    module = model.get_submodule(".".join(path))
    old = module._parameters[leaf]
    module._parameters[leaf] = value
    try:
        yield
    finally:
        module._parameters[leaf] = old


@dataclass
class Quadratic:
    """Exact second-order model of the three losses at θ0: value, gradient (P,), Hessian (P, P).

    ``affine_error``: the affinity check on the first view (None when not checked).
    """

    value: dict[str, float]
    grad: dict[str, Tensor]
    hess: dict[str, Tensor]
    affine_error: float | None = None

    def at(self, name: str, deltas: Tensor) -> Tensor:
        """Loss ``name`` at θ0 + δ for each row δ of ``deltas`` (n, P)."""
        d = deltas.double()
        return self.value[name] + d @ self.grad[name] + 0.5 * ((d @ self.hess[name]) * d).sum(1)


# --------------------------------------------------------------------------------------------
# Spectra and grids


@dataclass
class Spectrum:
    eigenvalues: Tensor  # ascending (m,)
    eigenvectors: Tensor  # (P, m) columns
    method: str  # "exact" | "lanczos"

    def axes(self, rel_tol: float) -> tuple[Tensor, Tensor] | None:
        """Unit eigenvectors of λmin+ and λmax (sign-fixed), or None without a positive one."""
        c = condition_number(self.eigenvalues, rel_tol)
        if not c["lambda_max"] > 0:
            return None
        ev = self.eigenvalues
        i_max = int(torch.argmax(ev))
        positive = torch.nonzero(ev > rel_tol * c["lambda_max"]).flatten()
        i_min = int(positive[torch.argmin(ev[positive])])
        u = self.eigenvectors[:, i_min]
        v = self.eigenvectors[:, i_max]
        return _canonical_sign(u / u.norm()), _canonical_sign(v / v.norm())


def spectra(
    objective: BlockObjective,
    exact_max: int = 2000,
    lanczos_k: int = 64,
    seed: int = 0,
    quad: Quadratic | None = None,
) -> dict[str, Spectrum]:
    """Eigen-decomposition of each loss's Hessian with respect to the block at θ0.

    From the exact quadratic model when given; else exact by double backward (full matrix)
    when the block has at most ``exact_max`` entries; else ``lanczos_k`` Lanczos iterations with
    full reorthogonalisation (Ritz pairs: λmax converges first, λmin+ is only an estimate).
    """
    if quad is not None or objective.n_params <= exact_max:
        hess = quad.hess if quad is not None else objective.hessians()
        out = {}
        for name, H in hess.items():
            ev, vecs = torch.linalg.eigh(H)
            out[name] = Spectrum(ev, vecs, "exact")
        return out
    out = {}
    for i, (name, hvp) in enumerate(objective.hvps().items()):
        gen = torch.Generator().manual_seed(seed + i)
        ev, vecs = lanczos(hvp, objective.n_params, lanczos_k, gen)
        out[name] = Spectrum(ev, vecs, "lanczos")
    return out


def grid_offsets(n: int, step: float) -> np.ndarray:
    """n offsets symmetric about 0 with spacing ``step``: (i - (n-1)/2) * step."""
    return (np.arange(n) - (n - 1) / 2) * step


def surface(
    objective: BlockObjective,
    u: Tensor,
    v: Tensor,
    n: int = 20,
    step: float = 0.00164,
    resample: Callable[[int], list[View]] | None = None,
    quad: Quadratic | None = None,
) -> dict[str, np.ndarray]:
    """All three losses on the grid θ0 + α u + β v, α, β in ``grid_offsets(n, step)``.

    From the exact quadratic model when given (predictions affine in the block, verified by
    the caller) and the randomness is fixed; otherwise every point is evaluated (one forward
    per view and rotation), with ``resample(point_index) -> views`` redrawing the randomness.

    Returns alpha, beta, i, j (n*n,) and one (n*n,) array per loss; "method".
    """
    offs = grid_offsets(n, step)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    a = torch.as_tensor(offs[ii], dtype=torch.float64)
    b = torch.as_tensor(offs[jj], dtype=torch.float64)
    out = {"alpha": offs[ii], "beta": offs[jj], "i": ii, "j": jj}
    if quad is not None and resample is None:
        deltas = a[:, None] * u.double()[None] + b[:, None] * v.double()[None]
        for name in LOSSES:
            out[name] = quad.at(name, deltas).numpy()
        out["method"] = "quadratic"
        return out
    vals = {name: np.empty(n * n) for name in LOSSES}
    theta0 = objective.theta0
    try:
        for idx in range(n * n):
            views = resample(idx) if resample is not None else None
            theta = theta0 + float(a[idx]) * u.to(theta0) + float(b[idx]) * v.to(theta0)
            L = objective.values(theta, views)
            for name in LOSSES:
                vals[name][idx] = L[name]
    finally:
        objective.reset()
    return {**out, **vals, "method": "resampled" if resample is not None else "evaluated"}


def run_landscape(
    objective: BlockObjective,
    *,
    n: int = 20,
    step: float | None = None,
    exact_max: int = 2000,
    lanczos_k: int = 64,
    rel_tol: float = 1e-6,
    seed: int = 0,
    resample: Callable[[int], list[View]] | None = None,
    planes: Iterable[str] = LOSSES,
    autograd_objective: Callable[[], BlockObjective] | None = None,
) -> dict:
    """Spectra, κ table, grids and quadratic fits for one objective (plain Python/NumPy results).

    Curvature route: blocks with at most ``exact_max`` entries first try the exact quadratic
    model (forward-mode Jacobian; used when a real forward at the grid's corner distance
    matches the linearised predictions to float precision, i.e. the block is a final linear
    map such as the force head or the decoder); otherwise double-backward Hessians, or Lanczos
    for larger blocks, and grids evaluated point by point.

    ``autograd_objective()`` supplies the objective for the autograd route when the quadratic
    one does not apply (e.g. the same views in float64 when ``objective`` runs in float32).

    Grids: for each loss in ``planes`` with a positive eigenvalue, the plane of ITS OWN
    (λmin+, λmax) eigenvectors ("axes" = that loss) with all three losses evaluated on it; the
    study's view is axes == "equiv" (L_mean and L_equiv both on L_equiv's axes).

    Returns dict with "spectrum", "kappa", "grid", "fit" rows, "axes" {loss: (u, v) numpy},
    "surface_method" {loss: str}, "centre" {loss: value}, "step", "curvature" (route),
    "affine_error".
    """
    step = step if step is not None else DEFAULT_STEPS.get(objective.param_name, 1e-3)
    planes = [p for p in LOSSES if p in set(planes)]
    objective.reset()
    quad, affine_error, route = None, None, None
    if objective.n_params <= exact_max:
        # far enough out that a nonlinear block shows its curvature well above float rounding
        grid_radius = float(np.hypot(*([grid_offsets(n, step)[-1]] * 2))) if n > 1 else step
        radius = max(10 * grid_radius, 0.1 * float(objective.theta0.norm()), 1e-3)
        try:
            quad = objective.quadratic_model(radius, seed)
            affine_error = getattr(objective, "last_affine_error", None)
            if quad is None:
                route = "autograd (predictions not affine in the block)"
        except (RuntimeError, NotImplementedError, ValueError) as e:
            warnings.warn(
                f"landscape: forward-mode Jacobian failed ({e}); using autograd", stacklevel=2
            )
            route = "autograd (forward-mode Jacobian failed)"
    if quad is None and autograd_objective is not None:
        objective = autograd_objective()
    route = "quadratic (affine predictions)" if quad is not None else (
        route or ("autograd" if objective.n_params <= exact_max else "lanczos")
    )  # fmt: skip
    centre = dict(quad.value) if quad is not None else objective.values()
    spec = spectra(objective, exact_max, lanczos_k, seed, quad)
    objective.reset()
    spectrum_rows, kappa_rows, grid_rows, fit_rows = [], [], [], []
    axes, methods = {}, {}
    for name in LOSSES:
        sp = spec[name]
        c = condition_number(sp.eigenvalues, rel_tol)
        for idx, lam in enumerate(sp.eigenvalues.tolist()):
            spectrum_rows.append(
                {"loss": name, "index": idx, "eigenvalue": lam, "method": sp.method}
            )
        kappa_rows.append({"loss": name, **c, "rel_tol": rel_tol, "n_eigenvalues": int(sp.eigenvalues.numel()),
                           "method": sp.method, "value": centre[name]})  # fmt: skip
        if name not in planes:
            continue
        ax = sp.axes(rel_tol)
        if ax is None:
            warnings.warn(
                f"L_{name} has no positive curvature here; no grid on its axes", stacklevel=2
            )
            continue
        u, v = ax
        axes[name] = (u.numpy(), v.numpy())
        surf = surface(objective, u, v, n, step, resample, quad)
        methods[name] = surf["method"]
        for loss in LOSSES:
            for idx in range(n * n):
                grid_rows.append({"axes": name, "loss": loss, "i": int(surf["i"][idx]),
                                  "j": int(surf["j"][idx]), "alpha": float(surf["alpha"][idx]),
                                  "beta": float(surf["beta"][idx]), "value": float(surf[loss][idx])})  # fmt: skip
            fit = quadratic_fit(surf["alpha"], surf["beta"], surf[loss])
            fit_rows.append({"axes": name, "loss": loss, **fit})
    return {"spectrum": spectrum_rows, "kappa": kappa_rows, "grid": grid_rows, "fit": fit_rows,
            "axes": axes, "surface_method": methods, "centre": centre, "step": step,
            "curvature": route, "affine_error": affine_error}  # fmt: skip
