"""Real Snakemake runs of the whole workflow on a tiny config in a temporary directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import polars as pl
import pytest
import yaml

from equipipe.checkpoint import checkpoint_step

ROOT = Path(__file__).resolve().parent.parent
SNAKEFILE = ROOT / "workflow" / "Snakefile"
TINY = ROOT / "tests" / "fixtures" / "tiny_config.yaml"
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    cmd = [str(BIN / "snakemake"), "-s", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if check and out.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
        )
    return out


def planned_jobs(out: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    text = out.stdout + out.stderr
    table = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("wf")
    shutil.copy(TINY, wd / "config.yaml")
    snakemake(wd, "--cores", "2")
    return wd


def test_end_to_end_outputs_and_report(finished):
    wd = finished
    for exp, seeds in (("ff_default", (0, 1)), ("ff_c4", (0,))):
        for s in seeds:
            d = wd / f"results/runs/{exp}/seed{s}"
            for name in ("metrics.parquet", "run.json", "model.pt", "early.pt"):
                assert (d / name).is_file(), d / name
            assert not (d / "work").exists()
    m = pl.read_parquet(wd / "results/metrics_all.parquet")
    pct = m.filter((pl.col("metric") == "pct") & (pl.col("field") == "forces"))
    assert set(pct["experiment"]) == {"ff_default", "ff_c4"}
    assert pct.filter(pl.col("step") > 0)["step"].min() <= 10  # the curve starts early on log axes
    assert set(pct["step"].unique()) == {0, 1, 2, 6, 12}
    spec = m.filter(pl.col("metric") == "spectrum_power")  # eval.spectrum_every of ff_default
    assert set(spec["experiment"]) == {"ff_default"} and set(spec["ell"]) == {
        "0",
        "1",
        "2",
        "3",
        "4",
    }
    for fig in ("pct", "by_size", "spectrum"):
        for ext in ("png", "pdf", "svg"):
            assert (wd / f"results/figures/{fig}.{ext}").stat().st_size > 1000
    assert (wd / "results/paper_comparison.html").is_file()
    snakemake(wd, "--report", "results/report.zip")
    with zipfile.ZipFile(wd / "results/report.zip") as z:
        names = z.namelist()
    assert any(n.endswith("pct.png") for n in names) and any(
        n.endswith("paper_comparison.html") for n in names
    )
    assert any(n.endswith("provenance.html") for n in names)
    assert any(n.endswith("headlines.csv") for n in names)
    # nothing left to do: a second run schedules no job
    out = snakemake(wd, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_named_checkpoints_and_md_analysis_through_snakemake(finished):
    """train.keep_steps checkpoints are declared outputs; the md analysis reads them and its
    table and figure reach the report."""
    wd = finished
    for d in (wd / "results/runs/ff_default/seed0", wd / "results/runs/ff_default/seed1",
              wd / "results/runs/ff_c4/seed0"):  # fmt: skip
        assert sorted(p.name for p in (d / "checkpoints").glob("*.pt")) == ["step2.pt", "step6.pt"]
        info = json.loads((d / "run.json").read_text())
        assert info["checkpoints"] == {"checkpoints/step2.pt": 2, "checkpoints/step6.pt": 6}
    table = pl.read_parquet(wd / "results/analysis/ff_md/md.parquet")
    raw = table.filter(pl.col("variant") == "raw").sort("seed", "step")
    assert raw.select("seed", "step").rows() == [(0, 2), (0, 12), (1, 2), (1, 12)]
    assert set(table["variant"]) == {"raw", "twirl_exact", "conservative"}
    assert raw["pct"].null_count() == 0 and (raw["n_traj"] == 2).all()
    assert {"d_5fs", "energy_drift", "angmom_drift", "n_blowups", "drift_symmetry"} <= set(
        table.columns
    )
    assert "<th>d_5fs</th>" in (wd / "results/tables/ff_md.html").read_text()
    assert (wd / "results/figures/md.png").stat().st_size > 1000


def test_config_dip_window_reaches_the_comparison_and_headlines(finished):
    """The experiment's ``dip_window`` (tiny config: [1, 6] of 12 steps) goes through the
    collect and headlines rules: the dip is searched inside it, the table prints it, and the
    final pct is reported separately."""
    table = pl.read_parquet(finished / "results/paper_comparison.parquet")
    ff = table.filter((pl.col("experiment") == "ff_default") & (pl.col("field") == "forces"))
    assert ff.height == 3  # the experiment row and two seeds
    assert set(ff["dip_window_lo"]) == {1.0} and set(ff["dip_window_hi"]) == {6.0}
    assert all(1 <= s <= 6 for s in ff["dip_step"])
    assert ff["final_pct"].null_count() == 0 and set(ff["last_step"]) == {12}
    c4 = table.filter(pl.col("experiment") == "ff_c4")
    assert c4["dip_window_lo"].null_count() == c4.height  # no window: the whole run
    assert "1–6" in (finished / "results/paper_comparison.html").read_text()
    heads = pl.read_csv(finished / "results/headlines.csv")
    dips = heads.filter(pl.col("experiment") == "ff_default")["dip_step"]
    assert dips.len() and all(1 <= s <= 6 for s in dips)


def test_pct_standard_error_is_logged_per_evaluation(finished):
    """Every evaluation logs pct_se beside pct (over held-out examples; the pct figures draw it
    as a band): finite and non-negative wherever pct is."""
    df = pl.read_parquet(finished / "results/runs/ff_default/seed0/metrics.parquet")
    df = df.filter((pl.col("split") == "val") & (pl.col("field") == "forces"))
    pct = df.filter(pl.col("metric") == "pct").sort("step")
    se = df.filter(pl.col("metric") == "pct_se").sort("step")
    assert se["step"].to_list() == pct["step"].to_list()
    assert se["value"].is_finite().all() and (se["value"] >= 0).all()


def test_adding_a_subset_schedules_only_what_uses_it(finished):
    wd = finished
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["datasets"]["spice"]["subsets"]["c2"] = {"size": 2, "unit": "conformers"}
    cfg["experiments"]["ff_c2"] = {"task": "forcefield", "subset": "c2", "seeds": [0]}
    cfg["figures"]["c2_only"] = {"kind": "pct_vs_step", "experiments": ["ff_c2"], "caption": "c2"}
    new = wd.parent / (wd.name + "_plus")
    shutil.copytree(wd, new, ignore=shutil.ignore_patterns(".snakemake"))
    shutil.copytree(
        wd / ".snakemake", new / ".snakemake", ignore=shutil.ignore_patterns("locks", "incomplete")
    )
    (new / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(new, "-n", "--quiet", "rules"))
    # the new subset, its one training job, the figure that shows it; the aggregate table and
    # the archived config necessarily follow; nothing else (no dataset rebuild, no other run)
    assert jobs.pop("subset") == 1 and jobs.pop("train") == 1 and jobs.pop("figure") == 1
    assert set(jobs) <= {"collect", "archive_config", "provenance", "headlines", "all"}, jobs


def test_subset_counts_molecules_and_refuses_more_than_exists(finished):
    """Through Snakemake: "2 molecules" is two molecules with all their training conformers;
    a subset larger than the training split fails with the subset, unit and available count."""
    wd = finished.parent / (finished.name + "_subsets")
    shutil.copytree(finished, wd, ignore=shutil.ignore_patterns("locks", "incomplete"))
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["datasets"]["spice"]["subsets"] |= {
        "m2": {"size": 2, "unit": "molecules"},
        "big": {"size": 1000, "unit": "conformers"},
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    data = wd / "results/data/spice"
    snakemake(wd, "--cores", "1", str(data.relative_to(wd) / "subsets/m2.parquet"))
    split = pl.read_parquet(data / "split.parquet").filter(pl.col("split") == "train")
    ids = set(pl.read_parquet(data / "subsets/m2.parquet")["id"])
    keys = set(split.filter(pl.col("id").is_in(list(ids)))["key"])
    assert len(keys) == 2 and ids == set(split.filter(pl.col("key").is_in(list(keys)))["id"])
    out = snakemake(
        wd, "--cores", "1", str(data.relative_to(wd) / "subsets/big.parquet"), check=False
    )
    log = (wd / "logs/spice/subset_big.log").read_text()
    assert out.returncode != 0 and not (data / "subsets/big.parquet").exists()
    assert (
        f"subset 'big' asks for 1000 conformers but the training split has only {split.height} conformers"
        in log
    )
    assert "Traceback" not in log


def test_changed_setting_reruns_dependents_with_short_reason_lines(finished):
    """A changed setting reruns what depends on it; the dry run's reason lines name short
    parameter files (equipipe.params), not the config or a training spec as JSON."""
    wd = finished.parent / (finished.name + "_reasons")
    shutil.copytree(finished, wd, ignore=shutil.ignore_patterns("locks", "incomplete"))
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["tasks"]["forcefield"]["train"]["lr"] = 2.0e-3
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(wd, "-n")
    text = out.stdout + out.stderr
    jobs = planned_jobs(out)
    assert jobs.pop("train") == 3 and jobs.pop("archive_config") == 1  # every forcefield run
    # and what reads the runs; no data job
    assert set(jobs) <= {
        "figure", "collect", "provenance", "headlines", "analyse", "analysis_table", "all"
    }, jobs  # fmt: skip
    reasons = [ln for ln in text.splitlines() if ln.strip().startswith("reason:")]
    params = [ln for ln in reasons if "Params have changed" in ln]
    assert len(params) == 4 and all(".snakemake/equipipe_params/" in ln for ln in params)
    assert max(len(ln) for ln in params) < 400, max(params, key=len)
    assert '"lr"' not in text and '"datasets"' not in text


@pytest.mark.parametrize(
    "block, key, value, expected",
    [
        # a preprocess filter: that dataset's preprocess and everything downstream of it
        (
            "preprocess",
            "max_gradient",
            0.9,
            {
                "preprocess": 1,
                "split": 1,
                "subset": 2,
                "train": 3,
                "analyse": 1,
                "analysis_table": 1,
            },
        ),
        # a split setting: the split and downstream, never the (costly) preprocess
        (
            "split",
            "seed",
            1,
            {"split": 1, "subset": 2, "train": 3, "analyse": 1, "analysis_table": 1},
        ),
    ],
)
def test_changing_a_dataset_setting_reruns_only_what_depends_on_it(
    finished, tmp_path, block, key, value, expected
):
    """From the dry run (rerun triggers include params): the changed dataset step and its
    downstream jobs (2 subsets, 3 training runs, the md analysis and its table, the 4 figures
    drawing them) are scheduled; the
    embedded build is not, nor anything upstream of the changed step."""
    cfg = yaml.safe_load((finished / "config.yaml").read_text())
    cfg["datasets"]["spice"].setdefault(block, {})[key] = value
    new = tmp_path / "wf"
    shutil.copytree(finished, new, ignore=shutil.ignore_patterns(".snakemake"))
    shutil.copytree(
        finished / ".snakemake",
        new / ".snakemake",
        ignore=shutil.ignore_patterns("locks", "incomplete"),
    )
    (new / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(new, "-n", "--quiet", "rules"))
    assert jobs.pop("figure") == 4, jobs
    assert {k: jobs.pop(k, 0) for k in expected} == expected, jobs
    assert set(jobs) <= {"collect", "archive_config", "provenance", "headlines", "all"}, jobs


def test_bad_config_names_key_and_allowed_values(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["tasks"]["forcefield"]["size"] = "9M"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", check=False)
    assert out.returncode != 0
    assert "tasks.forcefield.size: '9M'" in out.stdout + out.stderr
    assert "allowed: tiny, 1M, 4M, 6M" in out.stdout + out.stderr
    cfg = yaml.safe_load(TINY.read_text())
    cfg["tasks"]["forcefield"]["train"]["optimizer"] = "lion"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", check=False)
    assert (
        out.returncode != 0
        and "optimizer" in out.stdout + out.stderr
        and "adamw" in out.stdout + out.stderr
    )


def _metrics_without_wall(path: Path) -> pl.DataFrame:
    return (
        pl.read_parquet(path)
        .drop("wall_s")
        .sort(["step", "split", "metric", "field", "t"], nulls_last=True)
    )


def test_sigkill_then_rerun_incomplete_resumes_to_identical_metrics(finished, tmp_path):
    """Kill the whole Snakemake run mid-training, rerun with --rerun-incomplete: same table."""
    wd = tmp_path / "wf"
    wd.mkdir()
    cfg = yaml.safe_load(TINY.read_text())
    cfg["tasks"]["forcefield"]["train"].update(steps=40, checkpoint_every=4)
    cfg["experiments"] = {"ff_default": {"task": "forcefield", "subset": "all", "seeds": [0]}}
    cfg["figures"] = {}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    # reuse the finished dataset build (the store does not depend on training settings)
    shutil.copytree(finished / "resources", wd / "resources")
    snakemake(wd, "--cores", "1", "--touch", "resources/spice/embedded")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "-s", str(SNAKEFILE), "--directory", str(wd), "--configfile",
         str(wd / "config.yaml"), "--cores", "1", "results/runs/ff_default/seed0/metrics.parquet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    ckpt = wd / "results/runs/ff_default/seed0/work/ckpt.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if (checkpoint_step(ckpt) or 0) >= 8:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("training never reached a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the training job, no clean-up
    proc.wait()
    assert not (wd / "results/runs/ff_default/seed0/metrics.parquet").exists()
    snakemake(wd, "--unlock")
    out = snakemake(
        wd, "--cores", "1", "--rerun-incomplete", "results/runs/ff_default/seed0/metrics.parquet"
    )
    log = (wd / "logs/train/ff_default/seed0.log").read_text()
    assert "resumed from step" in log, out.stderr[-2000:]
    resumed = _metrics_without_wall(wd / "results/runs/ff_default/seed0/metrics.parquet")
    # the same run uninterrupted, straight through the CLI
    ref_dir = tmp_path / "ref"
    spec = subprocess.run(
        [sys.executable, "-c", "import sys, yaml; from equipipe import config as c; "
         "cfg = c.check_config(c.validate_schema(yaml.safe_load(open(sys.argv[1])))); "
         "print(c.run_spec_json(cfg, 'ff_default', 0))", str(wd / "config.yaml")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    d = wd / "results/data/spice"
    subprocess.run([str(BIN / "equipipe"), "train", "--spec", spec, "--store", str(d / "store"), "--split",
                    str(d / "split.parquet"), "--subset", str(d / "subsets/all.parquet"), "--out", str(ref_dir)],
                   check=True, capture_output=True, env=env)  # fmt: skip
    ref = _metrics_without_wall(ref_dir / "metrics.parquet")
    assert resumed.equals(ref)


def test_paper_grid_plans_offline_quickly():
    """`snakemake -n --configfile config/paper.yaml` plans every training job, < 5 s of CPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    from plan_speed import plan

    wall, cpu, text = plan("config/paper.yaml")
    jobs = planned_jobs(subprocess.CompletedProcess([], 0, text, ""))
    assert jobs["train"] == 31 and jobs["download_spice"] == 1 and jobs["download_geom"] == 1
    assert cpu < 5.0, f"planning took {cpu:.1f} s of CPU ({wall:.1f} s wall)"


