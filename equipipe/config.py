"""Config: schema validation, cross-checks, and each job's own slice.

Size (~670 lines): every plan-time cross-field check lives here, so a config error is raised
and worded in one place; the schema itself is workflow/schemas/config.schema.yaml.

Imported by ``rules/common.smk`` at planning time, so it must stay light (no torch, e3nn or
rdkit): the paper grid plans in well under 5 s.
"""

from __future__ import annotations

import copy
import functools
import json
import re
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
    "nequip": ("tiny", "1M", "4M", "6M"),
    "proteina": ("tiny", "60M", "400M"),
    "voxmol": ("tiny", "7M", "28M", "111M"),
}
TASK_DATASETS = {"forcefield": "spice", "flowmatching": "pdb", "denoising": "geom"}


# EvalConfig.split's default (equipipe/train.py holds the train/eval defaults; a test keeps
# this equal to it without importing torch at plan time).
EVAL_SPLIT_DEFAULT = "val"


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


# --- the schema: one place for every key, its type and its default ---------------------------

# Blocks whose allowed keys depend on a name (dataset, task kind, model, analysis kind, figure
# kind). Each is a ``$defs`` entry ``"<kind>:<name>"`` of the schema (figure styles: built from
# ``figure_style_keys`` and ``figure_style_kinds``).
BLOCK_KINDS = (
    "download",
    "embedded",
    "preprocess",
    "task_cfg",
    "model_overrides",
    "analysis",
    "figure_style",
    "resources",
)


