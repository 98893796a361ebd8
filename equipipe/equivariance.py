"""Split held-out squared error into twirled-prediction error and equivariance error.

For an input x with target y, K rotations g_k and canonicalised predictions
z_k = g_k^-1 f(g_k x), z̄ = mean_k z_k:

    T = mean_k ||y - z_k||^2      (total)       unbiased for L_total
    M = ||y - z̄||^2               (mean)        E[M] = L_mean + V/K
    E = mean_k ||z_k - z̄||^2      (equiv)       E[E] = (K-1)/K V
    T = M + E exactly; E_unb = K/(K-1) E; M_unb = M - E/(K-1); pct = E_unb / T.

With ``exhaustive=True`` (all elements of a finite group, e.g. the 24 octahedral rotations)
the plug-in values are the exact group averages and the unbiased ones equal them.

This module never branches on the task: everything task-specific goes through the Task
protocol (``equipipe.tasks.base``). Evaluation uses the live weights passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor, nn

from equipipe.models import interface
from equipipe.so3 import haar_rotations
from equipipe.tasks.base import Batch, Task


@dataclass
class Decomposition:
    """Plug-in SUMS over elements; add decompositions of disjoint batches with ``+``.

    Attributes:
        total, mean, equiv: sums over elements of mean_k (y-z_k)^2, (y-z̄)^2,
            mean_k (z_k-z̄)^2 (floats).
        k: number of rotations per example.
        n_elements: number of (unmasked) target elements summed over.
        exhaustive: the rotations were a whole finite group (no finite-K correction).
        n_units: number of independent units summed (examples when the decomposition was
            built with ``n_examples``, else one per ``decomposition_from_predictions`` call).
        moments: sums over units u of (S_u^2, S_u n_u, n_u^2) for "total" and
            "equiv_unbiased" (S_u the unit's sum, n_u its element count), and of
            (E_u^2, E_u T_u, T_u^2) for "pct" (E_u the unit's unbiased equivariance error, T_u
            its total): the standard errors of the per-element means and of pct = ΣE/ΣT over
            units (linearised ratio estimator, which keeps the covariance of E and T).
    """

    total: float
    mean: float
    equiv: float
    k: int
    n_elements: int
    exhaustive: bool = False
    n_units: int = 1
    moments: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"a decomposition needs K >= 2 rotations, got K={self.k}")
        if not self.moments:
            n, t, e = float(self.n_elements), self.total, self.equiv_unbiased
            self.moments = {
                "total": (t * t, t * n, n * n),
                "equiv_unbiased": (e * e, e * n, n * n),
                "pct": (e * e, e * t, t * t),
            }

    @property
    def equiv_unbiased(self) -> float:
        """K/(K-1) · equiv (equals equiv when exhaustive)."""
        return self.equiv if self.exhaustive else self.k / (self.k - 1) * self.equiv

    @property
    def mean_unbiased(self) -> float:
        """mean - equiv/(K-1) = total - equiv_unbiased (equals mean when exhaustive)."""
        return self.mean if self.exhaustive else self.mean - self.equiv / (self.k - 1)

    @property
    def pct(self) -> float:
        """Fraction (not percent) of the total squared error from equivariance error."""
        return self.equiv_unbiased / self.total if self.total > 0 else 0.0

    def per_element(self) -> dict[str, float]:
        """Per-element means of the raw and unbiased terms (what the metrics table stores)."""
        n = max(self.n_elements, 1)
        return {
            "total": self.total / n,
            "mean": self.mean / n,
            "equiv": self.equiv / n,
            "equiv_unbiased": self.equiv_unbiased / n,
            "mean_unbiased": self.mean_unbiased / n,
        }

    def standard_error(self, name: str) -> float:
        """Standard error over units of the per-element mean of ``name`` ("total",
        "equiv_unbiased"), or of the fraction ``pct`` ("pct": E_unb / T as a ratio of sums)."""
        if self.n_units < 2 or self.n_elements == 0:
            return math.nan
        s2, sn, n2 = self.moments[name]
        denom = self.total if name == "pct" else float(self.n_elements)
        if denom <= 0:
            return math.nan
        m = getattr(self, name) if name == "pct" else getattr(self, name) / denom
        ss = max(s2 - 2 * m * sn + m * m * n2, 0.0)
        return math.sqrt(self.n_units / (self.n_units - 1) * ss) / denom

    def __add__(self, other: Decomposition) -> Decomposition:
        if (self.k, self.exhaustive) != (other.k, other.exhaustive):
            raise ValueError("cannot add decompositions with different K or exhaustiveness")
        moments = {
            key: (a[0] + b[0], a[1] + b[1], a[2] + b[2])
            for key in self.moments
            for a, b in [(self.moments[key], other.moments[key])]
        }
        return Decomposition(
            self.total + other.total,
            self.mean + other.mean,
            self.equiv + other.equiv,
            self.k,
            self.n_elements + other.n_elements,
            self.exhaustive,
            self.n_units + other.n_units,
            moments,
        )


def broadcast_mask(mask: Tensor | None, y: Tensor) -> Tensor | None:
    """An element mask broadcast from the left to y's shape: (B, L) for a (B, L, 3) target
    gives (B, L, 3) bool; None stays None (every element counts)."""
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    while mask.dim() < y.dim():
        mask = mask.unsqueeze(-1)
    return mask.expand_as(y)


def decomposition_terms(
    z: Tensor, y: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Differentiable plug-in sums (total, mean, equiv) and the element count.

    Args:
        z: (K, *shape) canonicalised predictions.
        y: (*shape) target.
        mask: optional bool tensor broadcastable to ``shape`` from the left
            (e.g. (B, L) for a (B, L, 3) target); False elements are excluded.

    Returns:
        (total, mean, equiv) 0-dim tensors (sums over elements) and n_elements (int).
    """
    if z.shape[1:] != y.shape:
        raise ValueError(f"predictions {tuple(z.shape)} do not match (K, *target {tuple(y.shape)})")
    zbar = z.mean(0)
    total_el = (y.unsqueeze(0) - z).pow(2).mean(0)
    mean_el = (y - zbar).pow(2)
    equiv_el = (z - zbar.unsqueeze(0)).pow(2).mean(0)
    m = broadcast_mask(mask, y)
    if m is None:
        return total_el.sum(), mean_el.sum(), equiv_el.sum(), y.numel()
    w = m.to(z.dtype)
    return (total_el * w).sum(), (mean_el * w).sum(), (equiv_el * w).sum(), int(m.sum())


def decomposition_from_predictions(
    z: Tensor,
    y: Tensor,
    exhaustive: bool = False,
    mask: Tensor | None = None,
    n_examples: int | None = None,
    index: Tensor | None = None,
) -> Decomposition:
    """Decompose the squared error of K canonicalised predictions against a target.

    Args:
        z: (K, *shape) canonicalised predictions z_k = g_k^-1 f(g_k x), K >= 2.
        y: (*shape) target.
        exhaustive: True when the K rotations are a whole finite group (e.g. the 24
            octahedral rotations), so the plug-in values are exact.
        mask: optional bool mask broadcastable to ``shape`` from the left.
        n_examples: B, the examples of the batch: with it, each example is a unit of the
            standard errors (``shape[0] == B``, or a ragged leading dim with ``index``);
            without it the whole call is one unit.
        index: (shape[0],) example of each leading entry of a ragged batch (e.g. the atoms of
            a force-field batch), or None.

    Returns:
        Decomposition with plug-in sums over elements (see the class). The sums equal
        ``decomposition_terms`` in float64 to rounding; the elementwise terms are computed
        once, in one pass over K, and the batch sums are the sums of the per-unit sums.
    """
    if z.shape[1:] != y.shape:
        raise ValueError(f"predictions {tuple(z.shape)} do not match (K, *target {tuple(y.shape)})")
    K = int(z.shape[0])
    with torch.no_grad():
        mean_el, equiv_el = _elementwise_terms(z, y)
        w = broadcast_mask(mask, y)
        w = None if w is None else w.to(torch.float64)
        units = _unit_sums(mean_el, equiv_el, w, n_examples, index)
        if units is None:
            m_sum = float(mean_el.sum() if w is None else (mean_el * w).sum())
            e_sum = float(equiv_el.sum() if w is None else (equiv_el * w).sum())
            n = y.numel() if w is None else int(w.sum())
        else:
            mu, eu, nu = units
            m_sum, e_sum, n = float(mu.sum()), float(eu.sum()), int(nu.sum())
    d = Decomposition(m_sum + e_sum, m_sum, e_sum, K, n, exhaustive)
    if units is None:
        return d
    tu = mu + eu
    if not exhaustive:
        eu = eu * (K / (K - 1))
    d.n_units = int(tu.numel())
    d.moments = {
        "total": (float((tu * tu).sum()), float((tu * nu).sum()), float((nu * nu).sum())),
        "equiv_unbiased": (float((eu * eu).sum()), float((eu * nu).sum()), float((nu * nu).sum())),
        "pct": (float((eu * eu).sum()), float((eu * tu).sum()), float((tu * tu).sum())),
    }
    return d


def _elementwise_terms(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Elementwise (y - z̄)^2 and mean_k (z_k - z̄)^2, each (*shape) float64 (their sum is
    mean_k (y - z_k)^2, the total, exactly in real arithmetic).

    One pass over the K predictions: memory stays O(shape) in float64, never (K, *shape).
    """
    K = z.shape[0]
    zbar = z.sum(0, dtype=torch.float64).div_(K)
    equiv = torch.zeros_like(zbar)
    for k in range(K):
        d = z[k] - zbar  # float64 (type promotion); never in place on z
        equiv.addcmul_(d, d)
    equiv.div_(K)
    mean = (y - zbar).pow_(2)
    return mean, equiv


def _unit_sums(
    mean_el: Tensor,
    equiv_el: Tensor,
    w: Tensor | None,
    n_examples: int | None,
    index: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-example (M_u, E_u, n_u) (each (B,) float64: twirled-prediction and plug-in
    equivariance sums and element counts) of the elementwise terms (weights ``w``: the float
    mask, or None), or None when the examples cannot be told apart (one unit)."""
    if n_examples is None or mean_el.dim() == 0:
        return None
    lead = mean_el.shape[0]
    if index is None and lead != n_examples:
        return None
    if index is not None and index.shape[0] != lead:
        return None
    if w is None:
        per_n = torch.full((lead,), mean_el[0].numel(), dtype=torch.float64, device=mean_el.device)
        per = [a.reshape(lead, -1).sum(1) for a in (mean_el, equiv_el)] + [per_n]
    else:
        per = [(a * w).reshape(lead, -1).sum(1) for a in (mean_el, equiv_el)]
        per.append(w.reshape(lead, -1).sum(1))
    if index is None:
        return per[0], per[1], per[2]
    idx = index.to(torch.long).to(mean_el.device)
    out = []
    for v in per:
        acc = torch.zeros(n_examples, dtype=v.dtype, device=v.device)
        out.append(acc.index_add_(0, idx, v))
    return out[0], out[1], out[2]


def _resolve_strategy(device_strategy: str, batch: Batch) -> str:
    if device_strategy not in ("auto", "batched", "sequential"):
        raise ValueError(
            f"device_strategy={device_strategy!r}; allowed: 'auto', 'batched', 'sequential'"
        )
    if device_strategy != "auto":
        return device_strategy
    device = next(iter(batch.values())).device
    # Measured (DESIGN.md): one batched forward of K copies is 0.54x ten plain forwards on an
    # H100, but 2x slower than a sequential loop on 2 CPU cores.
    return "batched" if device.type == "cuda" else "sequential"


def example_rotations(
    n_examples: int,
    k: int,
    generator: torch.Generator | None,
    rotations: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-example rotations (K, B, 3, 3): Haar draws, or a shared finite set (G, 3, 3)."""
    if rotations is not None:
        return rotations.to(dtype).unsqueeze(1).expand(rotations.shape[0], n_examples, 3, 3)
    return haar_rotations(k * n_examples, generator, dtype=dtype).reshape(k, n_examples, 3, 3)


def no_grad(model: nn.Module):
    """The context for gradient-free forwards: ``torch.inference_mode`` (no autograd
    bookkeeping at all), or ``torch.no_grad`` for a model that differentiates inside its own
    forward (``autograd_in_forward``, e.g. gradient forces)."""
    return torch.no_grad() if interface.autograd_in_forward(model) else torch.inference_mode()


@overload
def canonical_predictions(
    model: nn.Module,
    task: Task,
    batch: Batch,
    R: Tensor,
    device_strategy: str = ...,
    plain: Literal[False] = ...,
    probed: list[str] | None = ...,
) -> dict[str, Tensor]: ...
@overload
def canonical_predictions(
    model: nn.Module,
    task: Task,
    batch: Batch,
    R: Tensor,
    device_strategy: str,
    plain: Literal[True],
    probed: list[str] | None = ...,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]: ...
def canonical_predictions(
    model: nn.Module,
    task: Task,
    batch: Batch,
    R: Tensor,
    device_strategy: str = "auto",
    plain: bool = False,
    probed: list[str] | None = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Canonicalised predictions of every field for rotations R (K, B, 3, 3).

    A task may share work across the K rotations where the maths allows: when its
    ``shared_rotated_predictions(model, batch, R, plain)`` returns a result (e.g. the force
    field with a model whose trunk is rotation invariant: one trunk pass, K cheap heads), that
    is used instead of K forwards (``device_strategy`` then does not apply).

    Args:
        plain: also return the unrotated prediction ``task.predict(model, batch)`` (for the
            accuracy), from the same pass where possible.
        probed: module names whose outputs hooks record per forward (the spectrum probe): the
            shared pass is used only when the model runs each of them once per copy (its
            ``per_copy_modules``), so the hooks still see K copies.

    Returns:
        field -> (K, *shape) stack of g_k^-1 f(g_k x); with ``plain``, (that, prediction).
    """
    k = R.shape[0]
    device = next(iter(batch.values())).device
    R = R.to(device)
    per_copy = interface.per_copy_modules(model)
    shareable = not probed or all(
        any(n == p or n.startswith(p + ".") for p in per_copy) for n in probed
    )
    out = task.shared_rotated_predictions(model, batch, R, plain) if shareable else None
    if out is not None:
        z, shared_pred = out
        if not plain:
            return z
        assert shared_pred is not None, "shared_rotated_predictions(plain=True) gives it"
        return z, shared_pred
    if _resolve_strategy(device_strategy, batch) == "batched":
        big = task.repeat(batch, k)
        Rb = R.reshape(-1, 3, 3)
        pred = task.canonicalize(task.predict(model, task.rotate(big, Rb)), Rb)
        z = {f: v.reshape(k, -1, *v.shape[1:]) for f, v in pred.items()}
        return (z, task.predict(model, batch)) if plain else z
    outs: dict[str, list[Tensor]] = {}
    for i in range(k):
        pred = task.canonicalize(task.predict(model, task.rotate(batch, R[i])), R[i])
        for f, v in pred.items():
            outs.setdefault(f, []).append(v)
    z = {f: torch.stack(v) for f, v in outs.items()}
    return (z, task.predict(model, batch)) if plain else z


def decompose(
    model: nn.Module,
    task: Task,
    batch: Batch,
    k: int,
    generator: torch.Generator | None,
    device_strategy: str = "auto",
    rotations: Tensor | None = None,
    record: dict | None = None,
) -> dict[str, Decomposition]:
    """Forward-only decomposition of the squared error of every task field on one batch.

    Args:
        model: the model with its live weights (eval mode is the caller's choice).
        task: a Task (group action, prediction, target).
        batch: one evaluation batch with every random choice already fixed per example.
        k: rotations per example (ignored when ``rotations`` is given).
        generator: seeded CPU generator for the Haar rotations.
        device_strategy: "auto" (batched on CUDA, sequential on CPU), "batched", "sequential".
        rotations: optional (G, 3, 3) finite group applied to every example, exhaustively.
        record: optional dict that receives what the decomposition was computed from, for
            ``equipipe.spectrum`` (no extra forward passes): ``z`` (field -> (K, *shape)),
            ``R`` (K, B, 3, 3) the per-example rotations, ``masks`` (field -> mask or absent).

    Returns:
        field -> Decomposition (sums over that field's elements, in the task's units).
    """
    view = evaluate_view(
        model, task, batch, k, generator, device_strategy, rotations, record, plain=False
    )
    return view.decompositions


def _decompositions(task, batch, z, y, R, exhaustive, record) -> dict[str, Decomposition]:
    masks = task.element_mask(batch) or {}
    if record is not None:
        record.update(z=z, R=R, masks=masks)
    B = task.num_examples(batch)
    index = batch.get("batch") if isinstance(batch, dict) else None  # ragged: example of entry
    return {
        f: decomposition_from_predictions(
            z[f],
            y[f],
            exhaustive,
            masks.get(f),
            B,
            index if y[f].dim() and y[f].shape[0] != B else None,
        )
        for f in task.fields
        if f in z
    }


@dataclass
class ViewResult:
    """What one evaluation view's forward passes give (``evaluate_view``).

    Attributes:
        decompositions: field -> Decomposition.
        prediction: the unrotated prediction ``task.predict(model, batch)`` (detached), or None.
    """

    decompositions: dict[str, Decomposition]
    prediction: dict[str, Tensor] | None
    _graph: tuple | None = None  # (model, z, y, mask, k) when built with gradients

    def gradient_norms(self, eps: float = 1e-8) -> dict[str, float]:
        """The gradient-norm ratio of the primary field through the SAME K forwards (backward
        passes only); the view must have been evaluated with ``gradients=True``."""
        if self._graph is None:
            raise RuntimeError("evaluate_view(..., gradients=True) keeps the graph for this")
        model, z, y, mask, k = self._graph
        self._graph = None  # one use: the graph is freed after the backward passes
        return gradient_norms_from(model, z, y, mask, k, eps)


def evaluate_view(
    model: nn.Module,
    task: Task,
    batch: Batch,
    k: int,
    generator: torch.Generator | None,
    device_strategy: str = "auto",
    rotations: Tensor | None = None,
    record: dict | None = None,
    gradients: bool = False,
    plain: bool = True,
) -> ViewResult:
    """One evaluation view from ONE set of forward passes: the decomposition, the plain
    prediction (for the accuracy) and, with ``gradients``, the graph of the gradient-norm ratio.

    The rotations come from ``generator`` exactly as in ``decompose`` (same draws, same
    decomposition). With ``gradients`` the K forwards keep their graph and
    ``ViewResult.gradient_norms`` differentiates THEIR outputs, so the ratio is measured with
    the decomposition's own rotations, without a second set of K forwards. Otherwise
    everything runs under ``no_grad(model)``.
    """
    B = task.num_examples(batch)
    R = example_rotations(B, k, generator, rotations)
    probed = record.get("layers") if record is not None else None
    pred: dict[str, Tensor] | None = None
    with torch.enable_grad() if gradients else no_grad(model):
        if plain:
            z, pred = canonical_predictions(model, task, batch, R, device_strategy, True, probed)
        else:
            z = canonical_predictions(model, task, batch, R, device_strategy, False, probed)
    with no_grad(model):
        y = task.target(batch)
    zd = {f: v.detach() for f, v in z.items()}
    dec = _decompositions(task, batch, zd, y, R, rotations is not None, record)
    graph = None
    if gradients:
        f = task.primary_field
        mask = (task.element_mask(batch) or {}).get(f)
        graph = (model, z[f], y[f].detach(), mask, k)
    pred = None if pred is None else {f: v.detach() for f, v in pred.items()}
    return ViewResult(dec, pred, graph)


def twirl(
    model: nn.Module,
    task: Task,
    batch: Batch,
    k: int,
    generator: torch.Generator | None,
    device_strategy: str = "auto",
    rotations: Tensor | None = None,
) -> dict[str, Tensor]:
    """Test-time twirling: the mean of K canonicalised predictions, field -> (*shape)."""
    R = example_rotations(task.num_examples(batch), k, generator, rotations)
    with torch.no_grad():
        z = canonical_predictions(model, task, batch, R, device_strategy)
    return {f: v.mean(0) for f, v in z.items()}


def global_grad_norm(loss: Tensor, params: list[nn.Parameter]) -> float:
    """Global L2 norm over ``params`` of d loss / d params (unused parameters count as 0)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    sq = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(sq)


def gradient_norms(
    model: nn.Module,
    task: Task,
    batch: Batch,
    k: int,
    generator: torch.Generator | None,
    field: str | None = None,
    device_strategy: str = "auto",
    eps: float = 1e-8,
) -> dict[str, float]:
    """||∇θ E_unb|| and ||∇θ M|| (per-element means over the batch), and their ratio.

    Gradients flow through all K forward passes; global L2 over trainable parameters.

    Returns:
        {"grad_norm_equiv", "grad_norm_mean", "grad_ratio"} with ratio = equiv / (mean + eps).
    """
    field = field or task.primary_field
    B = task.num_examples(batch)
    R = example_rotations(B, k, generator)
    z = canonical_predictions(model, task, batch, R, device_strategy)[field]
    y = task.target(batch)[field].detach()
    mask = (task.element_mask(batch) or {}).get(field)
    return gradient_norms_from(model, z, y, mask, k, eps)


def gradient_norms_from(
    model: nn.Module, z: Tensor, y: Tensor, mask: Tensor | None, k: int, eps: float = 1e-8
) -> dict[str, float]:
    """The gradient norms of ``gradient_norms`` from K canonicalised predictions with a graph.

    Args:
        z: (K, *shape) predictions that require grad (built with autograd on).
        y: (*shape) target. mask: optional element mask (``decomposition_terms``). k: K.
    """
    _, m, e, n = decomposition_terms(z, y, mask)
    equiv_unb = k / (k - 1) * e / n
    mean = m / n
    params = [p for p in model.parameters() if p.requires_grad]
    g_e = global_grad_norm(equiv_unb, params)
    g_m = global_grad_norm(mean, params)
    return {"grad_norm_equiv": g_e, "grad_norm_mean": g_m, "grad_ratio": g_e / (g_m + eps)}


def head_deviation(weight: Tensor) -> float:
    """Spread of a (3, H) output-head weight across its rows: ||W - 1 w̄^T||_F^2 / (3H).

    Args:
        weight: (3, H) weight of a final Linear(H -> 3) (e.g. the direct-force head).

    Returns:
        The variance across the 3 rows averaged over the H columns (ddof 0), a float; zero
        iff all rows are equal, i.e. the head is equivariant.
    """
    if weight.dim() != 2 or weight.shape[0] != 3:
        raise ValueError(f"head_deviation expects a (3, H) weight, got {tuple(weight.shape)}")
    w = weight.detach().double()
    return float((w - w.mean(0, keepdim=True)).pow(2).mean())
