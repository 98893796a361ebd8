"""Every SPICE source end to end through real Snakemake, against miniature upstreams on loopback.

spice-2.0.1, spice-1.1.4 (Zenodo record API, content redirected to another host name) and
maceoff23 (Apollo bitstreams) are downloaded from :mod:`tests.upstreams`, with the faults real
servers produce on the way (429 with Retry-After, a dropped connection, an HTML page with
status 200); the ``download_dir`` local copy of maceoff23 runs with no server at all. Each runs
download -> preprocess -> split -> subsets -> one training job -> collect in a temp dir.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from equipipe.data import spice
from equipipe.store import Store
from tests.httpserver import Fault, LoopbackServer
from tests.test_workflow import snakemake
from tests.upstreams.apollo import Apollo
from tests.upstreams.zenodo import Zenodo

TRAIN = {"steps": 6, "batch_size": 4, "lr": 1.0e-3, "checkpoint_every": 3, "analysis_step": 3}
EVAL = {"every": 3, "early": [1], "k": 2, "examples": 4, "batch_size": 4}
NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens, any request fails at once


def _config(source: str, download: dict, split: dict, download_dir: str | None = None) -> dict:
    return {
        "datasets": {
            "spice": {
                "source": source,
                "download_dir": download_dir,
                "download": download,
                "preprocess": {"max_bad_fraction": 0.05},
                "split": split,
                "subsets": {
                    "all": {"size": 1.0, "unit": "fraction"},
                    "c8": {"size": 8, "unit": "conformers"},
                },
            }
        },
        "tasks": {
            "forcefield": {
                "dataset": "spice",
                "model": "escaip",
                "size": "tiny",
                "task_cfg": {"energy_reference": "linear"},
                "train": TRAIN,
                "eval": EVAL,
            }
        },
        "experiments": {"ff": {"task": "forcefield", "subset": "c8", "seeds": [0]}},
    }


HDF5_SPLIT = {"fractions": {"train": 0.5, "val": 0.5}, "seed": 0}
# config/paper.yaml's own split of the MACE-OFF23 release
MACEOFF_SPLIT = {
    "fractions": {"train": 1.0},
    "seed": 0,
    "predefined": {
        "column": "source",
        "values": {"maceoff23/train": "train", "maceoff23/test": "val"},
    },
}


@pytest.fixture(scope="module")
def dags(spice_releases, run_dags):
    """Run the four per-source DAGs at once; yield (server, {case: workdir})."""
    root, pins = spice_releases
    server = LoopbackServer()
    zenodo, apollo = Zenodo(server), Apollo(server)
    for source in ("spice-2.0.1", "spice-1.1.4"):
        (name,) = pins[source]
        record = spice.SOURCES[source]["record"]
        zenodo.add_record(
            record,
            {name: (root / source / name).read_bytes()},
            api_faults=(Fault(status=429, headers={"Retry-After": "1"}),),
            file_faults={name: (Fault(drop_after=pins[source][name]["size"] // 3),)},
        )
    for name, facts in spice.SOURCES["maceoff23"]["files"].items():
        body = (root / "maceoff23" / name).read_bytes()
        apollo.add_bitstream(facts["bitstream"], name, body, Fault(html_page=True))
    cases = {
        "spice-2.0.1": _config(
            "spice-2.0.1", {"zenodo_api": zenodo.api, "expected": pins["spice-2.0.1"]}, HDF5_SPLIT
        ),
        "spice-1.1.4": _config(
            "spice-1.1.4", {"zenodo_api": zenodo.api, "expected": pins["spice-1.1.4"]}, HDF5_SPLIT
        ),
        "maceoff23": _config(
            "maceoff23", {"apollo_base": apollo.base, "expected": pins["maceoff23"]}, MACEOFF_SPLIT
        ),
        # the local copy: no server anywhere (the endpoint is a closed port)
        "maceoff23-local": _config(
            "maceoff23",
            {"apollo_base": NOWHERE, "expected": pins["maceoff23"]},
            MACEOFF_SPLIT,
            download_dir=str(root / "maceoff23"),
        ),
    }
    try:
        with run_dags(cases) as wds:
            yield server, wds
    finally:
        server.close()


@pytest.mark.parametrize("case", ["spice-2.0.1", "spice-1.1.4", "maceoff23", "maceoff23-local"])
def test_source_runs_end_to_end(dags, spice_releases, case):
    _, wds = dags
    root, pins = spice_releases
    wd = wds[case]
    source = case.removesuffix("-local")
    store = Store(wd / "results/data/spice/store")
    assert store.meta["source"] == source
    assert set(store.meta["release_pins"]) == set(pins[source])
    assert all(p["pinned_by"] == "download.expected" for p in store.meta["release_pins"].values())
    assert len(store) == sum(p["frames"] for p in pins[source].values())
    for name in pins[source]:  # what landed is the release, byte for byte
        assert (wd / f"resources/spice/{source}/{name}").read_bytes() == (
            root / source / name
        ).read_bytes()
    split = pl.read_parquet(wd / "results/data/spice/split.parquet")
    if source == "maceoff23":  # the release's own split: train file -> train, test -> val
        assert split.group_by("split").len().sort("split").rows() == [("train", 24), ("val", 8)]
    assert pl.read_parquet(wd / "results/data/spice/subsets/c8.parquet").height == 8
    m = pl.read_parquet(wd / "results/metrics_all.parquet")
    pct = m.filter((pl.col("metric") == "pct") & (pl.col("field") == "forces"))
    assert set(pct["experiment"]) == {"ff"} and pct["step"].max() == 6
    if case == "maceoff23-local":  # rerun offline: nothing to do (checked once: 5 s a call)
        out = snakemake(wd, "-n", "results/metrics_all.parquet")
        assert "Nothing to be done" in out.stdout + out.stderr


def test_upstream_faults_were_met_and_survived(dags):
    server, _ = dags
    for source in ("spice-2.0.1", "spice-1.1.4"):
        record = spice.SOURCES[source]["record"]
        (name,) = spice.SOURCES[source]["files"]
        api = server.requests_for(f"/api/records/{record}")
        assert [r.status for r in api] == [429, 200]  # Retry-After honoured, then the record
        storage = server.requests_for(Zenodo.storage_path(record, name))
        # content fetched from the other host name the record's link redirected to
        assert {r.headers["Host"].split(":")[0] for r in storage} == {"localhost"}
        assert storage[-1].headers.get("Range", "").startswith("bytes=")  # resumed
    for facts in spice.SOURCES["maceoff23"]["files"].values():
        got = server.requests_for(Apollo.content_path(facts["bitstream"]))
        # the HTML page served with 200 was refused and fetched again (remote DAG only)
        assert [r.status for r in got] == [200, 200]


@pytest.mark.parametrize("source", ["spice-2.0.1", "spice-1.1.4"])
def test_local_copy_is_verified_and_linked_with_no_network(
    spice_releases, tmp_path, capsys, source
):
    """`equipipe download` with the release on disk and its checksum pinned: no request at all
    (the endpoint is a closed port); a copy that does not verify is not linked."""
    from equipipe.cli import main

    root, pins = spice_releases
    (name,) = pins[source]
    block = {"source": source, "download_dir": str(root / source),
             "download": {"zenodo_api": NOWHERE, "expected": pins[source]}}  # fmt: skip
    out = tmp_path / "raw"
    main(["download", "spice", "--source", source, "--out", str(out), "--cfg", json.dumps(block)])
    assert (out / name).is_symlink() and (out / name).resolve() == (root / source / name).resolve()
    wrong = {**pins[source][name], "md5": "0" * 32}
    block["download"]["expected"] = {name: wrong}
    with pytest.raises(SystemExit):  # falls back to the network: nothing listens, one-line error
        main(["download", "spice", "--source", source, "--out", str(tmp_path / "raw2"),
              "--cfg", json.dumps(block)])  # fmt: skip
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "raw2" / name).exists()