def read_yaml(path: Path) -> Any:
    """A YAML file with the safe loader (libyaml's when installed: planning stays fast)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(path).read_text(), Loader=loader)


@functools.cache
def _schema() -> dict:
    return read_yaml(SCHEMA)


def schema() -> dict:
    """The config schema (a fresh copy: callers may fill defaults into what it returns)."""
    return copy.deepcopy(_schema())


def figure_kinds() -> tuple[str, ...]:
    """The figure kinds the schema knows (a test checks them against ``equipipe.figures.KINDS``)."""
    return tuple(_schema()["$defs"]["figure_style_kinds"])


def block_names(kind: str) -> tuple[str, ...]:
    """The names a block kind is defined for, e.g. ``block_names("preprocess")`` -> datasets."""
    if kind == "figure_style":
        return figure_kinds()
    if kind == "resources":
        return ("train",)
    return tuple(k.split(":", 1)[1] for k in _schema()["$defs"] if k.startswith(kind + ":"))


def block_schema(kind: str, name: str) -> dict:
    """The JSON schema of one free-form block, e.g. ``block_schema("task_cfg", "forcefield")``.

    Raises ConfigError (naming the allowed names) for an unknown kind or name.
    """
    if kind not in BLOCK_KINDS:
        raise ConfigError(f"unknown config block kind {kind!r}; allowed: {', '.join(BLOCK_KINDS)}")
    defs = _schema()["$defs"]
    if kind == "resources":
        return copy.deepcopy(defs["resources"])
    if kind == "figure_style":
        kinds = defs["figure_style_kinds"]
        if name not in kinds:
            raise ConfigError(f"unknown figure kind {name!r}; allowed: {', '.join(kinds)}")
        types = defs["figure_style_keys"]["properties"]
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: copy.deepcopy(types[k]) for k in kinds[name]},
        }
    key = f"{kind}:{name}"
    if key not in defs:
        raise ConfigError(
            f"no {kind} options for {name!r}; allowed: {', '.join(block_names(kind))}"
        )
    return copy.deepcopy(defs[key])


def defaults(kind: str, name: str) -> dict[str, Any]:
    """Default values of one free-form block, read from the schema (the only place they live).

    ``defaults("preprocess", "spice")``, ``defaults("download", "pdb")``,
    ``defaults("embedded", "geom")``, ``defaults("task_cfg", "forcefield")``,
    ``defaults("model_overrides", "escaip")`` (``{}``: the model's size presets hold its
    values), ``defaults("analysis", "landscape")``, ``defaults("resources", "train")``.
    Keys without a default (optional overrides) are absent. Returns a fresh dict.
    """
    props = block_schema(kind, name).get("properties", {})
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def with_defaults(spec: dict | None, base: dict[str, Any], what: str) -> dict[str, Any]:
    """An analysis spec over its defaults ``base`` (``kind`` dropped); an unknown key is a
    ValueError naming ``what`` and the allowed keys."""
    spec = dict(spec or {})
    spec.pop("kind", None)
    unknown = sorted(set(spec) - set(base))
    if unknown:
        raise ValueError(
            f"{what} spec key {unknown[0]!r} is unknown; allowed: {', '.join(sorted(base))}"
        )
    return {**base, **spec}


def allowed_keys(kind: str, name: str) -> list[str]:
    """Keys a config may set in one block (internal keys, set by the workflow, excluded)."""
    props = block_schema(kind, name).get("properties", {})
    return [k for k, v in props.items() if not v.get("x-internal")]


def dataset_sources() -> dict[str, tuple[str, ...]]:
    """Dataset name -> the sources the schema allows for it."""
    defs = _schema()["$defs"]
    return {
        n: tuple(defs[f"dataset:{n}"]["properties"]["source"]["enum"])
        for n in block_names("dataset")
    }


def dataset_defaults(name: str) -> dict[str, Any]:
    """Flat defaults of a dataset's download, embedded and preprocess blocks (+ download_dir).

    For modules that read one flat dict; a key that two blocks share has one default.
    """
    out: dict[str, Any] = {"download_dir": None}
    for kind in ("download", "embedded", "preprocess"):
        out.update(defaults(kind, name))
    return out


def _message(e, where: str) -> str:
    path = ".".join(p for p in [where, *[str(p) for p in e.absolute_path]] if p)
    if e.validator == "additionalProperties" and isinstance(e.instance, dict):
        props = e.schema.get("properties", {})
        allowed = [k for k, v in props.items() if not v.get("x-internal")]
        extra = [k for k in e.instance if k not in props or props[k].get("x-internal")]
        key = ".".join(p for p in [path, str(extra[0]) if extra else ""] if p)
        return (
            f"config key {key} is not allowed here; allowed keys: "
            f"{', '.join(allowed) if allowed else '(none)'}"
        )
    if e.validator == "enum":
        return (
            f"config key {path or '(top level)'}: {e.instance!r} is not allowed; "
            f"allowed: {', '.join(map(str, e.validator_value))}"
        )
    if e.validator == "required":
        return f"config key {path or '(top level)'}: {e.message}"
    hint = ""
    if e.validator == "type" and isinstance(e.instance, str) and _looks_numeric(e.instance):
        text = e.instance.strip()
        hint = f" (YAML reads {text} as text: write {yaml_number(text)})"
    return f"config key {path or '(top level)'}: {e.message}{hint}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def yaml_number(text: str) -> str:
    """How to write the number ``text`` so that YAML reads a number: a dot in the mantissa and
    a signed exponent (``1e-3`` -> ``1.0e-3``, ``5e4`` -> ``5.0e+4``, ``1.0e3`` -> ``1.0e+3``)."""
    m = re.fullmatch(r"([+-]?)(\d*)(?:\.(\d*))?[eE]([+-]?)(\d+)", text.strip())
    if not m:
        return repr(float(text))
    sign, whole, frac, esign, exp = m.groups()
    return f"{sign}{whole or '0'}.{frac or '0'}e{esign or '+'}{exp}"


def _validator(schema_: dict, fill: bool):
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema_)
    if not fill:
        return validator_cls(schema_)

    def set_defaults(validator, properties, instance, schema):
        for prop, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub:
                instance.setdefault(prop, copy.deepcopy(sub["default"]))
        yield from validator_cls.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})(schema_)


def _raise_first(validator, instance, where: str = "") -> None:
    errors = sorted(
        validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        raise ConfigError(_message(errors[0], where))


def validate_schema(cfg: dict) -> dict:
    """Validate against the JSON schema, filling defaults (as snakemake.utils.validate does).

    Errors name the key's full path and, for an unknown key, the allowed keys.
    """
    if not isinstance(cfg, dict):
        raise ConfigError("the config must be a mapping with datasets, tasks and experiments")
    _raise_first(_validator(schema(), fill=True), cfg)
    return cfg


def validate_block(value: Any, kind: str, name: str, where: str, *, fill: bool = False) -> Any:
    """Validate one free-form block (e.g. a task_cfg for its kind); errors name ``where.key``."""
    sub = block_schema(kind, name)
    sub["$defs"] = _schema()["$defs"]
    _raise_first(_validator(sub, fill), value, where)
    return value


def check_config(cfg: dict) -> dict:
    """Cross-references the schema cannot express; raises ConfigError naming key and allowed values."""
    datasets, tasks, exps = cfg["datasets"], cfg["tasks"], cfg["experiments"]
    sources = dataset_sources()
    for name, ds in datasets.items():
        allowed = sources.get(name)
        if allowed is None:
            raise ConfigError(f"datasets.{name}: unknown dataset; allowed: {', '.join(sources)}")
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
        ev = deep_merge(t.get("eval", {}), e.get("eval", {}))
        if ev.get("spectrum_every", 0) > 0 and ev.get("k") is not None and ev["k"] < 3:
            raise ConfigError(
                f"{where}.eval: spectrum_every needs k >= 3 rotations (pairs of distinct "
                f"rotations besides the mean), got k={ev['k']}; raise k or set spectrum_every: 0"
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
    _check_dataset_blocks(cfg)
    _check_task_blocks(cfg)
    _check_analyses(cfg)
    _check_figures(cfg)
    return cfg


def _check_dataset_blocks(cfg: dict) -> None:
    """Source-specific keys, subset sizes and split names of every dataset."""
    for name, ds in cfg["datasets"].items():
        for kind in ("download", "embedded", "preprocess"):
            props = block_schema(kind, name).get("properties", {})
            for key, value in (ds.get(kind) or {}).items():
                only = props.get(key, {}).get("x-sources")
                if only and ds["source"] not in only and value != props[key].get("default"):
                    raise ConfigError(
                        f"datasets.{name}.{kind}.{key}: applies only to source "
                        f"{' | '.join(only)}, not {ds['source']!r}; remove it or change the source"
                    )
        if ds["source"] == "embedded" and ds.get("download_dir"):
            raise ConfigError(
                f"datasets.{name}.download_dir: the embedded source is built offline and reads "
                "no release files; remove download_dir or choose a release as source"
            )
        for sub, s in ds["subsets"].items():
            where = f"datasets.{name}.subsets.{sub}.size"
            unit = s.get("unit", "fraction")
            if unit == "fraction" and s["size"] > 1:
                raise ConfigError(
                    f"{where}: {s['size']} is a fraction above 1; write 0 < size <= 1, or give "
                    "a count with unit: conformers | chains | molecules | examples"
                )
            if unit != "fraction" and float(s["size"]) != int(s["size"]):
                raise ConfigError(
                    f"{where}: a count of {unit} must be a whole number, got {s['size']}"
                )


def split_names(cfg: dict, dataset: str) -> list[str]:
    """The splits a dataset's split step produces (fractions above 0, predefined targets)."""
    sp = cfg["datasets"][dataset].get("split") or {}
    names = [k for k, v in (sp.get("fractions") or {}).items() if v > 0]
    names += [v for v in ((sp.get("predefined") or {}).get("values") or {}).values()]
    return sorted(set(names), key=["train", "val", "test"].index)


