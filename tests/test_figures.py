"""Every figure kind renders PNG + PDF + SVG from a synthetic collected metrics table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure

from equipipe.figures import KINDS, MissingSplitError, build_figure, make_figure, register_kind
from equipipe.metrics import METRICS_SCHEMA, RUN_COLUMNS

SCHEMA = {**RUN_COLUMNS, **METRICS_SCHEMA}
ROW_SCHEMA = {k: v for k, v in SCHEMA.items() if k not in ("ell", "layer")}  # rows below: no ell
STEPS = np.unique(np.concatenate([[1, 2, 5, 10, 20, 50], np.arange(100, 3001, 100)]))


def _pct_curve(steps, dip_at=800.0, floor=0.002, rng=None):
    """A falling pct with a dip at ``dip_at`` and a slow rise after it (a fraction)."""
    x = np.log(steps / dip_at)
    p = floor * np.exp(0.5 * x**2) if rng is None else floor * np.exp(0.5 * x**2)
    p = np.minimum(p, 0.25)
    if rng is not None:
        p = p * np.exp(rng.normal(0, 0.1, p.size))
    return p


def _experiment_rows(
    exp, seed, *, task, field, ts=(None,), splits=("val",), dip_at=800.0, k=10, head=False
):
    rng = np.random.default_rng([zlib.crc32(exp.encode()), seed])
    rows = []
    unit = "(eV/A)^2" if field == "forces" else "nm^2" if field == "x1" else "1"

    def add(step, split, metric, t, value, u=None):
        rows.append(
            (
                exp,
                seed,
                task,
                "m",
                "tiny",
                int(step),
                step / 1000,
                step * 0.2,
                split,
                metric,
                field,
                t,
                float(value),
                600,
                u,
            )
        )

    for split in splits:
        for j, t in enumerate(ts):
            pct = _pct_curve(STEPS, dip_at=dip_at * (1 + 0.3 * j), floor=0.002 * (1 + j), rng=rng)
            total = 2.0 / (1 + STEPS / 50.0) ** 0.4
            equ = pct * total
            mean = total - equ * (k - 1) / k
            for i, s in enumerate(STEPS):
                add(s, split, "total", t, total[i], unit)
                add(s, split, "mean", t, mean[i], unit)
                add(s, split, "equiv", t, equ[i] * (k - 1) / k, unit)
                add(s, split, "equiv_unbiased", t, equ[i], unit)
                add(s, split, "mean_unbiased", t, total[i] - equ[i], unit)
                add(s, split, "k", t, k)
                add(s, split, "pct", t, pct[i])
                add(s, split, "total_se", t, 0.03 * total[i], unit)
                add(s, split, "equiv_se", t, 0.05 * equ[i], unit)
                ge = 0.5 * np.sqrt(pct[i]) * np.exp(rng.normal(0, 0.1))
                gm = 1.0 / (1 + s / 500)
                add(s, split, "grad_norm_equiv", t, ge)
                add(s, split, "grad_norm_mean", t, gm)
                add(s, split, "grad_ratio", t, ge / gm)
                if split == "val_haar":
                    add(s, split, "floor_share", t, 0.004)
    if head:
        for s in STEPS:
            hd = 0.0043 + (0.0107 - 0.0043) * np.exp(-s / 600) * np.exp(rng.normal(0, 0.02))
            rows.append(
                (
                    exp,
                    seed,
                    task,
                    "m",
                    "tiny",
                    int(s),
                    s / 1000,
                    s * 0.2,
                    "val",
                    "head_deviation",
                    None,
                    None,
                    hd,
                    None,
                    None,
                )
            )
    return rows


def synthetic_metrics() -> tuple[pl.DataFrame, dict[str, dict]]:
    """A collected metrics table with a force-field, a flow-matching and a voxel experiment."""
    rows = []
    runs = {}

    def run(exp, seeds, task, field, **kw):
        for seed in seeds:
            rows.extend(_experiment_rows(exp, seed, task=task, field=field, **kw))
            runs[f"{exp}/{seed}"] = {
                "experiment": exp,
                "seed": seed,
                "task": task,
                "primary_field": field,
                "steps_per_epoch": 1500,
                "n_train": 1500 * 16,
                "batch_size": 16,
            }

    run("ff_default", [0, 1, 2], "forcefield", "forces", head=True)
    run("ff_small", [0], "forcefield", "forces", dip_at=300.0)
    run("fm_default", [0, 1], "flowmatching", "x1", ts=(0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99))
    run("vox_default", [0], "denoising", "density", splits=("val_octahedral", "val_haar"), k=4)
    df = pl.DataFrame(rows, schema=ROW_SCHEMA, orient="row")
    return df.with_columns(pl.lit(None, pl.String).alias(c) for c in ("ell", "layer")), runs


@pytest.fixture(scope="module")
def data():
    return synthetic_metrics()


SPECS = {
    "pct_vs_step": {
        "kind": "pct_vs_step",
        "experiments": ["ff_default"],
        "style": {
            "xmax": 2000,
            "epoch_marker": True,
            "annotations": [{"text": "near zero at 25% of an epoch", "x_epochs": 0.25, "y": 1.0}],
        },
    },
    "pct_vs_step_voxel": {
        "kind": "pct_vs_step",
        "experiments": ["vox_default"],
        "style": {"split": ["val_octahedral", "val_haar"], "xscale": "log", "yscale": "log"},
    },
    "pct_by": {
        "kind": "pct_by",
        "experiments": ["ff_default", "ff_small"],
        "style": {"dip_window": [10, 2500], "labels": {"ff_default": "24k", "ff_small": "2k"}},
    },
    "loss_curves": {"kind": "loss_curves", "experiments": ["ff_default", "ff_small"], "style": {}},
    "pct_per_t": {
        "kind": "pct_per_t",
        "experiments": ["fm_default"],
        "style": {"s": 300, "shade_after": 2000},
    },
    "final_pct_per_t": {"kind": "final_pct_per_t", "experiments": ["fm_default"], "style": {}},
    "loss_curves_per_t": {"kind": "loss_curves_per_t", "experiments": ["fm_default"], "style": {}},
    "loss_curves_per_t_by_t": {
        "kind": "loss_curves_per_t",
        "experiments": ["fm_default"],
        "style": {"layout": "by_t", "t": [0.0, 0.9]},
    },
    "grad_ratio": {"kind": "grad_ratio", "experiments": ["ff_default"], "style": {}},
    "grad_ratio_per_t": {
        "kind": "grad_ratio",
        "experiments": ["fm_default"],
        "style": {"t": [0.0, 0.5, 0.9]},
    },
    "head_deviation": {
        "kind": "head_deviation",
        "experiments": ["ff_default"],
        "style": {"hlines": [{"y": 0.0102, "label": "Xavier init (H = 128)"}]},
    },
}


# One spec per kind is written in all three formats; the style variants are drawn once
# (PNG into memory) to keep the file under its time budget on a shared 2-core machine.
WRITTEN = sorted({s["kind"]: n for n, s in sorted(SPECS.items(), reverse=True)}.values())
VARIANTS = sorted(set(SPECS) - set(WRITTEN))


@pytest.mark.parametrize("name", WRITTEN)
def test_every_kind_renders(name, data, tmp_path):
    metrics, runs = data
    fig = make_figure(SPECS[name], metrics, runs, tmp_path / "fig" / name)
    assert isinstance(fig, Figure)
    for fmt in ("png", "pdf", "svg"):
        p = tmp_path / "fig" / f"{name}.{fmt}"
        assert p.is_file() and p.stat().st_size > 1000, p


@pytest.mark.parametrize("name", VARIANTS)
def test_style_variants_draw(name, data):
    metrics, runs = data
    fig = build_figure(SPECS[name], metrics, runs)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    assert buf.tell() > 1000


def test_all_builtin_kinds_covered():
    builtin = {
        "pct_vs_step",
        "loss_curves",
        "pct_by",
        "pct_per_t",
        "final_pct_per_t",
        "loss_curves_per_t",
        "grad_ratio",
        "head_deviation",
    }
    assert builtin <= set(KINDS)
    assert builtin <= {s["kind"] for s in SPECS.values()}


def test_pct_vs_step_line_data(data):
    metrics, runs = data
    spec = {"kind": "pct_vs_step", "experiments": ["ff_default"], "style": {}}
    fig = build_figure(spec, metrics, runs)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if "seed" in str(ln.get_label())]
    assert len(lines) == 3  # one per replicate
    x, y = lines[1].get_xdata(), lines[1].get_ydata()
    want = metrics.filter(
        (pl.col("experiment") == "ff_default")
        & (pl.col("seed") == 1)
        & (pl.col("metric") == "pct")
        & (pl.col("split") == "val")
    ).sort("step")
    np.testing.assert_array_equal(x, want.get_column("step").to_numpy())
    np.testing.assert_allclose(y, 100 * want.get_column("value").to_numpy())  # in percent
    assert "%" in ax.get_ylabel()


def test_pct_by_marks_dips_and_epoch(data):
    metrics, runs = data
    spec = dict(SPECS["pct_by"])
    spec["style"] = {**spec["style"], "epoch_marker": True}
    fig = build_figure(spec, metrics, runs)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum(t.startswith("Dip at ") for t in texts) == 2
    assert any("One epoch" in t for t in texts)


def test_voxel_floor_line(data):
    metrics, runs = data
    fig = build_figure(SPECS["pct_vs_step_voxel"], metrics, runs)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert any("resampling floor" in lab for lab in labels)  # floor_share: the model's units


def test_grad_ratio_annotates_correlations(data):
    metrics, runs = data
    spec = {"kind": "grad_ratio", "experiments": ["fm_default"], "style": {}}
    fig = build_figure(spec, metrics, runs)
    boxes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum("Spearman" in b for b in boxes) == 8  # one panel per t
    fig = build_figure(SPECS["grad_ratio_per_t"], metrics, runs)  # style t selects panels
    assert sum("Spearman" in t.get_text() for ax in fig.axes for t in ax.texts) == 2


def test_register_kind_and_errors(data, tmp_path):
    metrics, runs = data

    @register_kind("_test_kind")
    def _kind(ctx):
        fig = Figure()
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1])
        ax.set_title(str(ctx.extra.get("thing")))
        return fig

    try:
        fig = make_figure(
            {"kind": "_test_kind", "experiments": []},
            metrics,
            runs,
            tmp_path / "k",
            {"thing": Path("x")},
        )
        assert fig.axes[0].get_title() == "x"
        assert (tmp_path / "k.svg").is_file()
        with pytest.raises(ValueError, match="already registered"):
            register_kind("_test_kind")(lambda _ctx: None)
    finally:
        KINDS.pop("_test_kind", None)
    with pytest.raises(ValueError, match="unknown figure kind"):
        make_figure({"kind": "nope"}, metrics, runs, tmp_path / "n")
    with pytest.raises(ValueError, match="no rows"):
        make_figure(
            {"kind": "pct_vs_step", "experiments": ["absent"]}, metrics, runs, tmp_path / "a"
        )


# --------------------------------------------------------------------------- split selection


def test_a_missing_split_is_an_error_not_another_split(data):
    """vox_default logs val_octahedral and val_haar, no val: a figure that does not name a split
    fails naming the splits there are (it used to draw val_haar silently)."""
    metrics, runs = data
    want = r"'vox_default' logs metric 'pct' in split\(s\) \['val_haar', 'val_octahedral'\], not in 'val'"
    for kind in ("pct_vs_step", "pct_by"):
        with pytest.raises(MissingSplitError, match=want):
            build_figure({"kind": kind, "experiments": ["vox_default"]}, metrics, runs)
    with pytest.raises(MissingSplitError, match="metric 'total'.*not in 'val'"):
        build_figure({"kind": "loss_curves", "experiments": ["vox_default"]}, metrics, runs)
    spec = {
        "kind": "pct_vs_step",
        "experiments": ["vox_default"],
        "style": {"split": "val_octahedral"},
    }
    fig = build_figure(spec, metrics, runs)
    (line,) = [ln for ln in fig.axes[0].get_lines() if "seed" in str(ln.get_label())]
    drawn = metrics.filter(
        (pl.col("experiment") == "vox_default") & (pl.col("metric") == "pct")
        & (pl.col("split") == "val_octahedral")
    ).sort("step")  # fmt: skip
    np.testing.assert_allclose(line.get_ydata(), 100 * drawn.get_column("value").to_numpy())


def test_several_splits_note_an_experiment_without_one_in_its_panel(data):
    metrics, runs = data
    spec = {"kind": "pct_vs_step", "experiments": ["vox_default", "ff_default"],
            "style": {"split": ["val_octahedral", "val_haar"]}}  # fmt: skip
    with pytest.warns(UserWarning, match="no pct rows for ff_default / val_octahedral"):
        fig = build_figure(spec, metrics, runs)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "no pct rows for ff_default / val_octahedral" in texts
    assert "no pct rows for ff_default / val_haar" in texts
    labels = [str(ln.get_label()) for ln in fig.axes[0].get_lines()]
    assert sum(lab.startswith("vox_default") for lab in labels) == 2  # one line per split


def test_standard_errors_come_from_the_drawn_split_only(data):
    """Standard-error rows of another split are not drawn as the band of this one."""
    metrics, runs = data
    spec = {"kind": "loss_curves", "experiments": ["ff_default"]}
    title = build_figure(spec, metrics, runs).axes[0].get_legend().get_title().get_text()
    assert title == "shaded: ±2 standard errors"
    moved = metrics.with_columns(
        pl.when(pl.col("metric").str.ends_with("_se") & (pl.col("experiment") == "ff_default"))
        .then(pl.lit("val_haar"))
        .otherwise(pl.col("split"))
        .alias("split")
    )
    fig = build_figure(spec, moved, runs)
    assert fig.axes[0].get_legend().get_title().get_text() == "shaded: range over seeds"
    total = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "Total T")
    band = fig.axes[0].collections[0].get_paths()[0].vertices  # fill_between of T: min..max
    per_seed = moved.filter(
        (pl.col("experiment") == "ff_default") & (pl.col("metric") == "total")
        & (pl.col("split") == "val")
    ).group_by("step").agg(pl.col("value").max()).sort("step")  # fmt: skip
    hi = per_seed.get_column("value").to_numpy()
    assert np.isclose(band[:, 1].max(), hi.max()) and len(total.get_xdata()) == len(hi)


def _layer_share_rows(split: str) -> pl.DataFrame:
    rows = []
    for seed in (0, 1):
        for step in (0, 50, 100):
            for ell, share in (("0", 0.9), ("1", 0.08), (None, 0.02)):
                metric = "layer_share" if ell else "layer_share_remainder"
                rows.append(("fm_probe", seed, "flowmatching", "m", "tiny", step, 0.0, 0.0, split,
                             metric, None, None, share, 10, None, ell, "block0"))  # fmt: skip
                rows.append(("fm_probe", seed, "flowmatching", "m", "tiny", step, 0.0, 0.0, split,
                             metric + "_se", None, None, share / 10, 10, None, ell, "block0"))  # fmt: skip
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def test_layer_spectrum_draws_the_named_split_and_refuses_a_missing_one():
    metrics = _layer_share_rows("val_octahedral")
    runs = {"fm_probe/0": {"experiment": "fm_probe", "seed": 0, "model": "proteina"}}
    spec = {"kind": "layer_spectrum", "experiments": ["fm_probe"]}
    with pytest.raises(
        MissingSplitError, match=r"layer 'block0' in split\(s\) \['val_octahedral'\]"
    ):
        build_figure(spec, metrics, runs)
    fig = build_figure({**spec, "style": {"split": "val_octahedral"}}, metrics, runs)
    (image,) = fig.axes[0].get_images()
    np.testing.assert_allclose(image.get_array(), [[0.9] * 3, [0.08] * 3, [0.02] * 3])


def test_figure_command_reports_a_missing_split_in_one_line(data, tmp_path):
    """What rules/figures.smk runs: ``equipipe figure`` on a run folder without the split."""
    metrics, runs = data
    run = tmp_path / "runs" / "vox_default" / "seed0"
    run.mkdir(parents=True)
    rows = metrics.filter(pl.col("experiment") == "vox_default")
    rows.select(list(METRICS_SCHEMA)).write_parquet(run / "metrics.parquet")
    info = {**runs["vox_default/0"], "model": "m", "size": "tiny", "metrics_schema_version": 2}
    (run / "run.json").write_text(json.dumps(info))
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"name": "dn_pct", "kind": "pct_by", "experiments": ["vox_default"]})
    )
    cmd = [sys.executable, "-m", "equipipe.cli", "figure", "--spec", f"@{spec}", "--runs", str(run),
           "--out-prefix", str(tmp_path / "fig" / "dn_pct")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert (
        "equipipe figure: error: figure 'dn_pct': experiment 'vox_default' logs metric 'pct' in "
        "split(s) ['val_haar', 'val_octahedral'], not in 'val'; name one in the figure's style "
        "'split'" in p.stderr
    )
    assert not (tmp_path / "fig" / "dn_pct.png").exists()


def test_figure_jobs_import_neither_torch_nor_scipy_stats():
    """A figure job is a fresh process per figure (about 30 in the embedded run): importing
    torch (~1.5 s) or scipy.stats (~0.7 s) there would cost more than drawing most figures."""
    code = "import sys, equipipe.figures; print([m for m in ('torch', 'scipy.stats') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    assert loaded.strip() == "[]", loaded
