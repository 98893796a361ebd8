"""The paper's grid in miniature (``tests/paper_miniature.py``), through the whole DAG."""

from __future__ import annotations

import zipfile

import polars as pl
import pytest
import yaml

from equipipe.data import spice
from equipipe.store import Store
from tests import paper_miniature as pm
from tests.httpserver import LoopbackServer
from tests.test_workflow import planned_jobs, snakemake
from tests.upstreams.apollo import Apollo

NOWHERE = "http://127.0.0.1:9"
SPLITS = {
    "pdb": {"fractions": {"train": 0.6, "val": 0.4}, "seed": 0},
    "geom": {"fractions": {"train": 0.6, "val": 0.4}, "seed": 0},
}


def _offline_miniature() -> dict:
    """The miniature with every endpoint on a closed loopback port (for plans only)."""
    downloads = {
        "spice": {"apollo_base": NOWHERE},
        "pdb": {"base_url": NOWHERE},
        "geom": {"dataverse_api": NOWHERE},
    }
    datasets = {d: {"download": dl, **({"split": SPLITS[d]} if d in SPLITS else {})}
                for d, dl in downloads.items()}  # fmt: skip
    return pm.miniature(pm.load_paper(), datasets, {"spice": (951_005, 24)})


def test_miniature_keeps_the_papers_names_and_shrinks_only_what_is_allowed():
    paper = pm.load_paper()
    mini = _offline_miniature()
    assert pm.names(mini) == pm.names(paper)
    changed = pm.changed_paths(paper, mini)
    assert changed and [p for p in changed if not pm.allowed(p)] == []
    # sources are the paper's: the miniature downloads the same releases
    assert {d: ds["source"] for d, ds in mini["datasets"].items()} == {
        d: ds["source"] for d, ds in paper["datasets"].items()
    }
    # count subsets keep their order (nesting) on the miniature data
    sizes = [mini["datasets"]["spice"]["subsets"][s]["size"] for s in ("c50k", "c5k", "c500")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    # the checker itself: a change outside the allow-list is caught
    assert not pm.allowed("datasets.spice.source")
    assert not pm.allowed("experiments.escaip_default.train.lr")
    assert not pm.allowed("tasks.forcefield.train.optimizer")
    assert pm.allowed("tasks.forcefield.eval.examples")


def test_miniature_plans_the_whole_grid(tmp_path):
    mini = _offline_miniature()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(mini, sort_keys=False))
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--quiet", "rules"))
    runs = sum(len(e.get("seeds", [0])) for e in mini["experiments"].values())
    assert jobs["train"] == runs and jobs["figure"] == len(mini["figures"])
    assert jobs["analyse"] == len(mini["analyses"])
    assert {"download_spice", "download_pdb", "download_geom"} <= set(jobs)


# ------------------------------------------------------------------------------ the whole DAG


HDF5_SPLIT = {"fractions": {"train": 0.5, "val": 0.5}, "seed": 0}


