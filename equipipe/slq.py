"""Spectral density of a Hessian by stochastic Lanczos quadrature (SLQ), and κ as a function
of the eigenvalue threshold.

Why: on a nonlinear block (e.g. the study's ``force_head.ffn.up.weight``) the Hessian is
indefinite with a dense spectrum near zero, so the smallest positive eigenvalue, and with it
κ = λmax / λmin+, is set by whatever cut-off defines "positive" (κ ≈ 1 / rel_tol). The whole
spectral density, and κ drawn against the threshold, say what a single κ cannot.

Method (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019). For a symmetric H (n x n)
given by products v -> H v, each of ``n_probes`` Rademacher vectors v (scaled to |v| = 1)
starts ``n_steps`` Lanczos iterations with full reorthogonalisation; the eigenpairs
(θ_i, s_i) of the tridiagonal matrix are the Gauss quadrature of v's spectral measure:
v^T f(H) v ≈ Σ_i (s_i[0])^2 f(θ_i). Averaged over probes this estimates tr f(H) / n
(Hutchinson), so the nodes θ with weights w = s[0]^2 / n_probes are a discrete estimate of the
spectral density φ(λ) = (1/n) Σ_j δ(λ - λ_j): the weights sum to 1.

Derived quantities (the same definitions on exact eigenvalues, ``Density.exact``):

* ``count_above(τ)``: number of eigenvalues above τ·λmax, n Σ w 1[θ > τ λmax] (its standard
  error is the spread over probes / sqrt(n_probes));
* ``kappa(τ)`` = λmax / λmin(τ), with λmin(τ) the smallest eigenvalue above τ·λmax (the usual
  κ at ``rel_tol = τ``); from SLQ the median over probes of the smallest Ritz value above it;
* ``resolution(τ)``: the eigenvalue count carried by the quadrature node nearest τ·λmax, to
  which ``count_above(τ)`` (and so κ(τ)) is resolved. Gauss nodes are spaced about
  (λmax - λmin) / n_steps inside the spectrum (finer near its ends), so in the dense part of an
  indefinite spectrum around zero a threshold falls inside one node's weight: counts there are
  known only to that, and κ(τ) is reported as unresolved;
* ``smoothed(grid, width)``: the density convolved with a Gaussian of ``width`` (for plots).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where Lanczos runs: Density (numpy) serves the figures
    import torch
    from torch import Tensor

__all__ = ["Density", "lanczos_tridiagonal", "slq"]


def lanczos_tridiagonal(
    hvp: Callable[[Tensor], Tensor], v0: Tensor, n_steps: int, breakdown_tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos from a given start vector, full reorthogonalisation.

    Args:
        hvp: v (n,) float64 -> H v (n,) float64, H symmetric.
        v0: (n,) start vector (normalised here).
        n_steps: iterations (at most n); stops early when the Krylov space is invariant.

    Returns:
        (alphas (m,), betas (m - 1,)) float64: the tridiagonal matrix, m <= n_steps.
    """
    n = v0.numel()
    q = v0.double().reshape(-1)
    q = q / q.norm()
    import torch

    Q = torch.empty(n, max(1, min(n_steps, n)), dtype=torch.float64)
    Q[:, 0] = q
    alphas, betas = [], []
    scale = 0.0
    for j in range(Q.shape[1]):
        w = hvp(Q[:, j]).double().reshape(-1)
        a = float(w @ Q[:, j])
        alphas.append(a)
        Qj = Q[:, : j + 1]
        for _ in range(2):  # classical Gram-Schmidt twice against every Lanczos vector
            w = w - Qj @ (Qj.T @ w)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        if j == Q.shape[1] - 1 or b <= breakdown_tol * max(scale, 1e-300):
            break
        betas.append(b)
        Q[:, j + 1] = w / b
    return np.asarray(alphas), np.asarray(betas[: len(alphas) - 1])


