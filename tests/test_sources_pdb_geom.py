"""PDB and GEOM sources end to end through real Snakemake: download -> preprocess -> split ->
subsets -> one training job -> collect, against miniature upstreams on loopback (remote) or
with no server at all (local copies).

Upstreams (``tests/upstreams``): wwPDB metadata + RCSB mmCIF of real entries, Harvard
Dataverse (dataset API, file access redirected to another host name), the MiDi mirror. They
misbehave as real servers do: 429 with Retry-After, an HTML error page with status 200, a
``.gz`` with ``Content-Encoding: gzip``, a connection dropped mid-file.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import polars as pl
import pytest
import yaml

from equipipe.store import Store
from tests.httpserver import Fault, LoopbackServer
from tests.test_workflow import snakemake
from tests.upstreams import geom_release, wwpdb
from tests.upstreams.dataverse import Dataverse
from tests.upstreams.midi_mirror import MidiMirror

TRAIN = {"steps": 3, "batch_size": 2, "lr": 1.0e-3, "checkpoint_every": 3, "analysis_step": 3}
EVAL = {"every": 3, "early": [], "k": 2, "examples": 2, "batch_size": 2}
SPLIT = {"fractions": {"train": 0.6, "val": 0.4}, "seed": 0}


@pytest.fixture(scope="session")
def pdb_release() -> wwpdb.WwpdbRelease:
    return wwpdb.build()


@pytest.fixture(scope="session")
def geom_rel() -> geom_release.GeomRelease:
    return geom_release.cached()


def _closed_url() -> str:
    """A loopback URL where nothing listens: any request to it fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def pdb_block(download: dict, **top) -> dict:
    return {
        "source": "remote",
        **top,
        "download": {"retries": 3, "backoff": 0.1, "timeout": 10, "concurrency": 2, **download},
        "preprocess": {"min_length": 50, "max_length": 300, "cluster_method": "builtin"},
        "split": SPLIT,
        "subsets": {"all": {"size": 1.0, "unit": "fraction"}},
    }


def geom_block(source: str, download: dict, **top) -> dict:
    return {
        "source": source,
        **top,
        "download": download,
        "preprocess": {"conformers_per_molecule": 2, "grid_size": 16, "grid_spacing": 1.0},
        "split": SPLIT,
        "subsets": {"all": {"size": 1.0, "unit": "fraction"}},
    }


def workflow_config(datasets: dict) -> dict:
    tasks, experiments = {}, {}
    if "pdb" in datasets:
        tasks["flowmatching"] = {
            "dataset": "pdb", "model": "proteina", "size": "tiny",
            "task_cfg": {"eval_t": [0.0, 0.5]}, "train": TRAIN, "eval": EVAL,
        }  # fmt: skip
        experiments["fm"] = {"task": "flowmatching", "subset": "all", "seeds": [0], "resources": {}}
    if "geom" in datasets:
        tasks["denoising"] = {
            "dataset": "geom", "model": "voxmol", "size": "tiny",
            "task_cfg": {"eval_modes": ["haar"], "floor_k": 2}, "train": TRAIN,
            "eval": {**EVAL, "grad_norm_batches": 0},
        }  # fmt: skip
        experiments["dn"] = {"task": "denoising", "subset": "all", "seeds": [0], "resources": {}}
    return {"datasets": datasets, "tasks": tasks, "experiments": experiments}


def run(wd: Path, cfg: dict) -> Path:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, "--cores", "2")
    return wd


def check_finished(wd: Path, experiments: dict[str, str]) -> pl.DataFrame:
    """Every step ran: stores, split, subsets, the training run, the collected metrics."""
    m = pl.read_parquet(wd / "results/metrics_all.parquet")
    for exp, ds in experiments.items():
        assert (wd / f"results/data/{ds}/split.parquet").is_file()
        assert (wd / f"results/data/{ds}/subsets/all.parquet").is_file()
        assert (wd / f"results/runs/{exp}/seed0/metrics.parquet").is_file()
        assert m.filter(pl.col("experiment") == exp).height > 0, exp
    return m


# ------------------------------------------------------------------------------- remote


