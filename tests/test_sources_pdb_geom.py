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
from pathlib import Path

import polars as pl
import pytest

from equipipe.store import Store
from tests.httpserver import Fault, LoopbackServer
from tests.upstreams import wwpdb
from tests.upstreams.dataverse import Dataverse
from tests.upstreams.midi_mirror import MidiMirror

TRAIN = {"steps": 3, "batch_size": 2, "lr": 1.0e-3, "checkpoint_every": 3, "analysis_step": 3}
EVAL = {"every": 3, "early": [], "k": 2, "examples": 2, "batch_size": 2}
SPLIT = {"fractions": {"train": 0.6, "val": 0.4}, "seed": 0}
MIDI_SPLIT = {  # MiDi's own split, kept (as paper.yaml keeps MACE-OFF23's)
    "fractions": {"train": 1.0},
    "seed": 0,
    "predefined": {"column": "midi_split", "values": {"train": "train", "val": "val", "test": "test"}},
}  # fmt: skip


def pdb_block(download: dict, **top) -> dict:
    return {
        "source": "remote",
        **top,
        "download": {"retries": 3, "backoff": 0.1, "timeout": 10, "concurrency": 2, **download},
        "preprocess": {"min_length": 50, "max_length": 300, "cluster_method": "builtin"},
        "split": SPLIT,
        "subsets": {"all": {"size": 1.0, "unit": "fraction"}},
    }


