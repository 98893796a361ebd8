"""Analysis entry points (landscape, twirling), their tables, figure kinds and the κ table."""

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from equipipe import analyses
from equipipe.figures import make_figure
from equipipe.figures.analyses import kappa_table_rst
from tests.toytask import PairModel, ToyTask, toy_batch


def test_twirled_error_follows_mean_plus_equiv_over_k_on_a_toy_model():
    task, model = ToyTask(), PairModel(equivariant=False)
    batches = [toy_batch(8, 5, seed=s) for s in range(3)]
    df = analyses.twirling_from_model(model, task, batches, {"ks": [1, 2, 3, 4, 8], "repeats": 8})
    v = df.filter(pl.col("field") == "v").sort("k")
    assert v["k"].to_list() == [1, 2, 3, 4, 8]
    assert v["n_draws"].to_list() == [64, 32, 16, 16, 8]
    for r in v.iter_rows(named=True):
        se = math.hypot(r["twirled_mse_se"], r["predicted_se"])
        assert abs(r["twirled_mse"] - r["predicted"]) < 3 * se, r
        assert math.isclose(r["predicted"], r["mean_unbiased"] + r["equiv_unbiased"] / r["k"])
    # twirling helps this model: K = 8 is clearly below K = 1
    assert v["twirled_mse"][-1] < v["twirled_mse"][0] - 3 * v["twirled_mse_se"][0]
    # the invariant field has no equivariance error: twirling changes nothing
    s = df.filter(pl.col("field") == "s")
    assert np.allclose(s["twirled_mse"].to_numpy(), s["twirled_mse"][0], rtol=1e-12)
    assert s["exact_twirl_mse"].null_count() == s.height


def test_twirling_force_field_has_the_exact_head_reference(escaip_setup):
    task, model, batches = escaip_setup(dtype=torch.float64, energy_mean=0.1, energy_std=1.5)
    model = model.double()
    df = analyses.twirling_from_model(model, task, batches, {"ks": [1, 2, 4, 16], "repeats": 4})
    f = df.filter(pl.col("field") == "forces").sort("k")
    assert f["unit"][0] == "(eV/A)^2" and f["n_elements"][0] == sum(
        3 * len(b["z"]) for b in batches
    )
    for r in f.iter_rows(named=True):
        # the exact K -> infinity twirl and the closed form agree with the decomposition
        assert abs(r["exact_twirl_mse"] - r["mean_unbiased"]) < 4 * r["predicted_se"] + 1e-9
        se = math.hypot(r["twirled_mse_se"], 1e-12)
        assert abs(r["twirled_mse"] - r["exact_predicted"]) < 3.5 * se, r
    e = df.filter(pl.col("field") == "energy")
    assert e["exact_twirl_mse"].null_count() == e.height


def test_spec_errors_name_the_key_and_the_allowed_values():
    task, model = ToyTask(), PairModel(equivariant=False)
    with pytest.raises(ValueError, match="'kk' is unknown; allowed: .*ks"):
        analyses.twirling_from_model(model, task, [toy_batch()], {"kk": [1]})
    with pytest.raises(ValueError, match="allowed: auto, haar, octahedral"):
        analyses.landscape_from_model(model, task, [toy_batch()], {"rotations": "x", "param": "w"})


@pytest.fixture(scope="module")
def landscape_result(escaip_setup):
    task, model, batches = escaip_setup(energy_mean=0.1, energy_std=1.5)
    res = analyses.landscape_from_model(model, task, batches, {"grid": 6, "step": 0.05, "k": 4})
    return res


def test_landscape_uses_exact_octahedral_rotations_for_the_direct_head(landscape_result):
    res = landscape_result
    meta = res["meta"]
    assert meta["rotations"] == "octahedral" and meta["k"] == 24 and meta["dtype"] == "float32"
    assert meta["closed_form_equiv_first_view"] > 0
    assert meta["curvature"].startswith("quadratic") and meta["affine_error"] < 1e-5  # float32
    assert set(meta["surface_method"].values()) == {"quadratic"}
    kap = {r["loss"]: r for r in res["kappa"]}
    # hidden 12: null spaces hidden + 2k (L_equiv) and 2 hidden + k (L_mean), k = nullity of
    # the head's feature matrix (see tests/test_landscape.py)
    k = (kap["equiv"]["n_null"] - 12) // 2
    assert k >= 0 and kap["equiv"]["n_null"] == 12 + 2 * k and kap["mean"]["n_null"] == 24 + k
    assert (
        kap["equiv"]["unit"] == "(eV/A)^2" and kap["equiv"]["param"] == "force_head.linear.weight"
    )


def test_landscape_haar_option_and_float32_model(escaip_setup):
    task, model, batches = escaip_setup(energy_mean=0.1, energy_std=1.5)
    res = analyses.landscape_from_model(
        model, task, batches, {"grid": 4, "step": 0.05, "k": 4, "rotations": "haar"}
    )
    assert res["meta"]["rotations"] == "haar" and res["meta"]["k"] == 4
    assert {r["axes"] for r in res["grid"]} == {"total", "mean", "equiv"}