def test_remote_pdb_and_geom_through_the_dag(tmp_path, pdb_release, geom_rel):
    """pdb remote + geom-rdkit remote from one loopback server that misbehaves like the real ones."""
    with LoopbackServer() as server:
        up = wwpdb.Wwpdb(server, pdb_release)
        retry = Fault(status=429, headers={"Retry-After": "1"})
        up.publish(
            {
                "resolu.idx": (Fault(html_page=True),),  # maintenance page, status 200
                "1bd2": (Fault(html_page=True),),
                "3kpr": (Fault(drop_after=20_000),),
                "3pwp": (retry,),
            }
        )
        dv = Dataverse(server)
        dv.add_file(4327252, "rdkit_folder.tar.gz", geom_rel.archive.read_bytes(),
                    Fault(drop_after=len(geom_rel.archive.read_bytes()) // 2))  # fmt: skip
        dv.add_file(4360331, "drugs_crude.msgpack.tar.gz", b"\x1f\x8b not needed")
        dv.publish(Fault(status=429, headers={"Retry-After": "1"}))
        cfg = workflow_config(
            {
                "pdb": pdb_block({"base_url": up.base_url}),
                "geom": geom_block("geom-rdkit", {"dataverse_api": dv.api}),
            }
        )
        wd = run(tmp_path, cfg)
        requests = server.requests
    check_finished(wd, {"fm": "pdb", "dn": "geom"})
    # every structure fetched; the dropped one resumed with Range, the HTML page refetched
    got = [r for r in requests if r.path == "/download/3kpr.cif.gz"]
    assert [r.headers.get("Range") for r in got] == [None, "bytes=20000-"]
    assert [r.status for r in requests if r.path == "/download/1bd2.cif.gz"] == [200, 200]
    assert [r.status for r in requests if r.path == "/download/3pwp.cif.gz"] == [429, 200]
    # the archive: via the redirect to the storage host name, resumed after the drop
    storage = [r for r in requests if r.path.startswith("/dvn-cloud/")]
    assert {r.headers["Host"].split(":")[0] for r in storage} == {"localhost"}
    assert [r.headers.get("Range") for r in storage][1].startswith("bytes=")
    pdb_store, geom_store = (
        Store(wd / "results/data/pdb/store"),
        Store(wd / "results/data/geom/store"),
    )
    want = {k for k, seq in pdb_release.chains.items() if 50 < len(seq) < 300}
    assert set(pdb_store.index["id"]) | set(pdb_store.quarantine["id"]) == want
    assert len(pdb_store) >= len(want) - 2
    assert len(geom_store) + geom_store.quarantine.height == geom_rel.kept_conformers
    src = json.loads((wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz.source.json").read_text())
    assert src["md5"] == geom_rel.md5 and src["checksum_source"] == "Dataverse API"


# ------------------------------------------------------------------------------- local


def test_local_copies_need_no_network(tmp_path, pdb_release, geom_rel):
    """pdb mirror + metadata in download_dir, geom-rdkit archive in download_dir with its md5
    pinned: the whole DAG runs with no server at all (every endpoint points where nothing
    listens, so one request would fail the job)."""
    nowhere = _closed_url()
    mirror = wwpdb.write_mirror(pdb_release, tmp_path / "pdb_mirror")
    meta = wwpdb.write_metadata(pdb_release, tmp_path / "pdb_meta")
    cfg = workflow_config(
        {
            "pdb": pdb_block({"base_url": nowhere, "mirror": str(mirror)}, download_dir=str(meta)),
            "geom": geom_block(
                "geom-rdkit",
                {
                    "dataverse_api": nowhere + "/api",
                    "expected": {"rdkit_folder.tar.gz": {"md5": geom_rel.md5}},
                },
                download_dir=str(geom_rel.archive.parent),
            ),  # fmt: skip
        }
    )
    wd = run(tmp_path / "wd", cfg)
    check_finished(wd, {"fm": "pdb", "dn": "geom"})
    manifest = pl.read_parquet(wd / "resources/pdb/remote/manifest.parquet")
    assert manifest["file"].str.starts_with(str(mirror.resolve())).all()  # read in place
    assert (
        wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz"
    ).resolve() == geom_rel.archive.resolve()
    src = json.loads((wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz.source.json").read_text())
    assert src["url"] is None and src["md5"] == geom_rel.md5
    assert src["local_copy"] == str(geom_rel.archive) and src["pinned_by"] == "download.expected"
    for name in ("pdb_seqres.txt.gz", "resolu.idx", "pdb_entry_type.txt"):  # linked, not fetched
        assert (wd / "resources/pdb/remote/metadata" / name).resolve() == (meta / name).resolve()


# ------------------------------------------------------------------------------- midi


def test_midi_through_the_dag(tmp_path, geom_rel):
    """MiDi's processed pickles from the mirror, pinned through download.expected."""
    with LoopbackServer() as server:
        mirror = MidiMirror(server)
        mirror.add(geom_rel.midi, Fault(drop_after=2000))
        expected = {f"{s}_data.pickle": {"sha256": h} for s, h in geom_rel.midi_sha256.items()}
        cfg = workflow_config(
            {"geom": geom_block("midi", {"midi_url": mirror.url, "expected": expected})}
        )
        wd = run(tmp_path, cfg)
    check_finished(wd, {"dn": "geom"})
    store = Store(wd / "results/data/geom/store")
    assert (
        set(store.index["midi_split"]) == {"train", "val", "test"}
        and store.meta["source"] == "midi"
    )
    assert len(store) + store.quarantine.height == geom_rel.kept_conformers
