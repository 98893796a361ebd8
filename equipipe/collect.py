"""Stack every run's metric table and compare the measured curves with the study's numbers.

``collect(run_dirs, out_metrics, out_comparison)`` reads ``<run>/metrics.parquet`` (long
format, ``equipipe.metrics``) and ``<run>/run.json`` for every run and writes

* ``out_metrics`` (``results/metrics_all.parquet``): all rows, with ``experiment, seed, task,
  model, size`` in front;
* ``out_comparison`` (``results/paper_comparison.parquet``): per run (``level="run"``) and per
  experiment (``level="experiment"``, mean and range over seeds) the dip step, the minimum
  (dip) pct and the final pct of the primary field, for every split that logs ``pct`` and
  every flow time ``t`` present, beside the study's numbers (``STUDY_REF``);
* ``paper_comparison.rst`` next to ``out_comparison``: the experiment-level rows as an RST
  grid table for the report.

run.json keys read here: ``experiment, seed, task, model, size`` (required), and optionally
``primary_field`` (default: the field-less rows, else the first field), ``study_ref`` (a key
of ``STUDY_REF``), ``dip_window`` ([lo, hi] in steps, either may be null), ``smoothing_s`` (the
EMA scale for the dip; default 1000).

The dip window of a run: the experiment's ``dip_window`` from the config (``dip_windows``,
passed by the collect rule from ``experiments.<name>.dip_window``), else run.json's, else the
default (the whole run). The window used is a column of the table (``dip_window_lo``,
``dip_window_hi``) and is printed beside the dip.

Definitions (all pct values in PERCENT in the outputs):
* dip step / min pct: argmin / minimum of the variable-span-EMA-smoothed pct inside the dip
  window (``equipipe.smoothing.dip``);
* final pct: mean of the raw pct over the last ``final_last_n`` evaluations (default 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from equipipe.metrics import empty_metrics, read_metrics
from equipipe.smoothing import DEFAULT_S, dip

__all__ = [
    "STUDY_REF",
    "collect",
    "comparison_table",
    "load_runs",
    "pct_scale",
    "read_run",
    "render_rst",
    "run_key",
]

# The study's headline numbers (PAPER.md, "Headline numbers"), read off the authors' figures.
# Keyed by the experiment KIND a config names with ``study_ref``. Text columns keep the
# table's wording; numeric (lo, hi) ranges are in steps / percent, None where the table is
# silent. The "lr 1e-3 / 1e-4 / SGD" row is split into its three runs (one dip each).
STUDY_REF: dict[str, dict] = {
    "escaip_default": {
        "label": "EScAIP default",
        "early": "~20% until ~300 steps, ~5% at 1k, ~2% at 2k",
        "dip": "~0.1% at step 4,740",
        "final": "~0.05% at ~445k",
        "dip_step": (4740, 4740),
        "dip_pct": (0.1, 0.1),
        "final_pct": (0.05, 0.05),
    },
    "escaip_adam_lr1e-3": {
        "label": "EScAIP Adam lr 1e-3",
        "early": "",
        "dip": "dip at 1,600 steps",
        "final": "0.06-0.17% (lr 1e-3 / 1e-4 / SGD)",
        "dip_step": (1600, 1600),
        "dip_pct": None,
        "final_pct": (0.06, 0.17),
    },
    "escaip_adam_lr1e-4": {
        "label": "EScAIP Adam lr 1e-4",
        "early": "",
        "dip": "dip at 3,100 steps",
        "final": "0.06-0.17% (lr 1e-3 / 1e-4 / SGD)",
        "dip_step": (3100, 3100),
        "dip_pct": None,
        "final_pct": (0.06, 0.17),
    },
    "escaip_sgd_lr1e-5": {
        "label": "EScAIP SGD lr 1e-5",
        "early": "",
        "dip": "dip at 10,300 steps",
        "final": "0.06-0.17% (lr 1e-3 / 1e-4 / SGD)",
        "dip_step": (10300, 10300),
        "dip_pct": None,
        "final_pct": (0.06, 0.17),
    },
    "escaip_500": {
        "label": "EScAIP 500 examples",
        "early": "",
        "dip": "~0.08%",
        "final": "~5.5% (overfits)",
        "dip_step": None,
        "dip_pct": (0.08, 0.08),
        "final_pct": (5.5, 5.5),
    },
    "proteina_60m": {
        "label": "Proteína 60M",
        "early": "~12% at ~100 steps, 1.5-2.5% at 1k",
        "dip": "0.2-0.6% at 2-10k",
        "final": "0.05% (t=0) ... 6.5% (t=0.9)",
        "dip_step": (2000, 10000),
        "dip_pct": (0.2, 0.6),
        "final_pct": (0.05, 6.5),
        "final_pct_by_t": {0.0: 0.05, 0.9: 6.5},
    },
    "voxmol_111m_data": {
        "label": "VoxMol 111M, data runs",
        "early": "",
        "dip": "1.0-2.3% at 7-11k",
        # the authors' continuous-rotation values include their own resampling floor (white
        # noise and trilinear resampling: docs/voxel_rotations.md); ours are floor-free
        "final": "7-13% (incl. the authors' resampling floor: a floor-free value need not match)",
        "dip_step": (7000, 11000),
        "dip_pct": (1.0, 2.3),
        "final_pct": (7.0, 13.0),
    },
    "voxmol_28m": {
        "label": "VoxMol 28M",
        "early": "",
        "dip": "8.8%",
        "final": "~20% (incl. the authors' resampling floor)",
        "dip_step": None,
        "dip_pct": (8.8, 8.8),
        "final_pct": (20.0, 20.0),
    },
    "voxmol_7m": {
        "label": "VoxMol 7M",
        "early": "",
        "dip": "6.8%",
        "final": "~20% (incl. the authors' resampling floor)",
        "dip_step": None,
        "dip_pct": (6.8, 6.8),
        "final_pct": (20.0, 20.0),
    },
}

_REQUIRED_RUN_KEYS = ("experiment", "seed", "task", "model", "size")


def run_key(experiment: str, seed: int) -> str:
    """Key of a run in the ``runs`` dict the figures take: ``"<experiment>/<seed>"``."""
    return f"{experiment}/{int(seed)}"


def read_run(run_dir: Path) -> dict:
    """``run.json`` of one run directory, checked for the keys collect needs."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {run_dir} a finished run directory?")
    info = json.loads(path.read_text())
    missing = [k for k in _REQUIRED_RUN_KEYS if k not in info]
    if missing:
        raise ValueError(f"{path} lacks required key(s) {missing}")
    return info