def _merged_task_cfg(cfg: dict, experiment: str) -> dict:
    e = cfg["experiments"][experiment]
    return deep_merge(cfg["tasks"][e["task"]].get("task_cfg") or {}, e.get("task_cfg") or {})


def _check_task_cfg(cfg: dict, task: str, experiment: str | None) -> None:
    """Validate one merged per-run task_cfg for its kind and model; errors name the key's origin."""
    t = cfg["tasks"][task]
    kind = task_kind(cfg, task)
    e = cfg["experiments"][experiment] if experiment else {}
    own = (e.get("task_cfg") or {}) if experiment else {}
    merged = deep_merge(t.get("task_cfg") or {}, own)
    model = e.get("model", t["model"])

    def origin(key: str, sub: str | None = None) -> str:
        block = own.get(sub) if sub else own
        if experiment and isinstance(block, dict) and key in block:
            return f"experiments.{experiment}.task_cfg"
        return f"tasks.{task}.task_cfg"

    allowed = allowed_keys("task_cfg", kind)
    for key in merged:
        if key not in allowed:
            hint = (
                " (set the model with tasks.<name>.model / experiments.<name>.model)"
                if key == "model"
                else ""
            )
            raise ConfigError(
                f"config key {origin(key)}.{key} is not allowed for task kind {kind!r}{hint}; "
                f"allowed keys: {', '.join(allowed)}"
            )
        validate_block({key: merged[key]}, "task_cfg", kind, origin(key))
    overrides = merged.get("model_overrides") or {}
    m_allowed = allowed_keys("model_overrides", model)
    for key, value in overrides.items():
        where = f"{origin(key, 'model_overrides')}.model_overrides"
        if key not in m_allowed:
            via = f" (merged into experiment {experiment!r})" if experiment else ""
            raise ConfigError(
                f"config key {where}.{key} is not a field of model {model!r}{via}; "
                f"allowed keys: {', '.join(m_allowed)}"
            )
        validate_block({key: value}, "model_overrides", model, where)
    if kind == "denoising":
        pre = cfg["datasets"].get(t["dataset"], {}).get("preprocess") or {}
        grid = {**defaults("preprocess", "geom"), **pre}
        for key in ("grid_size", "grid_spacing"):
            if key in merged and merged[key] != grid[key]:
                raise ConfigError(
                    f"{origin(key)}.{key}: {merged[key]} differs from "
                    f"datasets.{t['dataset']}.preprocess.{key} = {grid[key]} (the max-radius "
                    f"filter's grid); the task's grid is derived from the dataset's: remove "
                    f"{key} from task_cfg and set it in datasets.{t['dataset']}.preprocess"
                )


