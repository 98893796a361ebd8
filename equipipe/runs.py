"""Load a finished run (task, model, held-out batches) for analyses and figures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from equipipe.loader import RunData
from equipipe.tasks import make_task
from equipipe.tasks.base import Batch, Task, to_device


@dataclass
class LoadedRun:
    task: Task
    model: nn.Module
    info: dict[str, Any]
    data: RunData
    device: torch.device

    def batches(
        self, split: str = "val", n_examples: int | None = None, batch_size: int | None = None
    ) -> list[Batch]:
        """Held-out batches in the training evaluation's fixed order (same examples by default)."""
        ecfg = self.info["eval_config"]
        data = self.data
        if split != ecfg["split"] or n_examples not in (None, ecfg["examples"]):
            p = self.info["data"]
            data = RunData.open(p["store"], p["split"], p["subset"], self.info["batch_size"],
                                self.info["seed"], split, n_examples)  # fmt: skip
        return [
            to_device(b, self.device)
            for b in data.val_batches(self.task, batch_size or ecfg["batch_size"])
        ]

    def eval_generator(self) -> torch.Generator:
        """A generator seeded as the training evaluation's (same rotations and view noise)."""
        return torch.Generator().manual_seed(self.info["eval_config"]["seed"])


def load_run(run_dir: str | Path, checkpoint: str = "model.pt", device: str = "cpu") -> LoadedRun:
    """Rebuild the task (with its fitted state) and the model with a checkpoint's weights."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    spec = info["spec"]
    task = make_task(spec["task"], spec.get("task_cfg", {}))
    task.set_state(info["task_state"])
    dev = torch.device(device)
    model = task.build_model(spec["size"]).to(dev)
    model.load_state_dict(torch.load(run_dir / checkpoint, map_location=dev, weights_only=True))
    model.eval()
    p, ecfg = info["data"], info["eval_config"]
    data = RunData.open(p["store"], p["split"], p["subset"], info["batch_size"], info["seed"],
                        ecfg["split"], ecfg["examples"])  # fmt: skip
    return LoadedRun(task, model, info, data, dev)