# --- Reproducibility (issue 18): provenance, a rerun compared by diff-reports, the archive ---


def test_provenance_records_code_environment_runs_and_data(finished):
    import hashlib
    import json

    p = json.loads((finished / "results/provenance.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert p["code"]["commit"] == head.stdout.strip() and isinstance(p["code"]["dirty"], bool)
    lock = ROOT / "lock" / "requirements.txt"
    assert p["environment"]["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    import snakemake as smk
    import torch

    env = p["environment"]
    assert (env["torch"], env["cuda"], env["snakemake"]) == (
        torch.__version__,
        torch.version.cuda,
        smk.__version__,
    )
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["machine"]["platform"] and p["machine"]["cpu"]
    seeds = sorted((r["experiment"], r["seed"]) for r in p["runs"])
    assert seeds == [("ff_c4", 0), ("ff_default", 0), ("ff_default", 1)]
    assert all(r["device"].startswith("cpu") for r in p["runs"])
    spice = p["datasets"]["spice"]
    assert spice["source"] == "embedded" and spice["source_facts"]["kind"] == "embedded"
    (f,) = spice["raw"]["files"]
    raw = finished / "resources/spice/embedded" / f["name"]
    assert f["size"] == raw.stat().st_size
    assert f["sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    meta = json.loads((finished / "results/data/spice/store/meta.json").read_text())
    assert spice["store"]["n"] == meta["n"] and spice["quarantine"]["n"] == meta["n_quarantined"]
    assert spice["gaps"], "what the store does not record is listed"
    html = (finished / "results/provenance.html").read_text()
    assert "Provenance" in html and f["sha256"] in html and p["code"]["commit"] in html


def _diff(a, b) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "equipipe"), "diff-reports", str(a), str(b)], capture_output=True, text=True
    )


def test_rerun_gives_identical_headlines_and_diff_reports_flags_an_altered_copy(finished, tmp_path):
    """A second real workflow run (same config, new folder) against the first, per diff-reports."""
    if not (finished / "results/report.zip").is_file():
        snakemake(finished, "--report", "results/report.zip")
    wd = tmp_path / "rerun"
    wd.mkdir()
    shutil.copy(finished / "config.yaml", wd / "config.yaml")
    shutil.copytree(finished / "resources", wd / "resources")
    shutil.copytree(finished / "results/data", wd / "results/data")
    jobs = planned_jobs(snakemake(wd, "-n", "results/headlines.csv", "--quiet", "rules"))
    assert jobs.pop("train") == 3 and set(jobs) <= {"headlines"}, jobs  # the data is reused
    snakemake(wd, "--cores", "2", "results/headlines.csv")
    out = _diff(finished / "results/report.zip", wd / "results")
    assert out.returncode == 0, out.stdout
    assert re.search(r"^0 of [1-9]\d* compared numbers differ", out.stdout, re.M), out.stdout
    assert (finished / "results/headlines.csv").read_text() == (
        wd / "results/headlines.csv"
    ).read_text()
    # an altered copy: ff_c4's last pct tripled (numerator with it); ff_default's two seeds
    # differ so much that the same change there would stay within its seed-to-seed noise
    alt = tmp_path / "altered"
    shutil.copytree(wd / "results/runs", alt / "runs")
    m = alt / "runs/ff_c4/seed0/metrics.parquet"
    df = pl.read_parquet(m)
    last = (pl.col("step") == df["step"].max()) & (pl.col("split") == "val")
    hit = last & (pl.col("field") == "forces") & pl.col("metric").is_in(["pct", "equiv_unbiased"])
    df.with_columns(pl.when(hit).then(pl.col("value") * 3).otherwise(pl.col("value")).alias("value")).write_parquet(m)  # fmt: skip
    out = _diff(finished / "results", alt)
    assert out.returncode == 1
    flagged = [ln.split()[:5] for ln in out.stdout.splitlines() if "DIFFERS" in ln]
    assert ["ff_c4", "val", "forces", "-", "final_pct"] in flagged, out.stdout
    assert all(f[0] == "ff_c4" and f[4] != "final_error" for f in flagged), out.stdout
    # and against the study's table: the tiny run is far from the paper-scale numbers
    out = _diff(wd / "results", "study")
    assert "EScAIP default" in out.stdout and "dip_pct" in out.stdout


def test_archive_unpacks_and_dry_runs(finished, tmp_path):
    import json
    import tarfile

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = tmp_path / "archive.tar.gz"
    subprocess.run([str(BIN / "equipipe"), "archive", "--out", str(out), "--repo", str(ROOT)],
                   cwd=finished, check=True, capture_output=True, env=env)  # fmt: skip
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "equipipe"
    for name in ("RERUN.md", "lock/requirements.txt", "lock/nodeps.txt", "Makefile",
                 "workflow/Snakefile", "equipipe/cli.py", "config/archived.yaml",
                 "archived-results/provenance.json", "archived-results/paper_comparison.parquet"):  # fmt: skip
        assert (root / name).is_file(), name
    meta = json.loads((root / "ARCHIVE.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert meta["commit"] == head.stdout.strip() and isinstance(meta["dirty"], bool)
    prov = root / "archived-results/provenance.json"
    assert prov.read_bytes() == (finished / "results/provenance.json").read_bytes()
    assert (root / "lock/requirements.txt").read_bytes() == (
        ROOT / "lock/requirements.txt"
    ).read_bytes()
    assert "make venv" in (root / "RERUN.md").read_text()
    # the unpacked code (not this checkout's) plans the archived configuration offline
    env["PYTHONPATH"] = str(root)
    plan = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--quiet", "rules", "--configfile", "config/archived.yaml"],
        cwd=root, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan)
    assert jobs["train"] == 3 and jobs["provenance"] == 1 and jobs["build_embedded_spice"] == 1
    from equipipe.provenance import code_info

    assert code_info(root) == {**code_info(root), "commit": meta["commit"], "from": "archive"}


def test_train_log_has_one_readable_line_per_evaluation(finished):
    """The job's log (logs/train/...): one INFO line per evaluation with step, loss, pct ± SE,
    steps/s and ETA (the tiny config evaluates 2 batches, so pct has a standard error)."""
    from equipipe.train import eval_steps

    log = (finished / "logs/train/ff_default/seed0.log").read_text()
    lines = [ln for ln in log.splitlines() if " INFO equipipe.train: step " in ln]
    steps = [int(re.search(r"step (\d+)/12", ln).group(1)) for ln in lines]
    assert steps == eval_steps(12, 6, [1, 2]), log[-3000:]
    assert re.search(r" step 0/12 pct \(forces\) [\d.e+-]+±[\d.e+-]+%$", lines[0]), lines[0]
    line = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO equipipe\.train: step \d+/12 loss [\d.e+-]+ "
        r"lr [\d.e+-]+ pct \(forces\) [\d.e+-]+±[\d.e+-]+% [\d.e+-]+ steps/s ETA \d+:\d\d:\d\d$"
    )
    for ln in lines[1:]:
        assert line.match(ln), ln


def test_training_twice_in_one_process_gives_identical_metrics(finished, tmp_path):
    """Same seed, same process, twice: the same metric table (and as the Snakemake job's)."""
    import json

    from equipipe.train import train

    info = json.loads((finished / "results/runs/ff_c4/seed0/run.json").read_text())
    d = {k: finished / v for k, v in info["data"].items()}
    for name in ("a", "b"):
        train(info["spec"], d["store"], d["split"], d["subset"], tmp_path / name)
    a = _metrics_without_wall(tmp_path / "a/metrics.parquet")
    assert a.equals(_metrics_without_wall(tmp_path / "b/metrics.parquet"))
    assert a.equals(_metrics_without_wall(finished / "results/runs/ff_c4/seed0/metrics.parquet"))


def test_efficiency_gap_with_a_tuning_sweep_through_snakemake(finished, tmp_path):
    """The efficiency analysis and figure read a tuning-sweep summary (equipipe tuning-summary)
    as a tracked input: c* over the sweep's settings in the table, the sweep panel drawn, and
    the finished runs are not retrained."""
    wd = tmp_path / "wf"
    shutil.copytree(finished, wd, symlinks=True)
    summary = subprocess.run(
        [str(BIN / "equipipe"), "tuning-summary", "--runs", "results/runs", "--prefix", "ff_c",
         "--out", "sweep"], cwd=wd, capture_output=True, text=True, env={**os.environ},
    )  # fmt: skip
    assert summary.returncode == 0, summary.stderr[-3000:]
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    pair = {"baseline": "ff_c4", "equivariant": "ff_default", "sweep": "sweep/sweep_curves.csv"}
    cfg["analyses"]["eff"] = {"kind": "efficiency", "experiments": ["ff_c4", "ff_default"],
                              "spec": pair}  # fmt: skip
    cfg["figures"]["eff_gap"] = {"kind": "efficiency_gap", "experiments": ["ff_c4", "ff_default"],
                                 "style": pair, "caption": "efficiency gap with a sweep"}  # fmt: skip
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = ("--", "results/tables/eff.html", "results/figures/eff_gap.png")
    jobs = planned_jobs(snakemake(wd, "-n", *targets))
    assert "train" not in jobs and jobs["analyse"] == 1 and jobs["figure"] == 1, jobs
    snakemake(wd, "--cores", "2", *targets)
    table = pl.read_parquet(wd / "results/analysis/eff/efficiency.parquet")
    rows = {r["quantity"]: r for r in table.to_dicts()}
    assert rows["c_star_sweep"]["n"] == 1 and "lr 0.001" in rows["c_star_sweep"]["note"]
    assert "constant-learning-rate segment" in rows["alpha"]["method"]
    assert (wd / "results/figures/eff_gap.png").stat().st_size > 1000
    # the sweep summary is an input: a new one (here with more runs) reruns the analysis and the
    # figure only (Snakemake compares small inputs by checksum, so the content must change)
    subprocess.run(
        [str(BIN / "equipipe"), "tuning-summary", "--runs", "results/runs", "--prefix", "ff_",
         "--out", "sweep"], cwd=wd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    jobs = planned_jobs(snakemake(wd, "-n", *targets))
    assert "train" not in jobs and jobs["analyse"] == 1 and jobs["figure"] == 1, jobs


def _plan_priorities(text: str) -> list[tuple[str, str, int]]:
    """(rule, wildcards, priority) of every job a dry run prints."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        prio = re.search(r"^\s+priority: (\d+)", block, re.M)
        wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        if rule:
            jobs.append(
                (rule.group(1), wc.group(1) if wc else "", int(prio.group(1)) if prio else 0)
            )
    return jobs


def test_embedded_plan_prepares_all_data_then_starts_the_longest_jobs_first(tmp_path):
    """Every data job outranks every training job (all datasets are ready before the cores fill
    up), training jobs rank by their expected minutes (resources.runtime: the voxel jobs, the
    longest, first) and analyses come after training, before the figures."""
    shutil.copy(ROOT / "config" / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n", "--cores", "2")
    jobs = _plan_priorities(out.stdout + out.stderr)
    data = [p for r, _, p in jobs if r in {"build_embedded_spice", "build_embedded_geom",
                                           "build_embedded_pdb", "preprocess", "split", "subset"}]  # fmt: skip
    train = {w: p for r, w, p in jobs if r == "train"}
    assert len(data) == 3 + 3 + 3 + 6 and len(train) == 14, (data, train)
    assert min(data) > max(train.values())
    by_task = {
        k: {p for w, p in train.items() if f"experiment={k}_" in w} for k in ("dn", "ff", "fm")
    }
    assert min(by_task["dn"]) > max(by_task["ff"]) and min(by_task["ff"]) > max(by_task["fm"])
    analyses = [p for r, _, p in jobs if r == "analyse"]
    figures = [p for r, _, p in jobs if r == "figure"]
    assert min(train.values()) > max(analyses) > max(figures) == 0
