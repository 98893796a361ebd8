"""Tasks (see ``base.Task``), built by name; each module is imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from equipipe.tasks.base import Batch, Task

if TYPE_CHECKING:  # mypy checks every registered task against the protocol, member by member
    from equipipe.tasks.denoising import DenoisingTask
    from equipipe.tasks.flowmatching import FlowMatchingTask
    from equipipe.tasks.forcefield import ForceFieldTask

    _CONFORMING: tuple[type[Task], ...] = (ForceFieldTask, DenoisingTask, FlowMatchingTask)

# name -> (module path, class name). Other tasks register here the same way.
_TASKS: dict[str, tuple[str, str]] = {
    "forcefield": ("equipipe.tasks.forcefield", "ForceFieldTask"),
    "denoising": ("equipipe.tasks.denoising", "DenoisingTask"),
    "flowmatching": ("equipipe.tasks.flowmatching", "FlowMatchingTask"),
}

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def make_task(name: str, cfg: dict[str, Any] | None = None) -> Task:
    """Instantiate the task ``name`` with its config slice (ValueError names allowed names)."""
    if name not in _TASKS:
        raise ValueError(f"task {name!r} is unknown; allowed: {', '.join(_TASKS)}")
    module, cls = _TASKS[name]
    return vars(importlib.import_module(module))[cls](cfg or {})


__all__ = ["Batch", "Task", "TASK_NAMES", "make_task"]