def run_grid(wd, spice_releases, spice_source: str = "maceoff23") -> dict:
    """Run the miniature paper grid in ``wd``: download -> ... -> figures, then report.zip.

    ``spice_source``: the paper's ``maceoff23`` (Apollo), ``spice-2.0.1`` / ``spice-1.1.4``
    (Zenodo), or ``maceoff23-local`` (``download_dir``, no SPICE server). PDB (wwPDB/RCSB) and
    GEOM (Dataverse) come from their miniature upstreams. Returns the config it ran.
    """
    from tests.upstreams import geom_release, wwpdb
    from tests.upstreams.dataverse import Dataverse
    from tests.upstreams.zenodo import Zenodo

    root, pins = spice_releases
    geom = geom_release.cached()  # one build per test process, shared with srcb's tests
    source = spice_source.removesuffix("-local")
    with LoopbackServer() as server:
        spice_ds: dict = {"download": {"expected": pins[source]}}
        if spice_source == "maceoff23":
            apollo = Apollo(server)
            for name, facts in spice.SOURCES["maceoff23"]["files"].items():
                body = (root / "maceoff23" / name).read_bytes()
                apollo.add_bitstream(facts["bitstream"], name, body)
            spice_ds["download"]["apollo_base"] = apollo.base
        elif spice_source == "maceoff23-local":
            spice_ds["download"]["apollo_base"] = NOWHERE
            spice_ds["download_dir"] = str(root / "maceoff23")
        else:
            zenodo = Zenodo(server)
            (name,) = pins[source]
            zenodo.add_record(
                spice.SOURCES[source]["record"], {name: (root / source / name).read_bytes()}
            )
            spice_ds["download"]["zenodo_api"] = zenodo.api
            spice_ds["split"] = HDF5_SPLIT
        pdb = wwpdb.Wwpdb(server, wwpdb.build())
        pdb.publish()
        dv = Dataverse(server)
        dv.add_file(4327252, "rdkit_folder.tar.gz", geom.archive.read_bytes())
        dv.publish()
        datasets = {
            "spice": spice_ds,
            "pdb": {"download": {"base_url": pdb.base_url, "concurrency": 2, "backoff": 0.1},
                    "split": SPLITS["pdb"]},
            "geom": {"download": {"dataverse_api": dv.api}, "split": SPLITS["geom"]},
        }  # fmt: skip
        frames = sum(p["frames"] for p in pins[source].values())
        n_train = {"maceoff23": pins["maceoff23"]["train_large_neut_no_bad_clean.xyz"]["frames"]}
        mini = pm.miniature(
            pm.load_paper(), datasets, {"spice": (951_005, n_train.get(source, frames // 2))}
        )
        if source != "maceoff23":
            mini["datasets"]["spice"]["source"] = source  # the grid per source (make test-all)
        if "download_dir" in spice_ds:
            mini["datasets"]["spice"]["download_dir"] = spice_ds["download_dir"]
        (wd / "config.yaml").write_text(yaml.safe_dump(mini, sort_keys=False))
        snakemake(wd, "--cores", "2")
    snakemake(wd, "--report", "results/report.zip")  # offline: the report needs no server
    return mini


def check_grid(wd, mini: dict) -> None:
    """Every run, analysis and figure of the grid exists; the report lists every figure."""
    with zipfile.ZipFile(wd / "results/report.zip") as z:
        listed = z.namelist()
    for fig in mini["figures"]:
        assert any(n.endswith(f"/{fig}.png") for n in listed), fig
    m = pl.read_parquet(wd / "results/metrics_all.parquet")
    assert set(m["experiment"]) == set(mini["experiments"])
    for a in mini["analyses"]:
        assert any((wd / "results/analysis" / a).iterdir()), a
    for ds, block in mini["datasets"].items():
        store = Store(wd / f"results/data/{ds}/store")
        assert len(store) > 0
        assert (wd / f"resources/{ds}/{block['source']}").is_dir(), ds  # the release's raw files
        assert store.meta.get("source", block["source"]) == block["source"], ds


@pytest.fixture(scope="module")
def paper_run(spice_releases, tmp_path_factory):
    wd = tmp_path_factory.mktemp("paper_miniature")
    mini = run_grid(wd, spice_releases)
    return wd, mini


@pytest.mark.timeout(1800)  # ~100 jobs: about 3 min on 2 idle cores, far more on a busy machine
def test_paper_grid_in_miniature_runs_to_the_report(paper_run):
    wd, mini = paper_run
    assert pm.names(mini) == pm.names(pm.load_paper())
    assert [p for p in pm.changed_paths(pm.load_paper(), mini) if not pm.allowed(p)] == []
    check_grid(wd, mini)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("spice_source", ["spice-2.0.1", "spice-1.1.4", "maceoff23-local"])
def test_paper_grid_in_miniature_per_spice_source(spice_releases, tmp_path, spice_source):
    wd = tmp_path / "wd"
    wd.mkdir()
    mini = run_grid(wd, spice_releases, spice_source)
    check_grid(wd, mini)