def _check_task_blocks(cfg: dict) -> None:
    used = set()
    for name, e in cfg["experiments"].items():
        _check_task_cfg(cfg, e["task"], name)
        used.add(e["task"])
        t = cfg["tasks"][e["task"]]
        ev = deep_merge(t.get("eval") or {}, e.get("eval") or {})
        split = ev.get("split", EVAL_SPLIT_DEFAULT)
        have = split_names(cfg, t["dataset"])
        if split not in have:
            src = (
                "experiments." + name if "split" in (e.get("eval") or {}) else "tasks." + e["task"]
            )
            raise ConfigError(
                f"{src}.eval.split: {split!r} is not a split of dataset {t['dataset']!r} "
                f"(datasets.{t['dataset']}.split makes: {', '.join(have)}); allowed: {', '.join(have)}"
            )
    for task in cfg["tasks"]:
        if task not in used:
            _check_task_cfg(cfg, task, None)


def _check_analyses(cfg: dict) -> None:
    for name, a in (cfg.get("analyses") or {}).items():
        kind = a["kind"]
        where = f"analyses.{name}.spec"
        allowed = allowed_keys("analysis", kind)
        for key in a.get("spec") or {}:
            if key not in allowed:
                hint = (
                    f" (set analyses.{name}.{key})"
                    if key in ("checkpoint", "seed") and key not in allowed
                    else ""
                )
                raise ConfigError(
                    f"config key {where}.{key} is not allowed for analysis kind {kind!r}{hint}; "
                    f"allowed keys: {', '.join(allowed)}"
                )
        validate_block(a.get("spec") or {}, "analysis", kind, where)
        if kind in ("landscape", "twirling"):
            if not a.get("experiment"):
                raise ConfigError(
                    f"analyses.{name}.experiment: a {kind} analysis reads one run; name its experiment"
                )
            a.setdefault("checkpoint", defaults("analysis", kind)["checkpoint"])
            split = (a.get("spec") or {}).get("split", defaults("analysis", kind)["split"])
            ds = dataset_of_experiment(cfg, a["experiment"])
            have = split_names(cfg, ds)
            if split not in have:
                raise ConfigError(
                    f"{where}.split: {split!r} is not a split of dataset {ds!r}; allowed: {', '.join(have)}"
                )
        elif kind == "efficiency":
            exps = list(a.get("experiments") or [])
            if len(exps) < 2:
                raise ConfigError(
                    f"analyses.{name}.experiments: an efficiency analysis compares two "
                    "experiments (baseline, equivariant); list both"
                )
            spec = _spec_naming_experiments(a, kind, ("baseline", "equivariant"), where, name)
            have = sorted(set().union(*(metric_splits(cfg, e) for e in exps)))
            if spec["split"] not in have:
                raise ConfigError(
                    f"{where}.split: {spec['split']!r} is not a split the experiments log; "
                    f"allowed: {', '.join(have)}"
                )
        elif kind == "decay":
            if not a.get("experiments"):
                raise ConfigError(
                    f"analyses.{name}.experiments: a decay analysis fits the runs of the "
                    "experiments it lists; list them"
                )
        elif kind == "md":
            exps = list(a.get("experiments") or [])
            if not exps:
                raise ConfigError(
                    f"analyses.{name}.experiments: an md analysis reads the runs of the model "
                    "under test (and of an e3nn floor); list them"
                )
            spec = _spec_naming_experiments(a, kind, ("model", "equivariant"), where, name)
            ds = dataset_of_experiment(cfg, spec["model"] or exps[0])
            have = split_names(cfg, ds)
            if spec["split"] not in have:
                raise ConfigError(
                    f"{where}.split: {spec['split']!r} is not a split of dataset {ds!r}; allowed: {', '.join(have)}"
                )