def load_runs(run_dirs: Sequence[Path]) -> dict[str, dict]:
    """run.json of every run, keyed by ``run_key(experiment, seed)`` (the figures' ``runs``)."""
    runs: dict[str, dict] = {}
    for d in run_dirs:
        info = read_run(d)
        key = run_key(info["experiment"], info["seed"])
        if key in runs:
            raise ValueError(f"two run directories claim run {key!r} (second: {d})")
        runs[key] = info
    return runs


def pct_scale(units) -> float:
    """Factor that turns stored ``pct`` values into percent: 1 if their unit says %, else 100.

    The decomposition stores pct as a fraction (E_unb / T); a unit of "%" or "percent" means
    the values are already percentages.
    """
    for u in units:
        if u is not None and str(u).strip().lower() in ("%", "percent", "pct"):
            return 1.0
    return 100.0


def _pct_rows(df: pl.DataFrame, primary_field: str | None) -> tuple[pl.DataFrame, str | None]:
    """pct rows of the primary field (fallback: field-less rows, else the first field)."""
    pct = df.filter(pl.col("metric") == "pct")
    fields = pct.get_column("field")
    present = sorted({f for f in fields.to_list() if f is not None})
    if primary_field is not None and primary_field in present:
        return pct.filter(pl.col("field") == primary_field), primary_field
    if fields.null_count() > 0:
        return pct.filter(pl.col("field").is_null()), None
    if present:
        return pct.filter(pl.col("field") == present[0]), present[0]
    return pct.clear(), primary_field


def _window(
    info: dict, default, dip_windows: dict | None = None
) -> tuple[float | None, float | None] | None:
    w = (dip_windows or {}).get(str(info["experiment"]))
    if w is None:
        w = info.get("dip_window", default)
    if w is None:
        return None
    if len(w) != 2:
        raise ValueError(f"dip_window must be [lo, hi], got {w!r}")
    return (w[0], w[1])


