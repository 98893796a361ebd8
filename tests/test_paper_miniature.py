"""The paper's grid in miniature (``tests/paper_miniature.py``), through the whole DAG."""

from __future__ import annotations

import yaml

from tests import paper_miniature as pm
from tests.test_workflow import planned_jobs, snakemake

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
