"""``config/paper.yaml`` in miniature: the study's own grid, shrunk only where the allow-list says.

:func:`miniature` copies the paper config and changes values only under the dotted paths of
:data:`MAY_SHRINK` (``*`` matches one name); :func:`changed_paths` lists every leaf that
differs, and ``tests/test_paper_miniature.py`` asserts that each one is allowed and that the
experiment, analysis, figure and subset names are the paper's. Sources are never changed: the
miniature downloads the same releases, from miniature upstreams on loopback.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "config" / "paper.yaml"

# The one allow-list (dotted config paths; '*' = any one name).
MAY_SHRINK: dict[str, str] = {
    "tasks.*.size": "model size -> tiny",
    "experiments.*.size": "model size -> tiny",
    "tasks.*.train.steps": "steps",
    "tasks.*.train.warmup_steps": "steps",
    "tasks.*.train.checkpoint_every": "steps",
    "tasks.*.train.analysis_step": "steps",
    "tasks.*.train.batch_size": "examples per step (miniature data)",
    "experiments.*.train.steps": "steps",
    "experiments.*.train.batch_size": "examples per step (miniature data)",
    "tasks.*.eval.*": "evaluation steps and example counts",
    "analyses.*.spec.grid": "analysis grid size",
    "analyses.*.spec.ks": "analysis example counts (twirling K)",
    "analyses.*.spec.n_examples": "analysis example counts",
    "analyses.*.spec.repeats": "analysis example counts",
    "analyses.*.spec.molecules": "analysis example counts (MD molecules)",
    "analyses.*.spec.rotations": "analysis example counts (MD rotated starts)",
    "analyses.*.spec.checkpoints": "steps (named checkpoints)",
    "analyses.*.spec.length_fs": "MD length",
    "analyses.*.spec.times_fs": "MD length",
    "tasks.*.train.keep_steps": "steps (named checkpoints)",
    "figures.*.style.time_fs": "MD length",
    "figures.*.style.xmax": "steps (axis limit)",
    "figures.*.style.dip_window": "steps (window)",
    "figures.*.style.shade_after": "steps",
    "datasets.geom.preprocess.grid_size": "grid size",
    "datasets.geom.preprocess.grid_spacing": "grid size (same extent in Å)",
    "tasks.denoising.task_cfg.grid_size": "grid size",
    "tasks.denoising.task_cfg.grid_spacing": "grid size",
    "datasets.*.subsets.*.size": "count subsets rescaled to the miniature data",
    "datasets.*.split.*": "split settings per source",
    "datasets.*.download.*": "where the (miniature) upstream is, and its pins",
    "experiments.*.resources.*": "compute resources of a CPU test machine",
}

STEPS = 4  # every run
MD_FS = 2.0  # every MD trajectory (4 steps of 0.5 fs)
EVAL = {"every": 2, "early": [1], "k": 3, "examples": 2, "batch_size": 2}  # k >= 3: spectrum


def load_paper() -> dict[str, Any]:
    return yaml.safe_load(PAPER.read_text())


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def changed_paths(paper: dict, mini: dict) -> list[str]:
    """Dotted paths of every leaf added, removed or changed from ``paper`` to ``mini``."""
    a, b = _leaves(paper), _leaves(mini)
    return sorted(p for p in set(a) | set(b) if a.get(p, object()) != b.get(p, object()))


def allowed(path: str) -> bool:
    """Whether ``path`` (or a parent of it) matches an allow-list pattern."""
    parts = path.split(".")
    for pattern in MAY_SHRINK:
        n = len(pattern.split("."))
        if len(parts) >= n and fnmatch.fnmatchcase(".".join(parts[:n]), pattern):
            if all("." not in p for p in parts[:n]):  # '*' never spans two names
                return True
    return False


def rescale_count(n: float, n_paper: int, n_mini: int) -> int:
    """A count subset of the paper (``n`` of ``n_paper``) on a log scale to ``n_mini``.

    ``n' = round(n_mini ** (log n / log n_paper))``: nesting and order are kept, and sizes that
    differ by decades in the study stay distinct on a few dozen examples.
    """
    return max(1, min(n_mini, round(n_mini ** (math.log(n) / math.log(n_paper)))))


def miniature(
    paper: dict,
    datasets: dict[str, dict[str, Any]],
    train_counts: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """The miniature of ``paper``.

    ``datasets``: dataset -> ``{"download": {...}, "split": {...}}`` replacing those blocks
    (miniature upstream endpoints and pins; split settings for a few dozen examples).
    ``train_counts``: dataset -> (training examples in the study, in the miniature), for
    count subsets.
    """
    cfg = copy.deepcopy(paper)
    for name, ds in cfg["datasets"].items():
        over = datasets.get(name, {})
        if "download" in over:
            ds["download"] = over["download"]
        if "split" in over:
            ds["split"] = over["split"]
        for sub in ds["subsets"].values():
            if sub.get("unit", "fraction") != "fraction":
                n_paper, n_mini = train_counts[name]
                sub["size"] = rescale_count(sub["size"], n_paper, n_mini)
    geom = cfg["datasets"]["geom"]["preprocess"]
    geom.update(grid_size=16, grid_spacing=1.0)  # 15 Å across instead of 16 Å: same molecules
    den = cfg["tasks"]["denoising"]["task_cfg"]
    for key in ("grid_size", "grid_spacing"):
        if key in den:
            den[key] = geom[key]
    for task in cfg["tasks"].values():
        task["size"] = "tiny"
        t = task["train"]
        t["steps"], t["checkpoint_every"], t["analysis_step"] = STEPS, 2, 2
        t["batch_size"] = min(t["batch_size"], 4)
        if "warmup_steps" in t:
            t["warmup_steps"] = 1
        if "keep_steps" in t:
            t["keep_steps"] = [2]
        task["eval"] = {**task["eval"], **EVAL}
    for exp in cfg["experiments"].values():
        if "size" in exp:
            exp["size"] = "tiny"
        if "train" in exp:
            if "steps" in exp["train"]:
                exp["train"]["steps"] = STEPS
            if "batch_size" in exp["train"]:
                exp["train"]["batch_size"] = min(exp["train"]["batch_size"], 4)
        exp["resources"] = {"gpu": 0, "runtime": 30, "mem_mb": 4000}
    for a in cfg.get("analyses", {}).values():
        spec = a.get("spec", {})
        if "grid" in spec:
            spec["grid"] = 3
        if "ks" in spec:
            spec["ks"] = spec["ks"][:2]
        if a["kind"] in ("landscape", "twirling"):
            spec["n_examples"] = 2
            a["spec"] = spec
        if a["kind"] == "twirling":
            spec["ks"] = spec.get("ks", [1, 2])[:2]
            spec["repeats"] = 1
        if a["kind"] == "md":
            spec.update(molecules=1, rotations=1, length_fs=MD_FS, times_fs=[MD_FS])
            spec["checkpoints"] = ["checkpoints/step2.pt", "model.pt"]
    for fig in cfg.get("figures", {}).values():
        style = fig.get("style", {})
        if "xmax" in style:
            style["xmax"] = STEPS
        if "dip_window" in style:
            style["dip_window"] = [1, STEPS]
        if "shade_after" in style:
            style["shade_after"] = STEPS // 2
        if "time_fs" in style:
            style["time_fs"] = MD_FS
    return cfg


def names(cfg: dict) -> dict[str, set]:
    """The names a report is made of: experiments, analyses, figures, subsets per dataset."""
    return {
        "experiments": set(cfg["experiments"]),
        "analyses": set(cfg.get("analyses", {})),
        "figures": set(cfg.get("figures", {})),
        **{f"subsets:{d}": set(ds["subsets"]) for d, ds in cfg["datasets"].items()},
    }