def geom_block(source: str, download: dict, split: dict = SPLIT, **top) -> dict:
    return {
        "source": source,
        **top,
        "download": download,
        "preprocess": {"conformers_per_molecule": 2, "grid_size": 16, "grid_spacing": 1.0},
        "split": split,
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


def check_finished(wd: Path, experiments: dict[str, str]) -> pl.DataFrame:
    """Every step ran: stores, split, subsets, the training run, the collected metrics."""
    m = pl.read_parquet(wd / "results/metrics_all.parquet")
    for exp, ds in experiments.items():
        assert (wd / f"results/data/{ds}/split.parquet").is_file()
        assert (wd / f"results/data/{ds}/subsets/all.parquet").is_file()
        assert (wd / f"results/runs/{exp}/seed0/metrics.parquet").is_file()
        assert m.filter(pl.col("experiment") == exp).height > 0, exp
    return m


NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens, any request fails at once


@pytest.fixture(scope="module")
def dags(pdb_release, geom_rel, tmp_path_factory, run_dags):
    """The three per-source DAGs, run at once; yields (server request log, {case: workdir})."""
    server = LoopbackServer()
    up = wwpdb.Wwpdb(server, pdb_release)
    up.publish(
        {
            "resolu.idx": (Fault(html_page=True),),  # a maintenance page with status 200
            "1bd2": (Fault(html_page=True),),
            "3kpr": (Fault(drop_after=20_000),),
            "3pwp": (Fault(status=429, headers={"Retry-After": "1"}),),
        }
    )
    archive = geom_rel.archive.read_bytes()
    dv = Dataverse(server)
    dv.add_file(4327252, "rdkit_folder.tar.gz", archive, Fault(drop_after=len(archive) // 2))
    dv.add_file(4360331, "drugs_crude.msgpack.tar.gz", b"\x1f\x8b not needed")
    dv.publish(Fault(status=429, headers={"Retry-After": "1"}))
    midi = MidiMirror(server)
    midi.add(geom_rel.midi, Fault(drop_after=geom_rel.midi["test"].stat().st_size // 2))
    midi_pins = {f"{s}_data.pickle": {"sha256": h} for s, h in geom_rel.midi_sha256.items()}
    local = tmp_path_factory.mktemp("local_copies")
    mirror = wwpdb.write_mirror(pdb_release, local / "pdb_mirror")
    meta = wwpdb.write_metadata(pdb_release, local / "pdb_meta")
    cases = {
        # pdb remote + geom-rdkit remote, from misbehaving upstreams
        "remote": workflow_config(
            {
                "pdb": pdb_block({"base_url": up.base_url}),
                "geom": geom_block("geom-rdkit", {"dataverse_api": dv.api}),
            }
        ),
        # pdb mirror + metadata in download_dir, geom-rdkit archive in download_dir with its md5
        # pinned: every endpoint is a closed port, so a single request would fail the job
        "local": workflow_config(
            {
                "pdb": pdb_block(
                    {"base_url": NOWHERE, "mirror": str(mirror)}, download_dir=str(meta)
                ),
                "geom": geom_block(
                    "geom-rdkit",
                    {
                        "dataverse_api": NOWHERE + "/api",
                        "expected": {"rdkit_folder.tar.gz": {"md5": geom_rel.md5}},
                    },
                    download_dir=str(geom_rel.archive.parent),
                ),
            }
        ),  # fmt: skip
        # MiDi's processed pickles from the mirror, pinned through download.expected
        "midi": workflow_config(
            {"geom": geom_block("midi", {"midi_url": midi.url, "expected": midi_pins}, MIDI_SPLIT)}
        ),
    }
    try:
        with run_dags(cases) as wds:
            yield server, wds, {"mirror": mirror, "meta": meta}
    finally:
        server.close()


def test_remote_pdb_and_geom_through_the_dag(dags, pdb_release, geom_rel):
    server, wds, _ = dags
    wd = wds["remote"]
    check_finished(wd, {"fm": "pdb", "dn": "geom"})
    pdb_store = Store(wd / "results/data/pdb/store")
    geom_store = Store(wd / "results/data/geom/store")
    want = {k for k, seq in pdb_release.chains.items() if 50 < len(seq) < 300}
    assert set(pdb_store.index["id"]) | set(pdb_store.quarantine["id"]) == want
    assert len(pdb_store) >= len(want) - 2
    assert len(geom_store) + geom_store.quarantine.height == geom_rel.kept_conformers
    assert geom_store.meta["source"] == "geom-rdkit" and pdb_store.meta["source"] == "remote"
    src = json.loads((wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz.source.json").read_text())
    assert src["md5"] == geom_rel.md5 and src["checksum_source"] == "Dataverse API"
    assert (
        wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz"
    ).read_bytes() == geom_rel.archive.read_bytes()


def test_upstream_faults_were_met_and_survived(dags, geom_rel):
    server, _, _ = dags
    paths = lambda p: [r for r in server.requests if r.path == p]  # noqa: E731
    # the dropped structure resumed with Range; the HTML page fetched again; 429 then the file
    assert [r.headers.get("Range") for r in paths("/download/3kpr.cif.gz")] == [
        None,
        "bytes=20000-",
    ]
    assert len(paths("/download/1bd2.cif.gz")) == 2
    assert [r.status for r in paths("/download/3pwp.cif.gz")] == [429, 200]
    assert [r.status for r in paths(wwpdb.Wwpdb.META["resolu.idx"])] == [200, 200]
    # the archive came from the storage host name the access URL redirected to, resumed
    storage = [r for r in server.requests if r.path.startswith("/dvn-cloud/")]
    assert {r.headers["Host"].split(":")[0] for r in storage} == {"localhost"}
    assert [r.headers.get("Range") for r in storage][-1].startswith("bytes=")
    api = server.requests_for("/api/datasets/:persistentId/")
    assert [r.status for r in api] == [429, 200]
    half = geom_rel.midi["test"].stat().st_size // 2
    got = server.requests_for("/files/geom_raw/test_data.pickle")  # dropped, then resumed
    assert [r.headers.get("Range") for r in got] == [None, f"bytes={half}-"]


def test_local_copies_need_no_network(dags, geom_rel):
    _, wds, local = dags
    wd = wds["local"]
    check_finished(wd, {"fm": "pdb", "dn": "geom"})
    manifest = pl.read_parquet(wd / "resources/pdb/remote/manifest.parquet")
    assert manifest["file"].str.starts_with(str(local["mirror"].resolve())).all()  # in place
    for name in ("pdb_seqres.txt.gz", "resolu.idx", "pdb_entry_type.txt"):  # linked
        got = wd / "resources/pdb/remote/metadata" / name
        assert got.resolve() == (local["meta"] / name).resolve()
    archive = wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz"
    assert archive.resolve() == geom_rel.archive.resolve()
    src = json.loads((wd / "resources/geom/geom-rdkit/rdkit_folder.tar.gz.source.json").read_text())
    assert src["url"] is None and src["md5"] == geom_rel.md5
    assert src["local_copy"] == str(geom_rel.archive) and src["pinned_by"] == "download.expected"


def test_midi_through_the_dag(dags, geom_rel):
    _, wds, _ = dags
    wd = wds["midi"]
    check_finished(wd, {"dn": "geom"})
    store = Store(wd / "results/data/geom/store")
    assert set(store.index["midi_split"]) == {"train", "val", "test"}
    split = pl.read_parquet(wd / "results/data/geom/split.parquet")
    ids = dict(zip(store.index["id"], store.index["midi_split"]))
    assert all(ids[i] == s for i, s in zip(split["id"], split["split"]))  # MiDi's split kept
    assert store.meta["source"] == "midi"
    assert len(store) + store.quarantine.height == geom_rel.kept_conformers