def _run_rows(
    df: pl.DataFrame,
    info: dict,
    dip_window,
    s: float | None,
    final_last_n: int,
    dip_windows: dict | None = None,
) -> list[dict]:
    """One comparison row per (split, t) of the primary field's pct in one run."""
    pct, field = _pct_rows(df, info.get("primary_field"))
    window = _window(info, dip_window, dip_windows)
    lo, hi = window if window is not None else (None, None)
    s_run = info.get("smoothing_s", s)
    rows = []
    keys = pct.select("split", "t").unique().sort("split", "t", nulls_last=False)
    for split, t in keys.iter_rows():
        cond = pl.col("split") == split
        cond = cond & (pl.col("t").is_null() if t is None else pl.col("t") == t)
        curve = (
            pct.filter(cond)
            .group_by("step")
            .agg(pl.col("value").mean(), pl.col("unit").first())
            .sort("step")
        )
        curve = curve.filter(pl.col("value").is_finite())
        if curve.height == 0:
            continue
        scale = pct_scale(curve.get_column("unit").to_list())
        steps = curve.get_column("step").to_numpy()
        values = curve.get_column("value").to_numpy() * scale
        try:
            dip_step, dip_value = dip(steps, values, window=window, s=s_run)
        except ValueError:
            dip_step, dip_value = None, math.nan
        n = max(1, int(final_last_n))
        rows.append(
            {
                "split": split,
                "field": field,
                "t": t,
                "n_evals": int(curve.height),
                "last_step": int(steps[-1]),
                "dip_step": dip_step,
                "dip_window_lo": None if lo is None else float(lo),
                "dip_window_hi": None if hi is None else float(hi),
                "min_pct": dip_value,
                "final_pct": float(values[-n:].mean()),
            }
        )
    return rows


def _study_columns(ref_key: str | None, t: float | None) -> dict:
    ref = STUDY_REF.get(ref_key) if ref_key else None
    if ref_key and ref is None:
        raise ValueError(f"study_ref {ref_key!r} is not one of {sorted(STUDY_REF)}")
    cols = {
        "study_ref": ref_key,
        "study_label": None,
        "study_early": None,
        "study_dip": None,
        "study_final": None,
        "study_dip_step_lo": None,
        "study_dip_step_hi": None,
        "study_dip_pct_lo": None,
        "study_dip_pct_hi": None,
        "study_final_pct_lo": None,
        "study_final_pct_hi": None,
    }
    if ref is None:
        return cols
    cols.update(
        study_label=ref["label"],
        study_early=ref["early"] or None,
        study_dip=ref["dip"] or None,
        study_final=ref["final"] or None,
    )
    for name in ("dip_step", "dip_pct", "final_pct"):
        rng = ref.get(name)
        if rng is not None:
            cols[f"study_{name}_lo"], cols[f"study_{name}_hi"] = float(rng[0]), float(rng[1])
    by_t = ref.get("final_pct_by_t", {})
    if t is not None and any(abs(t - tk) < 1e-9 for tk in by_t):
        v = next(v for tk, v in by_t.items() if abs(t - tk) < 1e-9)
        cols["study_final_pct_lo"] = cols["study_final_pct_hi"] = float(v)
    return cols


_COMPARISON_SCHEMA: dict[str, pl.DataType] = {
    "level": pl.String,
    "experiment": pl.String,
    "seed": pl.Int64,
    "n_seeds": pl.Int64,
    "task": pl.String,
    "model": pl.String,
    "size": pl.String,
    "split": pl.String,
    "field": pl.String,
    "t": pl.Float64,
    "n_evals": pl.Int64,
    "last_step": pl.Int64,
    "dip_step": pl.Float64,
    "dip_step_min": pl.Float64,
    "dip_step_max": pl.Float64,
    "dip_window_lo": pl.Float64,
    "dip_window_hi": pl.Float64,
    "min_pct": pl.Float64,
    "min_pct_min": pl.Float64,
    "min_pct_max": pl.Float64,
    "final_pct": pl.Float64,
    "final_pct_min": pl.Float64,
    "final_pct_max": pl.Float64,
    "study_ref": pl.String,
    "study_label": pl.String,
    "study_early": pl.String,
    "study_dip": pl.String,
    "study_final": pl.String,
    "study_dip_step_lo": pl.Float64,
    "study_dip_step_hi": pl.Float64,
    "study_dip_pct_lo": pl.Float64,
    "study_dip_pct_hi": pl.Float64,
    "study_final_pct_lo": pl.Float64,
    "study_final_pct_hi": pl.Float64,
}


