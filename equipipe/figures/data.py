"""The data a figure reads: ``FigureContext`` (spec, metrics table, run facts) and its selection.

* ``spec``: ``{"kind": str, "experiments": [names], "style": {...}, "caption": str}``;
* ``metrics``: the collected table (``results/metrics_all.parquet``; ``equipipe.metrics`` columns plus
  ``experiment, seed, task, model, size``);
* ``runs``: run.json contents keyed ``"<experiment>/<seed>"`` (``equipipe.collect.load_runs``);
* ``extra``: named extra inputs (analysis output folders) for kinds that need them.

Split selection never substitutes one split for another. A figure draws the split it asks for
(the kind's argument, else style ``split``, else ``"val"``); when an experiment logs the metric
but not in that split, ``FigureContext.rows`` raises ``MissingSplitError`` naming the splits it
does log (so the figure job fails with that message), or, for callers that pass
``missing="empty"`` (optional overlays, or kinds that draw a note in the empty panel), returns
no rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from equipipe.collect import pct_scale
from equipipe.figures.style import PALETTE

DEFAULT_SPLIT = "val"
Missing = Literal["error", "empty"]


class MissingSplitError(ValueError):
    """An experiment logs a metric, but not in the split a figure asks for."""


@dataclass
class FigureContext:
    """Everything a kind function sees, with helpers to select and aggregate curves."""

    spec: dict
    metrics: pl.DataFrame
    runs: dict[str, dict]
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def style(self) -> dict:
        return self.spec.get("style") or {}

    def opt(self, key: str, default=None):
        v = self.style.get(key)
        return default if v is None else v

    @property
    def experiments(self) -> list[str]:
        wanted = list(self.spec.get("experiments") or [])
        present = self.metrics.get_column("experiment").unique(maintain_order=True).to_list()
        if not present:
            raise ValueError(f"figure ({self.spec.get('kind')}): the metrics table has no rows")
        if not wanted:
            return present
        missing = [e for e in wanted if e not in present]
        if missing:
            raise ValueError(
                f"figure ({self.spec.get('kind')}): experiment(s) {missing} have no rows in the "
                f"metrics table; present: {present}"
            )
        return wanted

    # ---- run facts
    def run_infos(self, exp: str) -> list[dict]:
        infos = [r for r in self.runs.values() if r.get("experiment") == exp]
        if not infos:
            infos = [r for k, r in self.runs.items() if k.split("/")[0] == exp]
        return sorted(infos, key=lambda r: r.get("seed", 0))

    def run_info(self, exp: str) -> dict:
        infos = self.run_infos(exp)
        return infos[0] if infos else {}

    def steps_per_epoch(self, exp: str) -> float | None:
        info = self.run_info(exp)
        spe = info.get("steps_per_epoch")
        if spe:
            return float(spe)
        n, b = info.get("n_train"), info.get("batch_size")
        return float(math.ceil(n / b)) if n and b else None

    def label(self, exp: str) -> str:
        return str((self.style.get("labels") or {}).get(exp, exp))

    def color(self, exp: str, i: int):
        return (self.style.get("colors") or {}).get(exp, PALETTE[i % len(PALETTE)])

    def primary_field(self, exp: str) -> str | None:
        return self.style.get("field") or self.run_info(exp).get("primary_field")

    def analysis_dir(self, table: str) -> Path:
        """The analysis folder drawn: style ``analysis`` (a name in ``extra``), else the first
        input folder holding ``table``."""
        name = self.style.get("analysis")
        if name is not None:
            if name not in self.extra:
                raise ValueError(
                    f"figure ({self.spec.get('kind')}): analysis {name!r} is not an input; "
                    f"inputs: {sorted(self.extra)}"
                )
            if not (Path(self.extra[name]) / table).is_file():
                raise ValueError(
                    f"figure ({self.spec.get('kind')}): analysis {name!r} holds no {table}"
                )
            return Path(self.extra[name])
        for path in self.extra.values():
            if (Path(path) / table).is_file():
                return Path(path)
        raise ValueError(
            f"figure ({self.spec.get('kind')}): no analysis input holds {table}; add the "
            f"analysis to the figure's 'analyses' (inputs: {sorted(self.extra)})"
        )

    # ---- selection
    def in_split(
        self,
        df: pl.DataFrame,
        exp: str,
        what: str,
        split: str | None = None,
        missing: Missing = "error",
    ) -> pl.DataFrame:
        """``df`` (rows of one experiment and metric) in one split, never another.

        ``split``: the caller's, else style ``split`` (a list: its first), else "val". Rows
        in other splits only: ``missing="error"`` raises MissingSplitError naming the splits
        present, ``missing="empty"`` returns no rows.
        """
        if missing not in ("error", "empty"):
            raise ValueError(f"missing={missing!r}; allowed: error, empty")
        want = split or self.opt("split", DEFAULT_SPLIT)
        if isinstance(want, list | tuple):
            want = want[0]
        if df.height == 0:
            return df
        out = df.filter(pl.col("split") == want)
        if out.height == 0 and missing == "error":
            have = sorted(df.get_column("split").unique().to_list())
            raise MissingSplitError(
                f"figure {self.spec.get('name') or self.spec.get('kind')!r}: experiment {exp!r} "
                f"logs {what} in split(s) {have}, not in {want!r}; name one in the figure's "
                f"style 'split'"
            )
        return out

    def rows(
        self,
        exp: str,
        metric: str,
        *,
        split: str | None = None,
        field_name: str | None = None,
        missing: Missing = "error",
    ) -> pl.DataFrame:
        """Rows of one metric for one experiment, one split (``in_split``) and one field.

        Field: the requested one (default: primary field), else field-less rows, else the
        first field. No rows of the metric at all: an empty frame (the kind draws a note).
        """
        df = self.metrics.filter((pl.col("experiment") == exp) & (pl.col("metric") == metric))
        df = self.in_split(df, exp, f"metric {metric!r}", split, missing)
        if df.height == 0:
            return df
        f = field_name or self.primary_field(exp)
        fields = df.get_column("field")
        present = sorted({x for x in fields.to_list() if x is not None})
        if f is not None and f in present:
            return df.filter(pl.col("field") == f)
        if fields.null_count() > 0:
            return df.filter(pl.col("field").is_null())
        return df.filter(pl.col("field") == present[0]) if present else df

    def pct_scale(self, df: pl.DataFrame) -> float:
        return (
            pct_scale(df.get_column("unit").unique().to_list()) if "unit" in df.columns else 100.0
        )

    def unit(self, exp: str, metric: str = "total") -> str | None:
        df = self.rows(exp, metric)
        units = [u for u in df.get_column("unit").unique().to_list() if u] if df.height else []
        return units[0] if units else None


# --------------------------------------------------------------------------- aggregation


def flow_times(df: pl.DataFrame, ctx: FigureContext | None = None) -> list[float | None]:
    """Flow times present in ``df``, sorted (None first); limited to style ``t`` if given."""
    ts = sorted(df.get_column("t").unique().to_list(), key=lambda t: -1.0 if t is None else t)
    want = ctx.style.get("t") if ctx is not None else None
    if want is None:
        return ts
    want = [want] if isinstance(want, int | float) else list(want)
    return [t for t in ts if t is None or any(abs(t - w) < 1e-9 for w in want)]


def t_filter(df: pl.DataFrame, t: float | None) -> pl.DataFrame:
    return df.filter(pl.col("t").is_null() if t is None else pl.col("t") == t)


def over_seeds(df: pl.DataFrame) -> pl.DataFrame:
    """Per step: mean, min, max and count of ``value`` over seeds (seed-averaged first)."""
    per_seed = df.group_by("seed", "step").agg(pl.col("value").mean())
    return (
        per_seed.group_by("step")
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").min().alias("lo"),
            pl.col("value").max().alias("hi"),
            pl.len().alias("n"),
        )
        .sort("step")
    )


def seed_curves(df: pl.DataFrame) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """One ``(seed, steps, values)`` per seed (values averaged per step), by seed."""
    out = []
    for (seed,), g in df.group_by("seed"):
        g = g.group_by("step").agg(pl.col("value").mean()).sort("step")
        out.append((seed, g.get_column("step").to_numpy(), g.get_column("value").to_numpy()))
    return sorted(out, key=lambda c: c[0])
