"""Model registry: name -> (module path, sizes), imported lazily.

Each registered module exposes ``build(size: str, **overrides) -> nn.Module`` and raises
ValueError for unknown overrides. Adding a model = one line in ``_MODELS``; nothing heavy is
imported until a model of that family is built.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection, Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar, cast

import torch
from torch import nn

# name -> (module path, sizes in the order the CLI lists them)
_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "escaip": ("equipipe.models.escaip", ("tiny", "1M", "4M", "6M")),
    "proteina": ("equipipe.models.proteina", ("tiny", "60M", "400M")),
    "voxmol": ("equipipe.models.voxmol", ("tiny", "7M", "28M", "111M")),
    "equivariant": ("equipipe.models.equivariant", ("tiny", "1M", "4M", "6M")),
    "nequip": ("equipipe.models.nequip_adapter", ("tiny", "1M", "4M", "6M")),
}

SIZES: dict[str, tuple[str, ...]] = {name: sizes for name, (_, sizes) in _MODELS.items()}
C = TypeVar("C")  # a model family's config dataclass


def _entry(name: str, size: str) -> str:
    if name not in _MODELS:
        raise ValueError(f"model {name!r} is unknown; allowed: {', '.join(_MODELS)}")
    module, sizes = _MODELS[name]
    if size not in sizes:
        raise ValueError(f"size {size!r} of model {name!r} is unknown; allowed: {', '.join(sizes)}")
    return module


def build_model(
    name: str, size: str, stats: dict[str, Any] | None = None, **overrides: Any
) -> nn.Module:
    """Build ``name`` at ``size`` with config-field overrides (errors name the allowed values).

    ``stats``: training statistics from :func:`task_statistics`, for models that take them.
    """
    module = importlib.import_module(_entry(name, size))
    if stats is not None and hasattr(module, "task_statistics"):
        return module.build(size, stats=stats, **overrides)
    return module.build(size, **overrides)


def task_statistics(name: str, examples: list[dict[str, Any]], **overrides: Any) -> dict | None:
    """A model family's own normalisation statistics of the training examples (NequIP's
    neighbour count, force RMS, elements), or None for families without any."""
    module = importlib.import_module(_entry(name, SIZES[name][0]))
    if not hasattr(module, "task_statistics"):
        return None
    return module.task_statistics(examples, overrides.get("r_max"))


def sized_config(
    family: str,
    base: C,
    sizes: Mapping[str, C | dict[str, Any]],
    size: str,
    overrides: dict[str, Any],
    fixed: Collection[str] = (),
) -> C:
    """The config dataclass of a named size with field overrides (errors name allowed values).

    Args:
        family: the model's registry name, for messages.
        base: the family's default config (a dataclass instance; its fields are the allowed
            overrides).
        sizes: size name -> a whole config, or the fields that differ from ``base``.
        size: the size asked for. overrides: field -> value.
        fixed: fields that are not overrides (set from training statistics).
    """
    if size not in sizes:
        raise ValueError(f"{family} size {size!r} is unknown; allowed: {', '.join(sizes)}")
    allowed = [f.name for f in fields(cast(Any, base)) if f.name not in fixed]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"{family} override {unknown[0]!r} is unknown; allowed: {', '.join(allowed)}"
        )
    sized = sizes[size]
    cfg = replace(cast(Any, base), **sized) if isinstance(sized, dict) else sized
    return replace(cfg, **overrides)


def param_count(model: nn.Module) -> int:
    """Number of trainable parameters (works on meta-device models too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def size_label(size: str) -> int | None:
    """Nominal parameter count of a size label: "6M" -> 6_000_000, "tiny" -> None."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kMB])", size)
    if match is None:
        return None
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]
    return round(float(match.group(1)) * scale)


def model_info_rows(model: str | None = None) -> list[dict[str, Any]]:
    """One row per (model, size), for ``equipipe model-info``; ``model`` restricts to one name.

    Keys: ``model``, ``size``, ``params``, ``label`` (nominal count, None for e.g. "tiny"),
    ``ok`` (params within 10 % of the label; None without a label). Models are built on the
    meta device: no memory is allocated, so 400M-parameter entries count in well under a second.
    """
    if model is not None and model not in _MODELS:
        raise ValueError(f"model {model!r} is unknown; allowed: {', '.join(_MODELS)}")
    rows = []
    for name in _MODELS if model is None else [model]:
        for size in SIZES[name]:
            with torch.device("meta"):
                built = build_model(name, size)
            params = param_count(built)
            label = size_label(size)
            ok = None if label is None else abs(params - label) <= 0.1 * label
            rows.append({"model": name, "size": size, "params": params, "label": label, "ok": ok})
    return rows