def comparison_table(
    per_run: list[tuple[dict, pl.DataFrame]],
    *,
    dip_window=None,
    dip_windows: dict | None = None,
    s: float | None = DEFAULT_S,
    final_last_n: int = 1,
    include_unmatched: bool = True,
) -> pl.DataFrame:
    """The measured-vs-study table from ``[(run.json, that run's metric rows), ...]``.

    ``dip_windows``: experiment -> [lo, hi] (the config's ``experiments.<name>.dip_window``),
    taking precedence over run.json's ``dip_window`` and the default ``dip_window``.

    ``include_unmatched`` adds one row per STUDY_REF entry that no experiment names
    (``level="study"``, measured columns null), so the report shows the study's whole table.
    """
    run_rows: list[dict] = []
    for info, df in per_run:
        base = {
            "experiment": str(info["experiment"]),
            "seed": int(info["seed"]),
            "task": str(info["task"]),
            "model": str(info["model"]),
            "size": str(info["size"]),
            "study_ref": info.get("study_ref"),
        }
        for r in _run_rows(df, info, dip_window, s, final_last_n, dip_windows):
            run_rows.append({**base, **r})

    out: list[dict] = []
    for r in run_rows:
        row = {k: r[k] for k in ("experiment", "seed", "task", "model", "size")}
        row.update(level="run", n_seeds=1, split=r["split"], field=r["field"], t=r["t"])
        row.update(n_evals=r["n_evals"], last_step=r["last_step"])
        row.update(dip_window_lo=r["dip_window_lo"], dip_window_hi=r["dip_window_hi"])
        for name in ("dip_step", "min_pct", "final_pct"):
            v = r[name]
            v = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            row[name] = row[f"{name}_min"] = row[f"{name}_max"] = v
        row.update(_study_columns(r["study_ref"], r["t"]))
        out.append(row)

    groups: dict[tuple, list[dict]] = {}
    for r in out:
        groups.setdefault((r["experiment"], r["split"], r["field"], r["t"]), []).append(r)
    exp_rows = []
    for (exp, split, field, t), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        first = rs[0]
        row = {k: first[k] for k in ("task", "model", "size")}
        row.update(level="experiment", experiment=exp, seed=None, n_seeds=len(rs))
        row.update(split=split, field=field, t=t)
        row.update(n_evals=min(r["n_evals"] for r in rs), last_step=max(r["last_step"] for r in rs))
        row.update(dip_window_lo=first["dip_window_lo"], dip_window_hi=first["dip_window_hi"])
        for name in ("dip_step", "min_pct", "final_pct"):
            vals = [r[name] for r in rs if r[name] is not None]
            row[name] = sum(vals) / len(vals) if vals else None
            row[f"{name}_min"] = min(vals) if vals else None
            row[f"{name}_max"] = max(vals) if vals else None
        row.update(_study_columns(first["study_ref"], t))
        exp_rows.append(row)

    rows = exp_rows + out
    if include_unmatched:
        named = {r["study_ref"] for r in rows if r["study_ref"]}
        for key in STUDY_REF:
            if key not in named:
                row = dict.fromkeys(_COMPARISON_SCHEMA)
                row.update(level="study", n_seeds=0)
                row.update(_study_columns(key, None))
                rows.append(row)
    order = {"experiment": 0, "run": 1, "study": 2}
    rows.sort(
        key=lambda r: (
            order[r["level"]],
            r["experiment"] or "",
            r["split"] or "",
            r["field"] or "",
            -1.0 if r["t"] is None else r["t"],
            -1 if r["seed"] is None else r["seed"],
        )
    )
    return pl.DataFrame(rows, schema=_COMPARISON_SCHEMA, orient="row")


