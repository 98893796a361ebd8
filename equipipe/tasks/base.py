"""The Task protocol: the seam that keeps the evaluator and the training loop generic.

A *batch* is a plain ``dict[str, Tensor]``. Every task lays out K rotated copies made by
``repeat`` copy-major: copy ``c`` of example ``b`` is example ``c * B + b``. So any output
field of a K-copy batch reshapes as ``value.reshape(K, -1, *value.shape[1:])`` into the
``(K, *shape)`` stack that ``decomposition_from_predictions`` takes: per-atom fields are
concatenated (K*N, 3), per-example fields (K*B,), padded per-token fields (K*B, L, 3),
grids (K*B, C, D, H, W).

An *example* is ``dict[str, np.ndarray]`` as read from the store (``Store.get``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


@runtime_checkable
class Task(Protocol):
    """One learning problem: data layout, model family, loss, and the group action.

    The first seven members are DESIGN.md's contract; the rest are what the one training
    loop needs to stay task-agnostic.
    """

    name: str
    fields: tuple[str, ...]  # outputs decomposed, e.g. ("forces", "energy")
    units: dict[str, str]  # unit of each field's SQUARED error, e.g. {"forces": "(eV/A)^2"}
    primary_field: str  # the field whose pct the figures show

    def build_model(self, size: str) -> nn.Module: ...

    def predict(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """One forward pass (no self-conditioning during evaluation)."""

    def loss(self, pred: dict[str, Tensor], batch: Batch) -> Tensor:
        """Training loss (any form), a scalar."""

    def target(self, batch: Batch) -> dict[str, Tensor]:
        """What predictions are compared with, per field, same shapes as ``predict``."""

    def rotate(self, batch: Batch, R: Tensor) -> Batch:
        """Act with R (B, 3, 3), one rotation per example, on inputs AND targets."""

    def canonicalize(self, pred: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
        """Apply R^-1 per example: vectors by R^T, scalars unchanged, grids resampled."""

    def repeat(self, batch: Batch, k: int) -> Batch:
        """k copies, copy-major (see module docstring), for one batched forward."""

    # --- what the generic loop needs beyond DESIGN.md's seven members ---------------

    def num_examples(self, batch: Batch) -> int: ...

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """Store examples -> CPU batch (normalised with the state from ``fit``)."""

    def fit(self, train_examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Statistics from the TRAINING split only (normalisation); JSON-able; also applied."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what ``fit`` returned (resume, analyses)."""

    def prepare_train(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
        """Draw the training-time randomness (flow time, noise, self-conditioning)."""

    def eval_views(self, batch: Batch, generator: torch.Generator) -> list[tuple[dict, Batch]]:
        """Evaluation batches with every random choice fixed per example BEFORE rotation.

        Returns (labels, batch) pairs: ``[({}, batch)]`` for the force field, one per flow
        time ``({"t": 0.2}, batch)`` for flow matching. ``generator`` is seeded the same at
        every evaluation so curves are not jittered by new draws.
        """

    def element_mask(self, batch: Batch) -> dict[str, Tensor] | None:
        """Per-field bool masks of the target's shape (padding, inscribed ball); or None."""

    def accuracy(self, pred: dict[str, Tensor], batch: Batch) -> dict[str, tuple[float, str]]:
        """Ordinary accuracy in physical units: name -> (value, unit), e.g. force MAE."""

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Task-specific extra augmentation (e.g. the voxel task's <=0.5 A shift); may be identity."""


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a batch to ``device`` (non-blocking where possible)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
