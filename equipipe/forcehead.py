"""Closed forms for the direct (non-equivariant) force head (PAPER.md, "Closed forms").

The head computes, per atom i with invariant edge features h_ij (H,), unit bond directions
rhat_ij (3,), an invariant magnitude m_i and the head weight W (3, H):

    F_i = m_i * sum_j (W h_ij) ⊙ rhat_ij                        (⊙: elementwise)

Because E_R[R^T D R] = (tr D / 3) I for every diagonal D, the twirl over SO(3) replaces W by
its row mean 1 w̄^T, and with dW = W - 1 w̄^T, dc_ij = dW h_ij the equivariance error of atom
i (squared error summed over the 3 components, averaged over rotations) is exactly

    L_equiv,i = (m_i^2 / 3) * || sum_j dc_ij rhat_ij^T ||_F^2.

Only second moments of R enter, so the 24 octahedral rotations reproduce it exactly. All of
this assumes the rest of the network is rotation invariant (true for ``models.escaip``).

Units: the closed form is in the MODEL's output units. ``head_equiv_error`` converts to the
task's units with the scale between ``task.predict`` forces and the model's head forces
(measured on the batch, so it stays right whatever normalisation the task applies):
the error scales by scale^2.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from equipipe.models import interface
from equipipe.models.interface import DIRECT_HEAD_PARAM

HEAD_PARAM = DIRECT_HEAD_PARAM  # the direct head's weight (equipipe.models.interface)


def twirled_head_weight(W: Tensor) -> Tensor:
    """The exactly equivariant head weight: every row replaced by the row mean, (3, H)."""
    if W.dim() != 2 or W.shape[0] != 3:
        raise ValueError(f"expected a (3, H) head weight, got {tuple(W.shape)}")
    return W.mean(0, keepdim=True).expand_as(W).clone()


def head_forces(
    W: Tensor, h: Tensor, rhat: Tensor, m: Tensor, edge_atom: Tensor, n_atoms: int
) -> Tensor:
    """F_i = m_i sum_j (W h_ij) ⊙ rhat_ij from flattened edges -> (N, 3).

    Args:
        W: (3, H) head weight. h: (E, H) invariant edge features. rhat: (E, 3) unit bond
        directions. m: (N,) per-atom magnitudes. edge_atom: (E,) atom index i of each edge.
        n_atoms: N.
    """
    per_edge = (h @ W.T) * rhat  # (E, 3)
    out = per_edge.new_zeros(n_atoms, 3).index_add_(0, edge_atom, per_edge)
    return m[:, None] * out


def exact_head_equiv_error(
    W: Tensor, h: Tensor, rhat: Tensor, m: Tensor, edge_atom: Tensor, n_atoms: int
) -> Tensor:
    """Exact per-atom equivariance error of the direct force head, (N,), model units.

    L_equiv,i = (m_i^2 / 3) || sum_j dc_ij rhat_ij^T ||_F^2 with dc_ij = (W - 1 w̄^T) h_ij;
    the squared error is summed over the 3 force components (divide the total by 3N for the
    per-element mean that the decomposition reports). Differentiable in every argument.

    Args:
        W: (3, H). h: (E, H). rhat: (E, 3). m: (N,). edge_atom: (E,) int64. n_atoms: N.
    """
    dW = W - W.mean(0, keepdim=True)
    dc = h @ dW.T  # (E, 3)
    outer = dc[:, :, None] * rhat[:, None, :]  # (E, 3, 3) dc_ij rhat_ij^T
    A = outer.new_zeros(n_atoms, 3, 3).index_add_(0, edge_atom, outer)
    return m.pow(2) / 3.0 * A.pow(2).sum((1, 2))


def _features(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    if interface.direct_force_head(model) is None:
        raise TypeError(
            f"{type(model).__name__} has no force_head_features(batch); the closed form needs the "
            "direct force head of models.escaip"
        )
    return model.force_head_features(batch)


def force_scale(
    model: nn.Module, task, batch: dict[str, Tensor], features: dict[str, Tensor] | None = None
) -> float:
    """Task units per model unit of the forces: task.predict(...)["forces"] = scale * head forces.

    Measured by least squares on the batch and checked: raises if the task's forces are not a
    multiple of the head's (an additive term or a different head would break the closed form).
    """
    feats = features if features is not None else _features(model, batch)
    with torch.no_grad():
        pred = task.predict(model, batch)["forces"].double()
        mine = feats["forces"].detach().double()
    denom = float((mine * mine).sum())
    if denom == 0.0:
        return 1.0
    scale = float((pred * mine).sum()) / denom
    resid = float((pred - scale * mine).norm()) / max(float(pred.norm()), 1e-30)
    if resid > 1e-4:
        raise ValueError(
            f"task forces are not a multiple of the force head's output (relative residual "
            f"{resid:.2e}); the closed form does not apply to this task/model pair"
        )
    return scale


def head_equiv_error(
    model: nn.Module, batch: dict[str, Tensor], task=None, scale: float | None = None
) -> Tensor:
    """Exact per-atom equivariance error (N,) of a model with the direct force head.

    In the task's units when ``task`` is given (scale^2 x the model-unit closed form, see
    ``force_scale``), or with an explicit ``scale``; model units otherwise.
    """
    with torch.no_grad():
        f = _features(model, batch)
        n = int(f["m"].shape[0])
        err = exact_head_equiv_error(f["weight"], f["h"], f["rhat"], f["m"], f["edge_atom"], n)
        if scale is None:
            scale = force_scale(model, task, batch, f) if task is not None else 1.0
    return err * scale**2


def with_twirled_head(model: nn.Module, param: str = HEAD_PARAM) -> nn.Module:
    """A deep copy of ``model`` whose (3, H) head weight has its rows replaced by their mean."""
    twin = copy.deepcopy(model)
    weight = dict(twin.named_parameters())[param]
    with torch.no_grad():
        weight.copy_(twirled_head_weight(weight))
    return twin


def exact_twirl(
    model: nn.Module, batch: dict[str, Tensor], task=None, param: str = HEAD_PARAM
) -> dict[str, Tensor]:
    """The exact SO(3) twirl of a direct-force-head model's prediction (K -> infinity).

    Runs a copy of the model with the head weight replaced by its row mean; ``model`` is not
    modified. Through ``task.predict`` (task units) when ``task`` is given, else ``model(batch)``.
    Exact when the rest of the network is invariant (so the energy is unchanged).
    """
    twin = with_twirled_head(model, param)
    with torch.no_grad():
        return task.predict(twin, batch) if task is not None else twin(batch)
