"""``equipipe diff-reports A B``: do two reports (or a report and the study) agree?

A and B are report zips (``snakemake --report results/report.zip``) or results folders; both
carry ``headlines.csv`` (``equipipe.headlines``). For every experiment, split, field and flow
time present in either, and every headline quantity (dip pct, final pct, final error), the
table gives A, B, their difference, the standard error of the difference
``sqrt(se_A^2 + se_B^2)`` and ``z = (B - A) / se``; ``flag`` is set where ``|z| > threshold``
(default 3), where the numbers differ but no standard error is available (one evaluation
batch), and where a row is in only one of the two. Dip steps are listed, never flagged (their
noise is not estimated).

``B = "study"`` compares A with the study's table (``equipipe.collect.STUDY_REF``, for the
experiments that name a ``study_ref``): B is the study's value or range [lo, hi], the
difference is the distance from A to that range (0 inside it), in units of A's standard error.

``diff_main`` prints the table and returns the exit status: 0 when nothing is flagged, 1 else.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import polars as pl

from equipipe.collect import STUDY_REF
from equipipe.headlines import HEADLINE_SCHEMA, QUANTITIES, headline_table

__all__ = ["diff_main", "diff_study", "diff_tables", "load_headlines"]

KEYS = ("experiment", "split", "field", "t")

DIFF_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.String,
    "split": pl.String,
    "field": pl.String,
    "t": pl.Float64,
    "quantity": pl.String,
    "a": pl.Float64,
    "b": pl.Float64,
    "b_hi": pl.Float64,
    "diff": pl.Float64,
    "se": pl.Float64,
    "z": pl.Float64,
    "flag": pl.Boolean,
    "note": pl.String,
}


def _read_csv(data: bytes | Path) -> pl.DataFrame:
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    return pl.read_csv(src, schema=HEADLINE_SCHEMA)


def load_headlines(source: str | Path) -> pl.DataFrame:
    """Headline table of a report zip or a results folder.

    A folder is searched for ``headlines.csv`` (itself or ``results/``), else the table is
    computed from its ``runs/<experiment>/seed<k>`` folders.
    """
    source = Path(source)
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = [n for n in z.namelist() if n.endswith("headlines.csv")]
            if not names:
                raise ValueError(
                    f"{source}: the report holds no headlines.csv (made before equipipe "
                    "recorded headline numbers?); compare the results folders instead"
                )
            return _read_csv(z.read(sorted(names, key=len)[0]))
    if source.is_dir():
        for p in (source / "headlines.csv", source / "results" / "headlines.csv"):
            if p.is_file():
                return _read_csv(p)
        for runs in (source / "runs", source / "results" / "runs"):
            dirs = sorted(d for d in runs.glob("*/seed*") if (d / "run.json").is_file())
            if dirs:
                return headline_table(dirs)
        raise ValueError(f"{source}: no headlines.csv and no finished runs under runs/")
    raise FileNotFoundError(f"{source}: neither a report zip nor a results folder")


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _z(a: float, b: float, se: float) -> tuple[float, bool, str | None]:
    d = b - a
    if d == 0:
        return 0.0, False, None
    if math.isnan(d):
        return math.nan, not (math.isnan(a) and math.isnan(b)), "value missing on one side"
    if math.isnan(se) or se == 0:
        return math.copysign(math.inf, d), True, "differs; no standard error"
    return d / se, False, None


def _experiments(t: pl.DataFrame) -> dict[tuple, dict]:
    rows = t.filter(pl.col("level") == "experiment").iter_rows(named=True)
    return {tuple(r[k] for k in KEYS): r for r in rows}


def diff_tables(a: pl.DataFrame, b: pl.DataFrame, threshold: float = 3.0) -> pl.DataFrame:
    """Per experiment/split/field/t and quantity: A, B, B - A, its SE, z and the flag."""
    ea, eb = _experiments(a), _experiments(b)
    out = []
    for key in sorted(set(ea) | set(eb), key=lambda k: tuple("" if v is None else v for v in k)):
        base = dict(zip(KEYS, key))
        ra, rb = ea.get(key), eb.get(key)
        if ra is None or rb is None:
            out.append(
                {
                    **base,
                    "quantity": "row",
                    "flag": True,
                    "note": f"only in {'B' if ra is None else 'A'}",
                }
            )
            continue
        out.append(
            {
                **base,
                "quantity": "dip_step",
                "a": _num(ra["dip_step"]),
                "b": _num(rb["dip_step"]),
                "diff": _num(rb["dip_step"]) - _num(ra["dip_step"]),
                "flag": False,
                "note": "steps; not flagged",
            }
        )
        for q in QUANTITIES:
            va, vb = _num(ra[q]), _num(rb[q])
            se = math.sqrt(_num(ra[f"{q}_se"]) ** 2 + _num(rb[f"{q}_se"]) ** 2)
            z, flag, note = _z(va, vb, se)
            flag = flag or abs(z) > threshold
            out.append(
                {**base, "quantity": q, "a": va, "b": vb, "diff": vb - va, "se": se, "z": z,
                 "flag": flag, "note": note}
            )  # fmt: skip
    return pl.DataFrame(out, schema=DIFF_SCHEMA, orient="row")


def _study_range(ref: dict, name: str, t) -> tuple[float, float] | None:
    by_t = ref.get("final_pct_by_t", {}) if name == "final_pct" else {}
    for tk, v in by_t.items():
        if t is not None and abs(t - tk) < 1e-9:
            return float(v), float(v)
    rng = ref.get(name)
    return None if rng is None else (float(rng[0]), float(rng[1]))


def diff_study(a: pl.DataFrame, threshold: float = 3.0) -> pl.DataFrame:
    """Each experiment that names a ``study_ref`` against the study's dip step, dip and final pct."""
    out = []
    for key, r in sorted(_experiments(a).items(), key=lambda kv: str(kv[0])):
        ref = STUDY_REF.get(r["study_ref"] or "")
        if ref is None:
            continue
        base = dict(zip(KEYS, key))
        for q, study_name in (("dip_step", "dip_step"), ("dip_pct", "dip_pct"),
                              ("final_pct", "final_pct")):  # fmt: skip
            rng = _study_range(ref, study_name, r["t"])
            if rng is None:
                continue
            v = _num(r[q])
            lo, hi = rng
            dist = 0.0 if lo <= v <= hi else (v - hi if v > hi else v - lo)
            if q == "dip_step":
                out.append(
                    {**base, "quantity": q, "a": v, "b": lo, "b_hi": hi, "diff": dist,
                     "flag": False, "note": f"steps; not flagged; study {ref['label']}"}
                )  # fmt: skip
                continue
            se = _num(r[f"{q}_se"])
            z, flag, note = _z(0.0, dist, se)
            out.append(
                {**base, "quantity": q, "a": v, "b": lo, "b_hi": hi, "diff": dist, "se": se,
                 "z": z, "flag": flag or abs(z) > threshold,
                 "note": f"study {ref['label']}" + (f"; {note}" if note else "")}
            )  # fmt: skip
    return pl.DataFrame(out, schema=DIFF_SCHEMA, orient="row")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "DIFFERS" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(table: pl.DataFrame) -> str:
    cols = ["experiment", "split", "field", "t", "quantity", "a", "b", "b_hi", "diff", "se", "z",
            "flag", "note"]  # fmt: skip
    rows = [[_fmt(r[c]) for c in cols] for r in table.iter_rows(named=True)]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def diff_main(a: str, b: str, threshold: float = 3.0, out: Path | None = None) -> int:
    """Print the comparison of A with B (or with the study when B is ``study``); exit status."""
    ta = load_headlines(a)
    table = (
        diff_study(ta, threshold) if b == "study" else diff_tables(ta, load_headlines(b), threshold)
    )
    print(render(table))  # stdout is the diff-reports command's output
    n = int(table["flag"].sum()) if table.height else 0
    print(f"\n{n} of {table.height} compared numbers differ beyond noise (|z| > {threshold:g})")
    if out is not None:
        out = Path(out)
        if out.suffix == ".csv":
            table.write_csv(out)
        else:
            table.write_parquet(out)
    return 1 if n else 0
