"""The tuning sweep of the efficiency gap (issue 17), summarised from its finished runs.

``config/tuning.yaml`` trains each model of the gap at several learning rates and warm-ups and
evaluates on the validation split; :func:`summarise_sweep` reads those run folders (run.json +
metrics.parquet) and writes two small CSVs that are committed beside the docs and read by the
efficiency gap (its band over the sweep and the spread of c*):

* ``sweep_curves.csv`` — one row per run and evaluation step: ``experiment, model, lr,
  warmup_steps, schedule, lr_floor, steps, sec_per_step, split (the data split evaluated, from
  run.json eval_config), step, total, total_se, equiv, mean, pct`` (held-out squared error of the primary field per component: total, unbiased
  equivariance error, unbiased twirled error; pct = equiv / total).
* ``sweep_final.csv`` — one row per run at its last step, plus ``chosen`` (per model, the
  setting with the lowest final held-out total; ties by the smaller learning rate).

A run's model is run.json ``model`` (``escaip``, ``equivariant``, ``nequip``); its learning rate,
warm-up and schedule come from run.json ``train_config``, so the summary does not depend on the
experiment names.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

CURVE_COLUMNS = (
    "experiment", "model", "lr", "warmup_steps", "schedule", "lr_floor", "steps",
    "sec_per_step", "split", "step", "total", "total_se", "equiv", "mean", "pct",
)  # fmt: skip
# metrics-table name -> column (the unbiased estimators where the run has them)
_METRICS = {
    "total": "total",
    "total_se": "total_se",
    "equiv_unbiased": "equiv",
    "mean_unbiased": "mean",
    "pct": "pct",
}


def run_curves(run_dir: Path, split: str = "val") -> pl.DataFrame:
    """The held-out curve of one finished run in the ``sweep_curves.csv`` layout."""
    from equipipe.collect import read_run
    from equipipe.metrics import read_metrics

    info = read_run(Path(run_dir))
    df = read_metrics(Path(run_dir), info)
    fld = info.get("primary_field")
    df = df.filter(pl.col("split") == split, pl.col("metric").is_in(list(_METRICS)))
    if fld is not None:
        df = df.filter(pl.col("field") == fld)
    if df.height == 0:
        raise ValueError(f"{run_dir}: no {sorted(_METRICS)} rows on split {split!r} ({fld})")
    wide = (
        df.group_by("step", "metric")
        .agg(pl.col("value").mean())
        .pivot(on="metric", index="step", values="value")
        .rename({k: v for k, v in _METRICS.items() if k != v})
        .sort("step")
    )
    for col in _METRICS.values():
        if col not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(col))
    tc = info.get("train_config") or {}
    seed = int(info.get("seed", 0))
    consts = {  # one row group per run: a second seed of an experiment is its own setting
        "experiment": info["experiment"] + (f"/seed{seed}" if seed else ""),
        "model": info.get("model"),
        "lr": float(tc["lr"]),
        "warmup_steps": int(tc.get("warmup_steps") or 0),
        "schedule": tc.get("schedule", "constant"),
        "lr_floor": float(tc.get("lr_floor", 0.0)),
        "steps": int(tc.get("steps") or info.get("steps")),
        "sec_per_step": float(info.get("sec_per_step") or float("nan")),
        # the data split evaluated (metric rows carry the label "val" whichever it was)
        "split": (info.get("eval_config") or {}).get("split", split),
    }
    wide = wide.with_columns(pl.lit(v).alias(k) for k, v in consts.items())
    return wide.select(CURVE_COLUMNS)


def final_rows(curves: pl.DataFrame) -> pl.DataFrame:
    """One row per run at its last evaluated step, with ``chosen`` per model (lowest total)."""
    last = curves.group_by("experiment").agg(pl.col("step").max().alias("_last"))
    fin = (
        curves.join(last, on="experiment")
        .filter(pl.col("step") == pl.col("_last"))
        .drop("_last")
        .sort("model", "lr", "warmup_steps")
    )
    best = fin.sort("total", "lr").group_by("model", maintain_order=True).first()
    chosen = set(best.get_column("experiment").to_list())
    return fin.with_columns(pl.col("experiment").is_in(list(chosen)).alias("chosen"))


def summarise_sweep(runs_dir: Path, out_dir: Path, prefix: str = "tune_", split: str = "val"):
    """Read every finished ``<runs_dir>/<prefix>*/seed*/`` run; write ``sweep_curves.csv`` and
    ``sweep_final.csv`` into ``out_dir``; return (curves, finals). Unfinished runs (no run.json)
    are listed on the returned frame's absence, never guessed."""
    runs_dir = Path(runs_dir)
    dirs = sorted(
        d.parent
        for d in runs_dir.glob(f"{prefix}*/seed*/run.json")
        if (d.parent / "metrics.parquet").is_file()
    )
    if not dirs:
        raise FileNotFoundError(f"no finished {prefix}* runs under {runs_dir}")
    curves = pl.concat([run_curves(d, split) for d in dirs], how="vertical_relaxed")
    curves = curves.sort("model", "lr", "warmup_steps", "step")
    finals = final_rows(curves)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves.write_csv(out_dir / "sweep_curves.csv")
    finals.write_csv(out_dir / "sweep_final.csv")
    return curves, finals


def markdown_table(finals: pl.DataFrame) -> str:
    """Final held-out total per learning rate (columns) and model x warm-up (rows), the chosen
    setting of each model in bold; a setting that did not finish shows as "—"."""
    lrs = sorted(set(finals.get_column("lr").to_list()))
    head = "| model | warm-up | " + " | ".join(f"lr {x:g}" for x in lrs) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(lrs)]
    for (model, wu), g in finals.sort("model", "warmup_steps").group_by(
        "model", "warmup_steps", maintain_order=True
    ):
        cells = []
        for x in lrs:
            r = g.filter(pl.col("lr") == x)
            if r.height == 0:
                cells.append("—")
                continue
            v = f"{r.get_column('total')[0]:.3f}"
            cells.append(f"**{v}**" if r.get_column("chosen")[0] else v)
        lines.append(f"| {model} | {wu} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_sweep(path: Path) -> pl.DataFrame:
    """``sweep_curves.csv`` as written by :func:`summarise_sweep`."""
    df = pl.read_csv(Path(path))
    missing = set(CURVE_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a sweep summary (missing columns {sorted(missing)})")
    return df


def repo_path(path: str | Path) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository root (the
    committed sweep summary is read from a pipeline working directory elsewhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[1] / p