@dataclass
class Density:
    """A discrete spectral density: nodes with weights (one row per probe).

    Attributes:
        nodes: (P, m) float64 Ritz values per probe (NaN-padded where a probe stopped early).
        weights: (P, m) float64 quadrature weights / P (sum over everything = 1).
        n: dimension of the operator (number of eigenvalues).
        method: "slq" or "exact" (P = 1, the eigenvalues with weight 1/n each).
    """

    nodes: np.ndarray
    weights: np.ndarray
    n: int
    method: str = "slq"

    @classmethod
    def exact(cls, eigenvalues) -> Density:
        """The density of known eigenvalues (n,): every one a node of weight 1/n."""
        ev = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
        return cls(ev[None, :], np.full((1, ev.size), 1.0 / ev.size), int(ev.size), "exact")

    @property
    def n_probes(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def lambda_max(self) -> float:
        """Largest node (Lanczos converges to the extreme eigenvalues first)."""
        return float(np.nanmax(self.nodes))

    @property
    def lambda_min(self) -> float:
        return float(np.nanmin(self.nodes))

    def count_above(self, thresholds) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues above τ·λmax for each relative threshold τ (T,), and their SE (T,)
        over probes (NaN for a single probe / exact)."""
        tau = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        cut = tau[:, None, None] * self.lambda_max
        above = np.where(np.isfinite(self.nodes), self.nodes, -np.inf)[None] > cut
        per_probe = (above * np.nan_to_num(self.weights)[None]).sum(-1) * self.n_probes * self.n
        count = per_probe.mean(1)
        if self.n_probes < 2:
            return count, np.full(tau.size, math.nan)
        return count, per_probe.std(1, ddof=1) / math.sqrt(self.n_probes)

    def resolution(self, thresholds) -> np.ndarray:
        """How many eigenvalues the estimate of ``count_above(τ)`` is resolved to, per τ (T,):
        the eigenvalue count carried by each probe's quadrature node nearest τ·λmax (a step
        at the threshold is integrated to within that node's weight), mean over probes. Where
        the spectrum is dense around the threshold this is large (tens of eigenvalues for a
        node near zero), and counts and κ(τ) there are known only to it; 0 for ``exact``."""
        tau = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        if self.method == "exact":
            return np.zeros(tau.size)
        out = np.zeros(tau.size)
        for p in range(self.n_probes):
            ok = np.isfinite(self.nodes[p])
            nodes, w = self.nodes[p][ok], self.weights[p][ok] * self.n_probes * self.n
            near = np.abs(nodes[None, :] - tau[:, None] * self.lambda_max).argmin(1)
            out += w[near]
        return out / self.n_probes

    def fraction_negative(self, rel: float = 0.0) -> float:
        """Share of the spectrum below -rel·λmax."""
        ok = np.isfinite(self.nodes)
        neg = ok & (np.where(ok, self.nodes, 0.0) < -rel * self.lambda_max)
        return float((np.nan_to_num(self.weights) * neg).sum())

    def kappa(self, thresholds) -> np.ndarray:
        """κ(τ) = λmax / λmin(τ) for each relative threshold τ (T,); NaN where no eigenvalue
        lies above τ·λmax. λmin(τ): per probe the smallest Ritz value above τ·λmax (Lanczos
        converges to the exterior eigenvalues, whatever their quadrature weight), median over
        probes; on exact eigenvalues the smallest eigenvalue above the threshold."""
        tau = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        lmax = self.lambda_max
        out = np.full(tau.size, math.nan)
        for i, t in enumerate(tau):
            mins = []
            for p in range(self.n_probes):
                nodes = self.nodes[p][np.isfinite(self.nodes[p])]
                above = nodes[nodes > t * lmax]
                if above.size:
                    mins.append(float(above.min()))
            if mins:
                out[i] = lmax / float(np.median(mins))
        return out

    def smoothed(self, grid, width: float) -> np.ndarray:
        """Density on ``grid`` (G,) convolved with a Gaussian of standard deviation ``width``
        (integrates to about 1 over a grid covering the spectrum)."""
        x = np.asarray(grid, dtype=np.float64)[:, None]
        ok = np.isfinite(self.nodes)
        nodes, w = self.nodes[ok][None], self.weights[ok][None]
        k = np.exp(-0.5 * ((x - nodes) / width) ** 2) / (width * math.sqrt(2 * math.pi))
        return (k * w).sum(1)


def slq(
    hvp: Callable[[Tensor], Tensor],
    n: int,
    n_probes: int = 8,
    n_steps: int = 40,
    generator: torch.Generator | None = None,
) -> Density:
    """Stochastic Lanczos quadrature of the operator ``hvp`` of dimension ``n``.

    Args:
        hvp: v (n,) float64 -> H v (n,) float64, H symmetric.
        n: dimension (number of parameters of the block).
        n_probes: Rademacher start vectors.
        n_steps: Lanczos iterations per probe (nodes per probe; at most n).
        generator: seeds the probes.

    Returns:
        Density with (n_probes, n_steps) nodes and weights.
    """
    import torch

    m = max(1, min(n_steps, n))
    nodes = np.full((n_probes, m), np.nan)
    weights = np.zeros((n_probes, m))
    for p in range(n_probes):
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
        a, b = lanczos_tridiagonal(hvp, v.double(), m)
        T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
        theta, S = np.linalg.eigh(T)
        nodes[p, : theta.size] = theta
        weights[p, : theta.size] = S[0] ** 2 / n_probes
    return Density(nodes, weights, int(n), "slq")
