"""What the evaluator, the tasks and the analyses may ask of a model beyond ``forward``.

A model is any ``nn.Module`` (the study's, or your own: ``examples/custom_loop.py``). The
members below are optional; a model declares one by defining it, and every reader asks through
the function of the same name here, so this list is complete:

- ``autograd_in_forward: bool`` — the forward differentiates (gradient forces, NequIP), so
  gradient-free passes run under ``torch.no_grad`` instead of ``torch.inference_mode``.
- ``forward_rotated(...)`` — the outputs of K rotated copies from one shared pass of an
  invariant trunk (the task defines the signature: ``tasks.forcefield`` / ``tasks.flowmatching``
  ``shared_rotated_predictions``).
- ``per_copy_modules: tuple[str, ...]`` — the modules that still run once per copy in that
  shared pass (so hooks on them see K copies).
- ``spectrum_layers: tuple[str, ...]`` — the hidden modules the spectrum probes by default.
- ``force_head_features(batch)`` with the parameter ``force_head.linear.weight``
  (``DIRECT_HEAD_PARAM``) — the direct force head of the EScAIP-like model (closed forms, the
  exact twirl, the head deviation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

DIRECT_HEAD_PARAM = "force_head.linear.weight"


def autograd_in_forward(model: nn.Module) -> bool:
    """True when the model differentiates inside its forward (default False)."""
    return bool(getattr(model, "autograd_in_forward", False))


def forward_rotated(model: nn.Module) -> Callable[..., Any] | None:
    """The model's shared rotated pass, or None."""
    return getattr(model, "forward_rotated", None)


def per_copy_modules(model: nn.Module) -> tuple[str, ...]:
    """Modules run once per copy in the shared rotated pass (default none)."""
    return tuple(getattr(model, "per_copy_modules", ()))


def spectrum_layers(model: nn.Module) -> tuple[str, ...]:
    """The hidden modules the spectrum probes by default (default none)."""
    return tuple(getattr(model, "spectrum_layers", ()))


def direct_force_head(model: nn.Module) -> nn.Linear | None:
    """The direct force head's Linear(H -> 3) (``force_head.linear``), or None for a model
    without one (gradient forces, other families)."""
    if not hasattr(model, "force_head_features"):
        return None
    try:
        head = model.get_submodule(DIRECT_HEAD_PARAM.rsplit(".", 1)[0])
    except AttributeError:
        return None
    return head if isinstance(head, nn.Linear) else None
