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

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from equipipe.equivariance import Decomposition

Batch = dict[str, Tensor]


@runtime_checkable
class Task(Protocol):
    """One learning problem: data layout, model family, loss, and the group action.

    The first seven members are DESIGN.md's contract; the rest are what the one training
    loop and the analyses need to stay task-agnostic. Every member is declared here and
    implemented by every task (a task without a use for one says so: ``rotation_set`` gives
    None, ``shared_rotated_predictions`` None, ``interpolation_floor`` ``{}``); nothing probes
    a task for members beyond this protocol. Rotations act through ``equipipe.so3``.
    """

    # read-only members (a class attribute implements each)
    @property
    def name(self) -> str: ...

    @property
    def fields(self) -> tuple[str, ...]:
        """Outputs decomposed, e.g. ("forces", "energy")."""

    @property
    def units(self) -> dict[str, str]:
        """Unit of each field's SQUARED error, e.g. {"forces": "(eV/A)^2"}."""

    @property
    def primary_field(self) -> str:
        """The field whose pct the figures show."""

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
        """k copies, copy-major (see module docstring), for one batched forward
        (``repeat_ragged`` / ``repeat_padded``)."""

    def shared_rotated_predictions(
        self, model: nn.Module, batch: Batch, R: Tensor, plain: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None] | None:
        """Canonicalised predictions of K rotated copies from one shared pass, or None.

        Where the model allows it (an invariant trunk): field -> (K, *shape) stack of
        g_k^-1 f(g_k x) for R (K, B, 3, 3), and (with ``plain``) ``predict(model, batch)``.
        None when the model or the batch does not allow it: the evaluator then runs K forwards.
        """

    def rotation_set(self, labels: dict) -> Tensor | None:
        """The finite group (G, 3, 3) an evaluation view (its ``labels``) is evaluated over
        exhaustively, or None for K Haar draws per example."""

    def interpolation_floor(
        self, batch: Batch, generator: torch.Generator | None, k: int | None = None
    ) -> dict[str, Decomposition]:
        """The decomposition an exactly equivariant reference shows on a Haar view (the
        resampling error of grid tasks), field -> Decomposition; ``{}`` when nothing is
        resampled (the evaluation is exact)."""

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


class EvaluationDefaults:
    """The protocol's evaluation members for a task with nothing special to say: K Haar
    rotations per example in every view, K forward passes, no interpolation floor (the group
    action is exact). A task (or a user's adapter, ``examples/custom_loop.py``) inherits these
    and overrides what it does differently (the force field shares one trunk pass; the voxel
    task has a finite group and a floor)."""

    def shared_rotated_predictions(
        self, model: nn.Module, batch: Batch, R: Tensor, plain: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None] | None:
        """None: the evaluator runs K forward passes."""
        del model, batch, R, plain
        return None

    def rotation_set(self, labels: dict) -> Tensor | None:
        """None: every view gets K Haar rotations per example."""
        del labels
        return None

    def interpolation_floor(
        self, batch: Batch, generator: torch.Generator | None, k: int | None = None
    ) -> dict[str, Decomposition]:
        """{}: nothing is resampled, the action is exact."""
        del batch, generator, k
        return {}


def repeat_ragged(batch: Batch, k: int, n_examples: int, index: str = "batch") -> Batch:
    """k copies of a ragged batch (rows of all examples concatenated), copy-major.

    Every tensor is concatenated k times; the row -> example index ``batch[index]`` (N,) of
    copy c is offset by c * n_examples, so copy c of example b is example c * B + b.
    """
    out = {key: torch.cat([value] * k) for key, value in batch.items()}
    offsets = torch.arange(k, device=batch[index].device) * n_examples
    out[index] = (batch[index][None, :] + offsets[:, None]).reshape(-1)
    return out


def repeat_padded(batch: Batch, k: int) -> Batch:
    """k copies of a padded batch (every tensor leads with the example axis), copy-major."""
    return {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in batch.items()}


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a batch to ``device`` (non-blocking where possible)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
