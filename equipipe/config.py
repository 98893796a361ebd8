"""Config: schema validation, cross-checks, and each job's own slice.

Imported by ``rules/common.smk`` at planning time, so it must stay light (no torch, e3nn or
rdkit): the paper grid plans in well under 5 s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

# Kept here (not imported from the model modules) so planning never imports torch; a test
# checks it against equipipe.models.registry.SIZES.
MODEL_SIZES: dict[str, tuple[str, ...]] = {
    "escaip": ("tiny", "1M", "4M", "6M"),
    "equivariant": ("tiny", "1M", "4M", "6M"),
    "proteina": ("tiny", "60M", "400M"),
    "voxmol": ("tiny", "7M", "28M", "111M"),
}
TASK_DATASETS = {"forcefield": "spice", "flowmatching": "pdb", "denoising": "geom"}
DATASET_SOURCES = {
    "spice": ("embedded", "spice-2.0.1", "spice-1.1.4", "maceoff23"),
    "pdb": ("embedded", "remote"),
    "geom": ("embedded", "geom-rdkit", "midi"),
}


class ConfigError(ValueError):
    """A config problem, naming the key and the allowed values."""


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins; inputs are not modified."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def validate_schema(cfg: dict) -> dict:
    """Validate against the JSON schema, filling defaults (as snakemake.utils.validate does)."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema):
        for prop, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub:
                instance.setdefault(prop, copy.deepcopy(sub["default"]))
        yield from validator_cls.VALIDATORS["properties"](validator, properties, instance, schema)

    filling = jsonschema.validators.extend(validator_cls, {"properties": set_defaults})
    errors = sorted(filling(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where}: {e.message}")
    return cfg


def check_config(cfg: dict) -> dict:
    """Cross-references the schema cannot express; raises ConfigError naming key and allowed values."""
    datasets, tasks, exps = cfg["datasets"], cfg["tasks"], cfg["experiments"]
    for name, ds in datasets.items():
        allowed = DATASET_SOURCES.get(name)
        if allowed is None:
            raise ConfigError(
                f"datasets.{name}: unknown dataset; allowed: {', '.join(DATASET_SOURCES)}"
            )
        if ds["source"] not in allowed:
            raise ConfigError(
                f"datasets.{name}.source: {ds['source']!r} is not allowed; allowed: {', '.join(allowed)}"
            )
    for name, t in tasks.items():
        if t["dataset"] not in datasets:
            raise ConfigError(
                f"tasks.{name}.dataset: {t['dataset']!r} is not configured; allowed: {', '.join(datasets)}"
            )
        if t["size"] not in MODEL_SIZES.get(t["model"], ()):
            raise ConfigError(
                f"tasks.{name}.size: {t['size']!r} is not a size of model {t['model']!r}; "
                f"allowed: {', '.join(MODEL_SIZES.get(t['model'], ()))}"
            )
        if name not in TASK_DATASETS and t.get("kind") not in TASK_DATASETS:
            raise ConfigError(
                f"tasks.{name}: unknown task kind; set kind to one of {', '.join(TASK_DATASETS)}"
            )
    for name, e in exps.items():
        where = f"experiments.{name}"
        if e["task"] not in tasks:
            raise ConfigError(
                f"{where}.task: {e['task']!r} is not configured; allowed: {', '.join(tasks)}"
            )
        t = tasks[e["task"]]
        ds = datasets[t["dataset"]]
        if e["subset"] not in ds["subsets"]:
            raise ConfigError(
                f"{where}.subset: {e['subset']!r} is not a subset of {t['dataset']}; allowed: {', '.join(ds['subsets'])}"
            )
        model = e.get("model", t["model"])
        if model not in MODEL_SIZES:
            raise ConfigError(
                f"{where}.model: {model!r} is unknown; allowed: {', '.join(MODEL_SIZES)}"
            )
        size = e.get("size", t["size"])
        if size not in MODEL_SIZES[model]:
            raise ConfigError(
                f"{where}.size: {size!r} is not a size of model {model!r}; allowed: {', '.join(MODEL_SIZES[model])}"
            )
    for name, f in cfg.get("figures", {}).items():
        for e in f.get("experiments", []):
            if e not in exps:
                raise ConfigError(
                    f"figures.{name}.experiments: {e!r} is not an experiment; allowed: {', '.join(exps)}"
                )
        for a in f.get("analyses", []):
            if a not in cfg.get("analyses", {}):
                raise ConfigError(
                    f"figures.{name}.analyses: {a!r} is not an analysis; allowed: {', '.join(cfg.get('analyses', {}))}"
                )
    for name, a in cfg.get("analyses", {}).items():
        for e in [a.get("experiment")] + list(a.get("experiments", [])):
            if e is not None and e not in exps:
                raise ConfigError(
                    f"analyses.{name}: experiment {e!r} is not configured; allowed: {', '.join(exps)}"
                )
    return cfg


def load_config(path: Path) -> dict:
    """Read, validate (with defaults) and cross-check a config file."""
    cfg = yaml.safe_load(Path(path).read_text())
    return check_config(validate_schema(cfg))


# --- slices for jobs (pure functions of the config) -----------------------------------


def task_kind(cfg: dict, task: str) -> str:
    return cfg["tasks"][task].get("kind", task)


def runs(cfg: dict) -> list[tuple[str, int]]:
    """Every (experiment, seed) to train."""
    return [(name, int(s)) for name, e in cfg["experiments"].items() for s in e["seeds"]]


def run_spec(cfg: dict, experiment: str, seed: int) -> dict[str, Any]:
    """The JSON slice a training job gets: task defaults merged with the experiment's overrides."""
    e = cfg["experiments"][experiment]
    t = cfg["tasks"][e["task"]]
    model = e.get("model", t["model"])
    task_cfg = deep_merge(t.get("task_cfg", {}), e.get("task_cfg", {}))
    task_cfg["model"] = model
    task_cfg.setdefault("model_overrides", {})
    return {
        "experiment": experiment,
        "seed": int(seed),
        "task": task_kind(cfg, e["task"]),
        "dataset": t["dataset"],
        "subset": e["subset"],
        "model": model,
        "size": e.get("size", t["size"]),
        "study_ref": e.get("study_ref"),
        "task_cfg": task_cfg,
        "train": deep_merge(t.get("train", {}), e.get("train", {})),
        "eval": deep_merge(t.get("eval", {}), e.get("eval", {})),
    }


def run_spec_json(cfg: dict, experiment: str, seed: int) -> str:
    return json.dumps(run_spec(cfg, experiment, seed), sort_keys=True)


def dataset_of_experiment(cfg: dict, experiment: str) -> str:
    return cfg["tasks"][cfg["experiments"][experiment]["task"]]["dataset"]