def _fmt_num(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if v != 0 else "0"


def _fmt_range(mean, lo, hi, *, step: bool = False, unit: str = "") -> str:
    if mean is None:
        return ""
    f = (lambda v: f"{v:,.0f}") if step else _fmt_num
    if lo is None or hi is None or lo == hi:
        return f"{f(mean)}{unit}"
    return f"{f(mean)}{unit} [{f(lo)}–{f(hi)}]"


def _fmt_window(r: dict) -> str:
    """The dip window of a row as "lo–hi" steps ("start" / "end" where open)."""
    lo, hi = r["dip_window_lo"], r["dip_window_hi"]
    if lo is None and hi is None:
        return "whole run"
    a = "start" if lo is None else f"{lo:,.0f}"
    b = "end" if hi is None else f"{hi:,.0f}"
    return f"{a}–{b}"


def _grid_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(ch: str) -> str:
        return "+" + "+".join(ch * (w + 2) for w in widths) + "+"

    def cells(vals: list[str]) -> str:
        return "|" + "|".join(f" {v:<{w}} " for v, w in zip(vals, widths)) + "|"

    parts = [line("-"), cells(headers), line("=")]
    for r in rows:
        parts += [cells(r), line("-")]
    return "\n".join(parts)


def render_rst(table: pl.DataFrame, *, s: float | None = DEFAULT_S) -> str:
    """RST rendering of the experiment-level (and unmatched study) rows of the comparison."""
    headers = [
        "experiment",
        "split",
        "field",
        "t",
        "seeds",
        "dip window",
        "dip step",
        "dip (min pct)",
        "final pct (step)",
        "study run",
        "study early",
        "study dip",
        "study end",
    ]
    rows = []
    for r in table.filter(pl.col("level") != "run").iter_rows(named=True):
        final = _fmt_range(r["final_pct"], r["final_pct_min"], r["final_pct_max"], unit="%")
        if final and r["last_step"] is not None:
            final += f" ({r['last_step']:,})"
        rows.append(
            [
                r["experiment"] or "(not run)",
                r["split"] or "",
                r["field"] or "",
                "" if r["t"] is None else f"{r['t']:g}",
                str(r["n_seeds"] or ""),
                _fmt_window(r) if r["level"] != "study" else "",
                _fmt_range(r["dip_step"], r["dip_step_min"], r["dip_step_max"], step=True),
                _fmt_range(r["min_pct"], r["min_pct_min"], r["min_pct_max"], unit="%"),
                final,
                r["study_label"] or "",
                r["study_early"] or "",
                r["study_dip"] or "",
                r["study_final"] or "",
            ]
        )
    smoothing = f"s = {s:g}" if s else "no smoothing"
    intro = (
        "Measured versus study\n"
        "=====================\n\n"
        "Share of held-out squared error caused by imperfect rotational equivariance (pct, "
        "unbiased, in %), primary output field. *dip step* and *dip (min pct)*: argmin and "
        f"minimum of the variable-span EMA of pct ({smoothing} unless the run sets "
        "``smoothing_s``) inside the *dip window* (steps; the experiment's ``dip_window`` in the "
        "config: the study reads its dip early in training, e.g. EScAIP's ~0.1 % near step "
        "4,740 lies before a lower final value); *final pct*: last evaluation, at the step in "
        "brackets, reported separately from the dip. "
        "Values are means over seeds, [range] where several seeds ran. Study values are read "
        "off the authors' figures (PAPER.md); rows marked *(not run)* have no matching "
        "experiment in this configuration.\n\n"
    )
    return intro + _grid_table(headers, rows) + "\n"


def collect(
    run_dirs: Sequence[Path],
    out_metrics: Path,
    out_comparison: Path,
    *,
    dip_window: tuple[float | None, float | None] | None = None,
    dip_windows: dict | None = None,
    s: float | None = DEFAULT_S,
    final_last_n: int = 1,
    include_unmatched: bool = True,
) -> pl.DataFrame:
    """Write metrics_all, paper_comparison (.parquet and .rst beside it); return the comparison.

    ``dip_windows`` (experiment -> [lo, hi], from the config) take precedence over a run's
    ``dip_window`` in its run.json, which takes precedence over the default ``dip_window``;
    a run's ``smoothing_s`` over ``s``.
    """
    run_dirs = [Path(d) for d in run_dirs]
    seen: set[str] = set()
    frames: list[pl.DataFrame] = []
    per_run: list[tuple[dict, pl.DataFrame]] = []
    for d in run_dirs:
        info = read_run(d)
        key = run_key(info["experiment"], info["seed"])
        if key in seen:
            raise ValueError(f"two run directories claim run {key!r} (second: {d})")
        seen.add(key)
        df = read_metrics(d, info)
        frames.append(df)
        per_run.append((info, df))
    metrics = pl.concat(frames, how="diagonal_relaxed") if frames else empty_metrics()

    out_metrics = Path(out_metrics)
    out_comparison = Path(out_comparison)
    out_metrics.parent.mkdir(parents=True, exist_ok=True)
    out_comparison.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_parquet(out_metrics)

    table = comparison_table(
        per_run,
        dip_window=dip_window,
        dip_windows=dip_windows,
        s=s,
        final_last_n=final_last_n,
        include_unmatched=include_unmatched,
    )
    table.write_parquet(out_comparison)
    out_comparison.with_suffix(".rst").write_text(render_rst(table, s=s))
    return table