def _spec_naming_experiments(
    a: dict, kind: str, keys: tuple[str, ...], where: str, name: str
) -> dict[str, Any]:
    """An analysis spec over its defaults whose ``keys`` (when set) name experiments of the
    analysis's ``experiments`` list; ConfigError naming the allowed ones otherwise."""
    exps = list(a.get("experiments") or [])
    spec = {**defaults("analysis", kind), **(a.get("spec") or {})}
    for key in keys:
        if spec[key] is not None and spec[key] not in exps:
            raise ConfigError(
                f"{where}.{key}: {spec[key]!r} is not one of analyses.{name}.experiments; "
                f"allowed: {', '.join(exps)}"
            )
    return spec


def _check_figures(cfg: dict) -> None:
    kinds = figure_kinds()
    for name, f in (cfg.get("figures") or {}).items():
        if f["kind"] not in kinds:
            raise ConfigError(
                f"figures.{name}.kind: {f['kind']!r} is not a figure kind; allowed: {', '.join(kinds)}"
            )
        where = f"figures.{name}.style"
        allowed = allowed_keys("figure_style", f["kind"])
        for key in f.get("style") or {}:
            if key not in allowed:
                raise ConfigError(
                    f"config key {where}.{key} is not read by figure kind {f['kind']!r}; "
                    f"allowed keys: {', '.join(allowed)}"
                )
        validate_block(f.get("style") or {}, "figure_style", f["kind"], where)
        for key in ("baseline", "equivariant"):
            value = (f.get("style") or {}).get(key)
            if value is not None and value not in f.get("experiments", []):
                raise ConfigError(
                    f"{where}.{key}: {value!r} is not one of figures.{name}.experiments; "
                    f"allowed: {', '.join(f.get('experiments', []))}"
                )
        if f["kind"] == "grad_ratio":
            for e in f.get("experiments", []):
                ev = experiment_eval(cfg, e)
                if ev.get("grad_norm_batches", 1) == 0:  # 1: EvalConfig's default
                    raise ConfigError(
                        f"figures.{name}: grad_ratio draws experiment {e!r}, whose gradient-norm "
                        f"ratio is off (eval.grad_norm_batches: 0); set experiments.{e}.eval."
                        f"grad_norm_batches >= 1 or drop {e!r} from figures.{name}.experiments"
                    )
        split = (f.get("style") or {}).get("split")
        if split is not None and f.get("experiments"):
            have = sorted(set().union(*(metric_splits(cfg, e) for e in f["experiments"])))
            for value in [split] if isinstance(split, str) else split:
                if value not in have:
                    raise ConfigError(
                        f"{where}.split: {value!r} is not a split the drawn experiments log; "
                        f"allowed: {', '.join(have)}"
                    )


def experiment_eval(cfg: dict, experiment: str) -> dict:
    """An experiment's ``eval`` block: its task's, overridden by its own."""
    e = cfg["experiments"][experiment]
    return deep_merge(cfg["tasks"][e["task"]].get("eval") or {}, e.get("eval") or {})


def metric_splits(cfg: dict, experiment: str) -> set[str]:
    """Split labels of an experiment's metric rows: train, val and, for the denoising task, one
    ``val_<mode>`` per evaluation mode (``equipipe.train`` labels the evaluated split ``val``)."""
    e = cfg["experiments"][experiment]
    out = {"train", "val"}
    if task_kind(cfg, e["task"]) == "denoising":
        modes = _merged_task_cfg(cfg, experiment).get("eval_modes")
        out |= {f"val_{m}" for m in modes or defaults("task_cfg", "denoising")["eval_modes"]}
    return out


def load_config(path: Path) -> dict:
    """Read, validate (with defaults) and cross-check a config file."""
    return check_config(validate_schema(read_yaml(path)))


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
    if task_kind(cfg, e["task"]) == "denoising":
        # one place for the grid: the dataset's preprocess block (its max-radius filter)
        pre = {
            **defaults("preprocess", "geom"),
            **(cfg["datasets"][t["dataset"]].get("preprocess") or {}),
        }
        task_cfg.update(grid_size=pre["grid_size"], grid_spacing=pre["grid_spacing"])
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


def dip_windows(cfg: dict) -> dict[str, list]:
    """experiment -> its ``dip_window`` [lo, hi] (steps) where the config sets one: what the
    collect and headlines rules pass to ``equipipe collect/headlines --dip-windows``."""
    return {
        name: list(e["dip_window"])
        for name, e in cfg["experiments"].items()
        if e.get("dip_window") is not None
    }


def run_spec_json(cfg: dict, experiment: str, seed: int) -> str:
    return json.dumps(run_spec(cfg, experiment, seed), sort_keys=True)


def dataset_of_experiment(cfg: dict, experiment: str) -> str:
    return cfg["tasks"][cfg["experiments"][experiment]["task"]]["dataset"]