def test_write_landscape_figures_and_kappa_rst(landscape_result, tmp_path):
    d = tmp_path / "ana"
    analyses.write_landscape(landscape_result, d, {"checkpoint": "early.pt", "step": 500})
    kappa = pl.read_parquet(d / "landscape_kappa.parquet")
    assert kappa["loss"].to_list() == ["total", "mean", "equiv"]
    assert kappa["step"].to_list() == [500] * 3 and kappa["kappa"].is_finite().all()
    grid = pl.read_parquet(d / "landscape_grid.parquet")
    assert grid.height == 3 * 3 * 36
    assert set(grid.columns) == {"axes", "loss", "i", "j", "alpha", "beta", "value"}
    spec = pl.read_parquet(d / "landscape_spectrum.parquet")
    assert spec.filter(pl.col("loss") == "equiv").height == 36
    axes = np.load(d / "landscape_axes.npz")
    assert axes["equiv_max"].shape == (36,) and math.isclose(np.linalg.norm(axes["equiv_max"]), 1)
    meta = json.loads((d / "landscape.json").read_text())
    assert meta["step"] == 500 and meta["grid_step"] == 0.05
    fig = make_figure({"kind": "landscape", "style": {"panels": ["study", "own"]}}, pl.DataFrame(),
                      {}, tmp_path / "fig" / "land", {"ana": d})  # fmt: skip
    assert len([a for a in fig.axes if a.name == "3d"]) == 4
    for ext in ("png", "pdf", "svg"):
        assert (tmp_path / "fig" / f"land.{ext}").stat().st_size > 0
    text = kappa_table_rst({"escaip": d}, tmp_path / "kappa.rst")
    lines = text.splitlines()
    assert lines[0].startswith("===") and sum("escaip" in ln for ln in lines) == 3
    assert (tmp_path / "kappa.rst").read_text() == text
    with pytest.raises(ValueError, match="no analysis input"):
        make_figure({"kind": "landscape"}, pl.DataFrame(), {}, tmp_path / "x", {})


class FakeRun:
    """What ``equipipe.runs.load_run`` returns, built in memory."""

    def __init__(self, task, model, batches, info):
        self.task, self.model, self._batches, self.info = task, model, batches, info

    def batches(self, split="val", n_examples=None, batch_size=None):
        del split, n_examples, batch_size  # one fixed set of batches
        return self._batches

    def eval_generator(self):
        return torch.Generator().manual_seed(self.info["eval_config"]["seed"])


def test_entry_points_read_a_run_and_write_their_folders(tmp_path, monkeypatch, escaip_setup):
    task, model, batches = escaip_setup(energy_mean=0.1, energy_std=1.5)
    info = {"experiment": "ff_default", "seed": 0, "steps": 40,
            "spec": {"train": {"analysis_step": 20, "steps": 40}},
            "eval_config": {"k": 3, "seed": 11}}  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pl.DataFrame({"step": [20], "split": ["val"], "field": ["forces"], "t": [None],
                  "metric": ["total"], "value": [1.25]},
                 schema_overrides={"t": pl.Float64}).write_parquet(run_dir / "metrics.parquet")  # fmt: skip
    import equipipe.runs

    seen = []

    def fake_load_run(path, checkpoint="model.pt", device="cpu"):
        seen.append((Path(path), checkpoint, device))
        return FakeRun(task, model, batches, info)

    monkeypatch.setattr(equipipe.runs, "load_run", fake_load_run)
    out = tmp_path / "land"
    analyses.landscape(run_dir, out, {"grid": 4, "step": 0.05, "checkpoint": "early.pt"})
    meta = json.loads((out / "landscape.json").read_text())
    assert seen[-1] == (run_dir, "early.pt", "cpu")
    assert meta["step"] == 20 and meta["logged_at_step"] == {"total": 1.25}
    assert meta["experiment"] == "ff_default" and meta["spec"]["k"] == 3
    assert pl.read_parquet(out / "landscape_kappa.parquet")["step"].to_list() == [20] * 3

    out = tmp_path / "tw"
    table = analyses.twirling(run_dir, out, {"ks": [1, 2, 4], "repeats": 2})
    assert seen[-1][1] == "model.pt"
    assert pl.read_parquet(out / "twirling.parquet").equals(table)
    assert json.loads((out / "twirling.json").read_text())["primary_field"] == "forces"
    fig = make_figure({"kind": "twirling"}, pl.DataFrame(), {}, tmp_path / "tw_fig", {"tw": out})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("exact" in lab for lab in labels) and any("prediction" in lab for lab in labels)


class TimedToyTask(ToyTask):
    """Two evaluation views per batch labelled by a flow time, like flow matching."""

    def eval_views(self, batch, generator):
        views = []
        for t in (0.2, 0.9):
            noise = torch.randn(batch["x"].shape, generator=generator, dtype=batch["x"].dtype)
            views.append(({"t": t}, {**batch, "x": t * batch["x"] + (1 - t) * noise}))
        return views


def test_twirling_per_flow_time_and_its_figure(tmp_path):
    task, model = TimedToyTask(), PairModel(equivariant=False)
    table = analyses.twirling_from_model(
        model, task, [toy_batch(6, 5, seed=1)], {"ks": [1, 4], "repeats": 3, "labels": None}
    )
    v = table.filter(pl.col("field") == "v")
    assert sorted(set(v["t"].to_list())) == [0.2, 0.9] and v.height == 4
    d = tmp_path / "tw"
    d.mkdir()
    table.write_parquet(d / "twirling.parquet")
    (d / "twirling.json").write_text(json.dumps({"primary_field": "v"}))
    fig = make_figure({"kind": "twirling"}, pl.DataFrame(), {}, tmp_path / "f", {"tw": d})
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["t = 0.2", "t = 0.9"]
    only = analyses.twirling_from_model(
        model, task, [toy_batch(6, 5, seed=1)], {"ks": [1], "repeats": 2, "labels": {"t": 0.9}}
    )
    assert set(only["t"].to_list()) == {0.9}
