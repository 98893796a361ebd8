"""The metrics table of a run: its columns, their types and version, and reading it back.

Every training run writes ``metrics.parquet`` in long format, one row per (step, metric[, field]
[, t][, ell][, layer]) with the columns of ``METRICS_SCHEMA`` (CONTRIBUTING.md, "Metrics
table"). ``RUN_COLUMNS`` are the run's identity columns that ``read_metrics`` puts in front
(from run.json) when tables of several runs are stacked (``equipipe.collect``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

__all__ = [
    "METRICS_SCHEMA",
    "METRICS_SCHEMA_VERSION",
    "NULLABLE_SINCE",
    "RUN_COLUMNS",
    "empty_metrics",
    "read_metrics",
]

METRICS_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.Int64,
    "epoch": pl.Float64,
    "wall_s": pl.Float64,
    "split": pl.String,
    "metric": pl.String,
    "field": pl.String,
    "t": pl.Float64,
    "value": pl.Float64,
    "n_elements": pl.Int64,
    "unit": pl.String,
    "ell": pl.String,  # irrep label of spectrum rows ("0".."lmax", A1..T2), else null (v2)
    "layer": pl.String,  # probed module of hidden-feature rows, else null (v2)
}
# 1: the first ten columns; 2: adds the nullable ``ell`` and ``layer`` (tables of version 1
# are read with both null). run.json records the version its metrics.parquet was written with.
METRICS_SCHEMA_VERSION = 2
NULLABLE_SINCE: dict[str, int] = {"ell": 2, "layer": 2}
RUN_COLUMNS: dict[str, pl.DataType] = {
    "experiment": pl.String,
    "seed": pl.Int64,
    "task": pl.String,
    "model": pl.String,
    "size": pl.String,
}


def read_metrics(run_dir: Path, info: dict) -> pl.DataFrame:
    """One run's ``metrics.parquet`` in the current schema, with ``RUN_COLUMNS`` in front.

    ``info`` is the run's run.json (identity and ``metrics_schema_version``); a table of an
    older version gets its later nullable columns as nulls, a newer one is refused.
    """
    path = Path(run_dir) / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {run_dir} a finished run directory?")
    df = pl.read_parquet(path)
    version = int(info.get("metrics_schema_version", 1))
    if version > METRICS_SCHEMA_VERSION:
        raise ValueError(
            f"{path} has metrics schema version {version}; this equipipe reads up to "
            f"{METRICS_SCHEMA_VERSION}: update equipipe"
        )
    df = df.with_columns(
        pl.lit(None, METRICS_SCHEMA[c]).alias(c)
        for c, since in NULLABLE_SINCE.items()
        if c not in df.columns and version < since
    )
    absent = [c for c in METRICS_SCHEMA if c not in df.columns]
    if absent:
        raise ValueError(f"{path} lacks column(s) {absent} (see CONTRIBUTING.md, Metrics table)")
    df = df.with_columns([pl.col(c).cast(dt) for c, dt in METRICS_SCHEMA.items()])
    front = [
        pl.lit(str(info["experiment"]), pl.String).alias("experiment"),
        pl.lit(int(info["seed"]), pl.Int64).alias("seed"),
        pl.lit(str(info["task"]), pl.String).alias("task"),
        pl.lit(str(info["model"]), pl.String).alias("model"),
        pl.lit(str(info["size"]), pl.String).alias("size"),
    ]
    extra = [c for c in df.columns if c not in METRICS_SCHEMA]
    return df.select([*front, *METRICS_SCHEMA, *extra])


def empty_metrics() -> pl.DataFrame:
    """A stacked metrics table without rows (``RUN_COLUMNS`` then ``METRICS_SCHEMA``)."""
    return pl.DataFrame(schema={**RUN_COLUMNS, **METRICS_SCHEMA})
