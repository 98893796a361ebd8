"""Where the equivariance error lives: its spectrum over the irreducible representations of SO(3).

Setting (PAPER.md). For one input x the canonicalised prediction z(g) = g^-1 f(g x) is a
function on SO(3) with values in the output space V (all output elements of the example,
flattened; ⟨·,·⟩ is the sum of products over them). Its power is ||z||^2 = ∫ |z(g)|^2 dg
(Haar measure). By Peter-Weyl, L^2(SO(3), V) is the orthogonal sum of the isotypic components
ℓ = 0, 1, 2, ... (spans of the Wigner D-matrix entries D^ℓ_mn), and the orthogonal projector onto
component ℓ is convolution with d_ℓ χ_ℓ (d_ℓ = 2ℓ+1, χ_ℓ the character, real for SO(3)):

    (Π_ℓ z)(g) = d_ℓ ∫ χ_ℓ(h^-1 g) z(h) dh,
    P_ℓ := ||Π_ℓ z||^2 = d_ℓ ∫∫ ⟨z(g), z(h)⟩ χ_ℓ(g^-1 h) dg dh,           Σ_ℓ P_ℓ = ||z||^2.

χ_ℓ depends only on the rotation angle θ: χ_ℓ(θ) = sin((2ℓ+1)θ/2) / sin(θ/2)
= 1 + 2 Σ_{m=1..ℓ} cos(mθ) (the cosine sum is used: it has no 0/0 at θ = 0; it equals the
trace of e3nn's ``wigner_D``, which the tests check).

* ℓ = 0: Π_0 z = ∫ z = f̄(x), the twirled prediction; P_0 = |f̄(x)|^2.
* ℓ ≥ 1: Σ_{ℓ≥1} P_ℓ = ||z||^2 - |f̄|^2 = E_g |z(g) - f̄|^2, the equivariance error
  L_equiv of this example (PAPER.md); P_ℓ is the part of it at angular frequency ℓ.
  The error (y - z) has the same ℓ ≥ 1 components (y does not depend on g): the spectrum of
  the ERROR's equivariance part is the spectrum of z at ℓ ≥ 1.

Estimators from the K canonicalised predictions the evaluation already made
(``equivariance.decompose``: K Haar rotations g_1..g_K drawn independently PER EXAMPLE, so
every example has its own relative rotations g_i^-1 g_j; nothing here needs a forward pass).
Write G_ij = ⟨z_i, z_j⟩, χ_ij = χ_ℓ(g_i^-1 g_j), S = mean_k G_kk.

    P̂_0 = mean_{i≠j} G_ij                         unbiased for |f̄|^2 (independent draws)
    E_unb = S - P̂_0                                exactly decompose's K/(K-1) · E (algebra:
                                                   Σ_k |z_k - z̄|^2/(K-1) = S - mean_{i≠j} G_ij)
    P̂_ℓ = d_ℓ mean_{i≠j} ⟨z_i - m_ij, z_j - m_ij⟩ χ_ij   (ℓ ≥ 1, K ≥ 3)
    R̂ = E_unb - Σ_{ℓ=1..ℓmax} P̂_ℓ                  remainder: power above ℓmax

where m_ij is the mean of the OTHER K-2 predictions (k ∉ {i, j}). Derivation of E[P̂_ℓ] = P_ℓ:
the plain pair statistic d_ℓ mean_{i≠j} G_ij χ_ij is already unbiased (E[G_ij χ_ij] is the
double integral above, g_i and g_j independent), but its variance carries |f̄|^2 — the large
twirled part leaks noise into every ℓ. Centring each pair by m_ij removes it without bias:
m_ij is independent of (g_i, g_j); for ℓ ≥ 1 and fixed g_i the relative rotation g_i^-1 g_j is
Haar, so E[χ_ij | g_i] = ∫ χ_ℓ = 0, hence E[⟨z_i, m⟩ χ_ij] = E[⟨m, z_j⟩ χ_ij] = E[|m|^2 χ_ij] = 0
and only E[G_ij χ_ij] = P_ℓ / d_ℓ survives. An invariant (constant) z gives z_i - m_ij = 0, so
every ℓ ≥ 1 is zero exactly, not only on average. The centred pair products are computed from
the Gram matrix G alone (``_centred_pairs``).

So per example, exactly (not only in expectation):

    S = P̂_0 + E_unb,     E_unb = Σ_{ℓ=1..ℓmax} P̂_ℓ + R̂,

with every term unbiased; for z band-limited to ℓmax, E[R̂] = 0. Sums over examples divided by
the number of output elements give per-element values in the units of ``decompose``'s
per-element E_unb (same elements, same mask). Standard errors are over examples (units).

Exhaustive finite rotation sets (every example evaluated at all elements of a finite group G,
or of a left coset g_0 G): the V-statistic over ALL pairs, P_ρ = d_ρ/|G|^2 Σ_{g,h} G_gh χ_ρ(g^-1 h),
is the exact projection of z restricted to G onto the isotypic component of the G-irrep ρ, and
Σ_ρ P_ρ = S exactly (Σ_ρ d_ρ χ_ρ is |G| at the identity, 0 elsewhere); no remainder.

* Octahedral group O (24 rotations; the voxel task's exact evaluation): five irreps A1, A2, E,
  T1, T2 (dimensions 1, 1, 2, 3, 3) replace ℓ, with the character table ``OCTAHEDRAL_CHARACTERS``
  over the classes identity, 8 C3 (120°), 3 C2 (180° about a cube axis), 6 C4 (90°), 6 C2'
  (180° about a face diagonal). A1 is the twirled (group-averaged) part, "mean"; A2 + E + T1 + T2
  is the octahedral equivariance error (= decompose's exhaustive E). ℓ branches into O as
  (``branching``):  0 → A1;  1 → T1;  2 → E + T2;  3 → A2 + T1 + T2;  4 → A1 + E + T1 + T2;
  5 → E + 2 T1 + T2;  6 → A1 + A2 + E + T1 + 2 T2.  So the A1 part of ℓ = 4 (and 6, ...) is
  invariant under O and counted as "mean" there: octahedral evaluation cannot see it. Probe only
  full-resolution grids: coarse U-Net levels sit half a voxel off the grid centre, where the 24
  voxel permutations are not the rotations.
* Icosahedral group I (60 rotations, ``icosahedral_rotations``): its averages of D^L vanish for
  L = 1..5, so the V-statistic with SO(3) characters is an EXACT quadrature of P_ℓ for z
  band-limited to B ≤ 2 and every ℓ ≤ 5 - B (Π_ℓ z by the 60-point quadrature is exact when
  ℓ + B ≤ 5, and ⟨z, Π_ℓ z⟩ then has band ≤ 2B ≤ 4), and for a single-irrep z = D^ℓ'(g) v
  whenever ℓ + ℓ' ≤ 5 (⟨z_g, z_h⟩ depends on g^-1 h only). Tests and probes of features that must
  land "exactly" in one ℓ use it; above those bands the 60 points alias.

A closed form (derived, tested): the EScAIP-like direct force head on an invariant backbone gives
z_i(g) = m_i Σ_j g^T diag(W h_ij) g r̂_ij. g^T A g for a symmetric A is ℓ = 0 (tr A / 3 · I) plus
ℓ = 2 (the traceless part), so that model's force equivariance error is pure ℓ = 2, at every step
and for every W; P_1 = P_3 = ... = 0.

Hidden features: the same estimators applied to g ↦ h(g x) (no canonicalisation: a hidden
feature has no group action of its own in a non-equivariant model), reported as shares
P_ℓ / S of the feature's power. ℓ ≥ 1 content there is not a defect: a feature that carries a
vector (e3nn's ℓ = 1 channels, a trunk that must predict velocities) is ℓ = 1 by design.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from equipipe.so3 import rotation_angle

OCTAHEDRAL_IRREPS: tuple[str, ...] = ("A1", "A2", "E", "T1", "T2")
OCTAHEDRAL_DIMS: dict[str, int] = {"A1": 1, "A2": 1, "E": 2, "T1": 3, "T2": 3}
OCTAHEDRAL_CLASSES: tuple[str, ...] = ("E", "8C3", "3C2", "6C4", "6C2'")
OCTAHEDRAL_CLASS_SIZES: tuple[int, ...] = (1, 8, 3, 6, 6)
# rows: irreps (A1, A2, E, T1, T2); columns: classes (E, 8C3, 3C2, 6C4, 6C2')
OCTAHEDRAL_CHARACTERS: dict[str, tuple[int, ...]] = {
    "A1": (1, 1, 1, 1, 1),
    "A2": (1, 1, 1, -1, -1),
    "E": (2, -1, 2, 0, 0),
    "T1": (3, 0, -1, 1, -1),
    "T2": (3, 0, -1, -1, 1),
}
OCTAHEDRAL_MEAN = "A1"


# --------------------------------------------------------------------------- characters


def character(ell: int, theta: Tensor) -> Tensor:
    """SO(3) character χ_ℓ(θ) = 1 + 2 Σ_{m=1..ℓ} cos(mθ) = sin((2ℓ+1)θ/2)/sin(θ/2).

    Args:
        ell: irrep degree ℓ >= 0.
        theta: rotation angles (...,) in radians.

    Returns:
        Tensor (...,) of χ_ℓ(θ), same dtype as ``theta``.
    """
    out = torch.ones_like(theta)
    for m in range(1, ell + 1):
        out = out + 2 * torch.cos(m * theta)
    return out


def relative_rotations(R: Tensor) -> Tensor:
    """Per-example relative rotations g_i^-1 g_j: R (K, B, 3, 3) -> (B, K, K, 3, 3)."""
    Rb = R.transpose(0, 1)  # (B, K, 3, 3)
    return torch.einsum("bkji,bljm->bklim", Rb, Rb)


def octahedral_class(R: Tensor) -> Tensor:
    """Conjugacy class index (into ``OCTAHEDRAL_CLASSES``) of octahedral rotations R (..., 3, 3).

    Angle 0 -> E, 120° -> C3, 90° -> C4; 180° about a coordinate axis (R diagonal) -> C2,
    otherwise (face diagonal) -> C2'. Raises if R is not a signed permutation matrix.
    """
    Rr = R.round()
    if not torch.allclose(R, Rr, atol=1e-4):
        raise ValueError("octahedral_class: a rotation is not a signed permutation matrix")
    trace = Rr.diagonal(dim1=-2, dim2=-1).sum(-1).round().long()  # 3, 0, -1, 1 (1 + 2cosθ)
    diagonal = (Rr - torch.diag_embed(Rr.diagonal(dim1=-2, dim2=-1))).abs().sum((-1, -2)) == 0
    cls = torch.full(trace.shape, -1, dtype=torch.long, device=R.device)
    cls[trace == 3] = 0
    cls[trace == 0] = 1
    cls[(trace == -1) & diagonal] = 2
    cls[trace == 1] = 3
    cls[(trace == -1) & ~diagonal] = 4
    if (cls < 0).any():
        raise ValueError("octahedral_class: a rotation is not in the octahedral group")
    return cls


def octahedral_character(irrep: str, R: Tensor) -> Tensor:
    """χ_ρ(R) of the octahedral irrep ``irrep`` for octahedral rotations R (..., 3, 3)."""
    table = torch.tensor(OCTAHEDRAL_CHARACTERS[irrep], dtype=torch.float64, device=R.device)
    return table[octahedral_class(R)]


def branching(ell: int) -> dict[str, int]:
    """Multiplicity of each octahedral irrep in the restriction of SO(3)'s ℓ to O.

    Computed from characters: m_ρ = (1/24) Σ_classes |class| χ_ρ(class) χ_ℓ(angle of class).
    """
    angles = torch.tensor(
        [0.0, 2 * math.pi / 3, math.pi, math.pi / 2, math.pi], dtype=torch.float64
    )
    chi_l = character(ell, angles)
    sizes = torch.tensor(OCTAHEDRAL_CLASS_SIZES, dtype=torch.float64)
    out = {}
    for rho in OCTAHEDRAL_IRREPS:
        chi = torch.tensor(OCTAHEDRAL_CHARACTERS[rho], dtype=torch.float64)
        out[rho] = int(round(float((sizes * chi * chi_l).sum() / 24)))
    return out


def icosahedral_rotations(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 60 rotations of the icosahedron with vertices (0, ±1, ±φ) and cyclic permutations.

    Built as the closure of a 72° rotation about (0, 1, φ) and a 120° rotation about (1, 1, 1).

    Returns:
        Tensor (60, 3, 3); the first element is the identity.
    """
    phi = (1 + math.sqrt(5)) / 2

    def axis_angle(axis, angle):
        a = torch.tensor(axis, dtype=torch.float64)
        a = a / a.norm()
        K = torch.tensor(
            [[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64
        )
        return (
            torch.eye(3, dtype=torch.float64) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
        )

    gens = [
        axis_angle((0.0, 1.0, phi), 2 * math.pi / 5),
        axis_angle((1.0, 1.0, 1.0), 2 * math.pi / 3),
    ]
    group = [torch.eye(3, dtype=torch.float64)]
    frontier = list(group)
    while frontier:
        new = []
        for g, s in itertools.product(frontier, gens):
            h = s @ g
            if all((h - e).abs().max() > 1e-8 for e in group + new):
                new.append(h)
        group += new
        frontier = new
    if len(group) != 60:  # pragma: no cover - a construction error, not an input error
        raise RuntimeError(f"icosahedral closure gave {len(group)} rotations, expected 60")
    return torch.stack(group).to(dtype)


# --------------------------------------------------------------------------- the result


@dataclass
class Spectrum:
    """Per-unit (per-example) SUMS over output elements of the power in each irrep.

    Attributes:
        labels: irrep labels, ("0", "1", ..., str(ℓmax)) for SO(3) or ``OCTAHEDRAL_IRREPS``;
            the first label is the twirled ("mean") part.
        power: (U, n_labels) float64, per unit the estimated power in each irrep.
        total: (U,) float64, per unit S = mean_k |z_k|^2 (the whole power).
        n: (U,) float64, per unit the number of output elements.
        exhaustive: the rotations were a whole finite group (power sums to total, no remainder).
    """

    labels: tuple[str, ...]
    power: Tensor
    total: Tensor
    n: Tensor
    exhaustive: bool = False

    def __add__(self, other: Spectrum) -> Spectrum:
        if (self.labels, self.exhaustive) != (other.labels, other.exhaustive):
            raise ValueError("cannot add spectra with different irreps or exhaustiveness")
        return Spectrum(
            self.labels,
            torch.cat([self.power, other.power]),
            torch.cat([self.total, other.total]),
            torch.cat([self.n, other.n]),
            self.exhaustive,
        )

    @property
    def n_elements(self) -> int:
        return int(self.n.sum())

    def _units(self) -> dict[str, Tensor]:
        """Per-unit sums of every reported quantity (power per irrep, equiv, remainder)."""
        out = {lab: self.power[:, i] for i, lab in enumerate(self.labels)}
        out["equiv"] = self.total - self.power[:, 0]
        out["remainder"] = self.total - self.power.sum(1)
        out["total"] = self.total
        return out

    def per_element(self) -> dict[str, float]:
        """Per-element means: each irrep's power, ``equiv`` (E_unb), ``remainder``, ``total``."""
        n = max(float(self.n.sum()), 1.0)
        return {k: float(v.sum()) / n for k, v in self._units().items()}

    def shares(self) -> dict[str, float]:
        """Fractions of the total power: each irrep and ``remainder`` (sum to 1)."""
        u = self._units()
        tot = float(self.total.sum())
        keys = [*self.labels, "remainder"]
        return {k: (float(u[k].sum()) / tot if tot > 0 else math.nan) for k in keys}

    def standard_error(self, name: str) -> float:
        """Standard error over units of the per-element mean of ``name`` (ratio of sums)."""
        return _ratio_se(self._units()[name], self.n)

    def share_standard_error(self, name: str) -> float:
        """Standard error over units of ``shares()[name]`` (ratio of sums over ``total``)."""
        return _ratio_se(self._units()[name], self.total)


def _ratio_se(v: Tensor, w: Tensor) -> float:
    """Standard error of Σ v / Σ w over units (linearised ratio estimator)."""
    U = w.shape[0]
    if U < 2 or float(w.sum()) == 0:
        return math.nan
    r = float(v.sum() / w.sum())
    ss = float(((v - r * w) ** 2).sum())
    return math.sqrt(U / (U - 1) * ss) / abs(float(w.sum()))


# --------------------------------------------------------------------------- Gram matrices


def _reduce_mask(mask: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """The element mask reduced over trailing dims until it is a prefix of ``shape``."""
    m = mask.to(torch.bool)
    while m.dim() > 0:
        if tuple(m.shape) == tuple(shape[: m.dim()]):
            while m.dim() < len(shape):
                m = m.unsqueeze(-1)
            return m.expand(shape)
        if not torch.equal(m.all(-1), m.any(-1)):
            raise ValueError(
                f"an element mask {tuple(mask.shape)} that varies along its last dimensions "
                f"cannot be applied to values shaped {tuple(shape)}"
            )
        m = m.all(-1)
    return None


def gram(
    z: Tensor, n_examples: int, index: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-example Gram matrices of K predictions.

    Args:
        z: (K, M, *rest) values of K rotated copies; M = B (one entry per example, e.g. a
            padded (B, L, 3) field or (B,) energies) or M = N elements of a ragged batch.
        n_examples: B.
        index: (N,) example of each of the M = N leading entries (ragged batches), or None.
        mask: optional bool mask (M, *rest') of the elements to keep, reduced over trailing
            dims if the values have more (e.g. a (B, L, 3) mask for (B, L, d) features).

    Returns:
        (G, n): G (B, K, K) float64 with G[b, i, j] = Σ_elements z_i z_j over example b;
        n (B,) float64 element counts.
    """
    K, M = z.shape[0], z.shape[1]
    keep = None
    if mask is not None:
        keep = _reduce_mask(mask.to(z.device), tuple(z.shape[1:]))
    if index is None:
        if M != n_examples:
            raise ValueError(
                f"values have {M} leading entries but the batch has {n_examples} examples; "
                "pass index (the example of each entry) for ragged batches"
            )
        # one example at a time: a float64 copy of a whole batch of grids would not fit
        G = torch.zeros(M, K, K, dtype=torch.float64, device=z.device)
        n = torch.zeros(M, dtype=torch.float64, device=z.device)
        for m in range(M):
            zm = z[:, m].detach().reshape(K, -1)
            if keep is not None:
                zm = zm[:, keep[m].reshape(-1)]
            zm = zm.double()
            G[m] = zm @ zm.T
            n[m] = zm.shape[1]
        return G, n
    if index.shape[0] != M:
        raise ValueError(f"index has {index.shape[0]} entries, values have {M}")
    flat = z.detach().double().reshape(K, M, -1)
    if keep is not None:
        flat = flat * keep.reshape(M, -1).unsqueeze(0).to(flat.dtype)
        counts = keep.reshape(M, -1).sum(1).double()
    else:
        counts = torch.full((M,), float(flat.shape[-1]), dtype=torch.float64, device=z.device)
    per = torch.einsum("imf,jmf->mij", flat, flat)
    idx = index.to(z.device).long()
    G = torch.zeros(n_examples, K, K, dtype=torch.float64, device=z.device)
    G.index_add_(0, idx, per)
    n = torch.zeros(n_examples, dtype=torch.float64, device=z.device)
    n.index_add_(0, idx, counts)
    return G, n


def _centred_pairs(G: Tensor) -> Tensor:
    """⟨z_i - m_ij, z_j - m_ij⟩ with m_ij the mean of the other K-2 (B, K, K) -> (B, K, K)."""
    K = G.shape[-1]
    r = G.sum(-1)  # ⟨z_i, Σ z⟩
    T = r.sum(-1)[:, None, None]
    d = G.diagonal(dim1=-2, dim2=-1)
    ri, rj = r[:, :, None], r[:, None, :]
    di, dj = d[:, :, None], d[:, None, :]
    zi_m = (ri - di - G) / (K - 2)
    m_zj = (rj - G - dj) / (K - 2)
    mm = (T - 2 * ri - 2 * rj + di + dj + 2 * G) / (K - 2) ** 2
    return G - zi_m - m_zj + mm


# --------------------------------------------------------------------------- spectra


def so3_spectrum_from_gram(
    G: Tensor, n: Tensor, R: Tensor, lmax: int, exhaustive: bool = False
) -> Spectrum:
    """Per-ℓ power from per-example Gram matrices and the rotations that made them.

    Args:
        G: (B, K, K) Gram matrices (``gram``). n: (B,) element counts.
        R: (K, B, 3, 3) rotations of each copy of each example.
        lmax: highest ℓ estimated separately (the rest is the remainder).
        exhaustive: R[:, b] is a whole finite group or coset (e.g. ``icosahedral_rotations``):
            the exact-quadrature V-statistic over all pairs instead of the Haar U-statistics.

    Returns:
        Spectrum with labels "0".."lmax".
    """
    K = G.shape[-1]
    theta = rotation_angle(relative_rotations(R.to(G.device).double()))  # (B, K, K)
    S = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    powers = []
    if exhaustive:
        for ell in range(lmax + 1):
            powers.append((2 * ell + 1) * (G * character(ell, theta)).mean((-1, -2)))
    else:
        if K < 3:
            raise ValueError(f"the per-ℓ estimator needs K >= 3 rotations per example, got {K}")
        off = ~torch.eye(K, dtype=torch.bool, device=G.device)
        npairs = K * (K - 1)
        powers.append((G * off).sum((-1, -2)) / npairs)
        C = _centred_pairs(G) * off
        for ell in range(1, lmax + 1):
            powers.append((2 * ell + 1) * (C * character(ell, theta)).sum((-1, -2)) / npairs)
    labels = tuple(str(ell) for ell in range(lmax + 1))
    return Spectrum(labels, torch.stack(powers, -1).cpu(), S.cpu(), n.cpu(), exhaustive)


def octahedral_spectrum_from_gram(G: Tensor, n: Tensor, R: Tensor) -> Spectrum:
    """Exact power in each octahedral irrep from Gram matrices over all 24 rotations.

    Args:
        G: (B, 24, 24) Gram matrices. n: (B,) element counts.
        R: (24, B, 3, 3) (or (24, 3, 3) shared) the octahedral rotations, any order.

    Returns:
        Spectrum with labels ``OCTAHEDRAL_IRREPS``, exhaustive (no remainder).
    """
    if R.dim() == 3:
        R = R.unsqueeze(1).expand(R.shape[0], G.shape[0], 3, 3)
    if R.shape[0] != 24:
        raise ValueError(f"the octahedral spectrum needs all 24 rotations, got {R.shape[0]}")
    rel = relative_rotations(R.to(G.device).double())
    S = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    powers = [
        OCTAHEDRAL_DIMS[rho] * (G * octahedral_character(rho, rel)).mean((-1, -2))
        for rho in OCTAHEDRAL_IRREPS
    ]
    return Spectrum(OCTAHEDRAL_IRREPS, torch.stack(powers, -1).cpu(), S.cpu(), n.cpu(), True)


def is_octahedral_set(R: Tensor) -> bool:
    """True when R (24, 3, 3) or (24, B, 3, 3) holds signed permutation matrices, 24 of them."""
    return R.shape[0] == 24 and bool(torch.allclose(R, R.round(), atol=1e-5))


def spectrum(
    z: Tensor,
    R: Tensor,
    lmax: int = 4,
    index: Tensor | None = None,
    mask: Tensor | None = None,
    exhaustive: bool = False,
) -> Spectrum:
    """Power of K predictions per irrep: SO(3) ℓ = 0..lmax (+ remainder), or octahedral irreps.

    Args:
        z: (K, M, *rest) canonicalised predictions (or hidden features) of K rotated copies;
            leading dim M = B examples, or N ragged elements with ``index``.
        R: (K, B, 3, 3) rotation of each copy of each example (``equivariance.example_rotations``),
            or (K, 3, 3) shared by every example.
        lmax: highest SO(3) degree reported separately.
        index: (N,) example index of ragged entries, or None.
        mask: optional bool element mask (see ``gram``).
        exhaustive: R is a whole finite group: all 24 octahedral rotations give the octahedral
            irreps (A1..T2), any other group (e.g. the 60 icosahedral rotations) the exact
            quadrature over SO(3) ℓ.

    Returns:
        Spectrum (per-example sums; ``per_element()`` for the table).
    """
    K = z.shape[0]
    if R.dim() == 3:
        B = int(index.max()) + 1 if index is not None and index.numel() else z.shape[1]
        R = R.unsqueeze(1).expand(K, B, 3, 3)
    if R.shape[0] != K:
        raise ValueError(f"{K} predictions but {R.shape[0]} rotations")
    G, n = gram(z, R.shape[1], index, mask)
    if exhaustive and is_octahedral_set(R):
        return octahedral_spectrum_from_gram(G, n, R)
    return so3_spectrum_from_gram(G, n, R, lmax, exhaustive)
