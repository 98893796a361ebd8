"""PDB C-alpha pipeline: readers, quarantine, clusters, remote download (loopback), embedded set."""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from equipipe.data import pdb
from equipipe.data.clustering import alignment_stats, cluster_builtin, cluster_sequences
from equipipe.data.download import DownloadError
from equipipe.data.pdb import read as pdb_read
from equipipe.data.splits import make_split
from equipipe.store import Store
from tests.httpserver import Fault

FIX = Path(__file__).parent / "fixtures" / "pdb"
STRUCTURES = sorted((FIX / "structures").glob("*.cif.gz"))


def _manifest(raw: Path, rows: list[dict]) -> None:
    full = []
    for r in rows:
        full.append(
            {
                "id": r["id"],
                "pdb_id": r["id"].rsplit("_", 1)[0],
                "chain": r["id"].rsplit("_", 1)[1],
                "sequence": r.get("sequence", "A" * 60),
                "length": len(r.get("sequence", "A" * 60)),
                "file": str(r["file"]),
                "resolution": None,
                "method": None,
                "origin": "test",
                "error": r.get("error"),
            }
        )
    schema = {c: pl.String for c in pdb.MANIFEST_COLUMNS} | {
        "length": pl.Int64,
        "resolution": pl.Float64,
    }
    raw.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(full, schema=schema).write_parquet(raw / pdb.MANIFEST)


# ------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("path", STRUCTURES, ids=lambda p: p.name)
def test_backends_give_identical_chains(path):
    a = pdb.read_ca_chains(path, backend="gemmi")
    b = pdb.read_ca_chains(path, backend="biopython")
    assert a.keys() == b.keys() and a
    for name in a:
        x, y = a[name], b[name]
        assert isinstance(x, pdb.CAChain), x
        assert x.sequence == y.sequence
        np.testing.assert_array_equal(x.pos, y.pos)
        np.testing.assert_array_equal(x.residue, y.residue)
        np.testing.assert_array_equal(x.chain_break, y.chain_break)
        assert (
            x.pos.dtype == np.float32 and x.residue.dtype == np.int8 and x.chain_break.dtype == bool
        )
        np.testing.assert_allclose(x.pos.astype(np.float64).mean(0), 0.0, atol=1e-6)  # centred
        step = np.linalg.norm(np.diff(x.pos, axis=0), axis=1)[~x.chain_break[1:]]
        assert 0.36 < np.median(step) < 0.40  # consecutive CA-CA 3.8 Å = 0.38 nm


def test_known_chain_contents():
    pti = pdb.read_ca_chains(FIX / "structures" / "5pti.cif.gz")["A"]
    assert pti.sequence == "RPDFCLEPPYTGPCKARIIRYFYNAKAGLCQTFVYGGCRAKRNNFKSAEDCMRTCGGA"
    assert not pti.chain_break.any()
    assert pti.residue.min() >= 0 and pti.residue.max() <= 19
    b2m = pdb.read_ca_chains(FIX / "structures" / "1bd2.cif.gz")["B"]
    assert len(b2m.sequence) == 99  # Met0 unobserved


def test_altloc_rule_and_point_mutation():
    ca = lambda alt, occ, x: (alt, occ, x, 0.0, 0.0)  # noqa: E731
    # altloc A wins even at lower occupancy; else the highest occupancy; first on ties.
    assert pdb_read._pick_ca([ca("B", 0.6, 1.0), ca("A", 0.4, 2.0)]) == 1
    assert pdb_read._pick_ca([ca("B", 0.3, 1.0), ca("C", 0.7, 2.0)]) == 1
    assert pdb_read._pick_ca([ca("B", 0.5, 1.0), ca("C", 0.5, 2.0)]) == 0
    recs = [
        ("GLY", 1, "", True, [ca("", 1.0, 0.0)]),
        ("SER", 2, "", True, [ca("A", 0.4, 3.8)]),  # point mutation: SER (A) / THR (B)
        ("THR", 2, "", True, [ca("B", 0.6, 3.9)]),
        ("HOH", 3, "", False, []),
        ("MG", 4, "", False, []),
        ("ALA", 5, "", True, [ca("", 1.0, 11.0)]),  # 7.1 Å gap -> break
    ]
    sel, reason = pdb.select_residues(recs)
    assert reason is None and [n for n, _ in sel] == ["GLY", "SER", "ALA"]
    arr = pdb.chain_arrays(sel, "A")
    assert arr.chain_break.tolist() == [False, False, True] and arr.sequence == "GSA"
    _, reason = pdb.select_residues(recs + [("MSE", 6, "", True, [ca("", 1.0, 14.8)])])
    assert reason == "non-standard residue MSE"
    # 3PWP chain B has CA altlocs A/B at 0.5 each on Gln 2: both backends take A.
    for backend in pdb.BACKENDS:
        recs = pdb_read._READERS[backend](
            pdb.read_bytes(FIX / "structures" / "3pwp.cif.gz"), {"B"}
        )["B"]
        q2 = next(r for r in recs if r[1] == 2)
        assert [c[0] for c in q2[4]] == ["A", "B"]
        sel, _ = pdb.select_residues([q2])
        assert sel[0][1][0] == pytest.approx(57.813, abs=1e-4)


# ------------------------------------------------------------------------------ quarantine


@pytest.mark.parametrize("backend", pdb.BACKENDS)
def test_preprocess_quarantines_each_bad_kind(tmp_path, backend):
    raw = tmp_path / "raw"
    rows = [
        {"id": "5pti_A", "file": FIX / "structures" / "5pti.cif.gz"},
        {"id": "1bd2_B", "file": FIX / "structures" / "1bd2.cif.gz"},  # 99 > max_length 90
        {"id": "5pti_Z", "file": FIX / "structures" / "5pti.cif.gz"},  # chain not in file
        {"id": "8trc_A", "file": FIX / "bad" / "trunc.cif.gz"},
        {"id": "8nca_A", "file": FIX / "bad" / "noca.cif.gz"},
        {"id": "8mse_A", "file": FIX / "bad" / "mse.cif.gz"},
        {"id": "8gbg_A", "file": FIX / "bad" / "garbage.cif.gz"},
        {"id": "8mis_A", "file": tmp_path / "missing.cif.gz"},
        {"id": "8dlf_A", "file": "mmCIF/dl/8dlf.cif.gz", "error": "download failed: HTTP 404"},
    ]
    _manifest(raw, rows)
    store_dir = tmp_path / "store"
    cfg = {
        "backend": backend,
        "max_length": 90,
        "max_bad_fraction": 0.95,
        "cluster_method": "builtin",
    }
    pdb.preprocess(raw, store_dir, cfg)
    store = Store(store_dir)
    assert store.index["id"].to_list() == ["5pti_A"]
    reasons = dict(store.quarantine.select("id", "reason").iter_rows())
    assert set(reasons) == {r["id"] for r in rows} - {"5pti_A"}
    assert reasons["1bd2_B"] == "length 99 outside (50, 90)"
    assert reasons["5pti_Z"] == "chain Z not in file"
    assert reasons["8trc_A"].startswith("truncated or corrupt compressed file")
    assert reasons["8nca_A"] == "no CA atoms"
    assert reasons["8mse_A"] == "non-standard residue MSE"
    assert reasons["8gbg_A"].startswith("unparseable mmCIF")
    assert reasons["8mis_A"].startswith("cannot read file")
    assert reasons["8dlf_A"] == "download failed: HTTP 404"
    ex = store.get(0)
    assert (
        ex["pos"].shape == (58, 3)
        and ex["residue"].shape == (58,)
        and ex["chain_break"].shape == (58,)
    )


# -------------------------------------------------------------------------------- clusters


def _mutate(seq: str, frac: float, seed: int) -> str:
    rng = random.Random(seed)
    out = list(seq)
    for i in rng.sample(range(len(seq)), int(frac * len(seq))):
        out[i] = rng.choice([c for c in pdb.ONE_LETTER if c != seq[i]])
    return "".join(out)


def test_builtin_clusters_and_no_leakage_through_splits():
    seqs = {
        f"{p.name[:4]}_{c}": v.sequence
        for p in STRUCTURES
        for c, v in pdb.read_ca_chains(p).items()
    }
    assert set(seqs) == {"1bd2_B", "3pwp_B", "5pti_A"}
    pti = seqs["5pti_A"]
    seqs["7mut_A"] = _mutate(pti, 0.3, 0)  # 70 % identical to 5PTI
    seqs["7far_A"] = _mutate(pti, 0.8, 1)  # ~20 % identical: a cluster of its own
    seqs["7cut_A"] = pti[:25]  # a fragment wholly covered by 5PTI joins its cluster
    ident, cov = alignment_stats(seqs["3pwp_B"], seqs["1bd2_B"])
    assert ident > 0.98 and cov > 0.98
    rep = cluster_sequences(seqs, method="builtin")
    assert rep == cluster_builtin(seqs)
    assert rep["1bd2_B"] == rep["3pwp_B"]  # near-identical beta-2-microglobulins
    assert rep["7mut_A"] == rep["5pti_A"] == rep["7cut_A"]
    assert rep["7far_A"] not in (rep["5pti_A"], rep["1bd2_B"])
    # The generic split groups by key: a cluster never lands in two splits.
    index = pl.DataFrame({"id": list(rep), "key": [rep[i] for i in rep], "n_atoms": [1] * len(rep)})
    split = make_split(index, {"train": 0.5, "val": 0.3, "test": 0.2}, seed=3)
    assert split.group_by("key").agg(pl.col("split").n_unique().alias("n"))["n"].max() == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs not on PATH")
def test_mmseqs_agrees_with_builtin():
    seqs = {
        f"{p.name[:4]}_{c}": v.sequence
        for p in STRUCTURES
        for c, v in pdb.read_ca_chains(p).items()
    }
    seqs["7mut_A"] = _mutate(seqs["5pti_A"], 0.3, 0)
    seqs["7far_A"] = _mutate(seqs["5pti_A"], 0.8, 1)
    seqs["7dup_A"] = seqs["5pti_A"]
    a = cluster_sequences(seqs, method="mmseqs")
    b = cluster_sequences(seqs, method="builtin")
    groups = lambda rep: {frozenset(i for i in rep if rep[i] == r) for r in rep.values()}  # noqa: E731
    assert groups(a) == groups(b)


# ------------------------------------------------------------------------ remote download


def _serve(server, missing: tuple[str, ...] = (), **faults) -> dict[str, bytes]:
    meta = FIX / "metadata"
    server.add("/pub/pdb/derived_data/pdb_seqres.txt.gz", (meta / "pdb_seqres.txt.gz").read_bytes())
    server.add("/pub/pdb/derived_data/index/resolu.idx", (meta / "resolu.idx").read_bytes())
    server.add(
        "/pub/pdb/derived_data/pdb_entry_type.txt", (meta / "pdb_entry_type.txt").read_bytes()
    )
    bodies = {}
    for p in STRUCTURES:
        pid = p.name[:4]
        if pid in missing:
            continue
        bodies[pid] = p.read_bytes()
        server.add(f"/download/{pid}.cif.gz", bodies[pid], *faults.get(pid, ()))
    return bodies


def _structure_requests(server) -> set[str]:
    return {r.path for r in server.requests if r.path.startswith("/download/")}


def test_remote_filters_first_and_resumes_interrupted_download(http_server, tmp_path):
    bodies = _serve(http_server, **{"5pti": (Fault(drop_after=5000, times=1),)})
    cfg = {"base_url": http_server.base_url, "retries": 1, "backoff": 0, "concurrency": 2,
           "max_failed_downloads": 0}  # fmt: skip
    raw = tmp_path / "raw"
    with pytest.raises(DownloadError, match="5pti"):
        pdb.download("remote", raw, cfg)  # the connection drops mid-file; one attempt only
    # Filters ran on metadata alone: only the three passing entries were ever requested.
    assert _structure_requests(http_server) == {
        f"/download/{p}.cif.gz" for p in ("1bd2", "3pwp", "5pti")
    }
    partial = tmp_path / ".cache" / "raw" / "mmCIF" / "pt" / "5pti.cif.gz.partial"
    assert partial.stat().st_size == 5000 and not (raw / pdb.MANIFEST).exists()
    http_server.clear_log()
    pdb.download("remote", raw, cfg)  # the rerun resumes with a Range request
    reqs = http_server.requests_for("/download/5pti.cif.gz")
    assert [r.headers.get("Range") for r in reqs] == ["bytes=5000-"]
    assert _structure_requests(http_server) == {"/download/5pti.cif.gz"}  # the others were kept
    assert (raw / "mmCIF" / "pt" / "5pti.cif.gz").read_bytes() == bodies["5pti"]
    manifest = pl.read_parquet(raw / pdb.MANIFEST)
    assert manifest["id"].to_list() == ["1bd2_B", "3pwp_B", "5pti_A"]
    assert manifest["error"].null_count() == 3
    pdb.preprocess(raw, tmp_path / "store", {"cluster_method": "builtin"})
    store = Store(tmp_path / "store")
    keys = dict(store.index.select("id", "key").iter_rows())
    assert keys["1bd2_B"] == keys["3pwp_B"] != keys["5pti_A"]


def test_mirror_is_read_in_place_and_missing_entries_are_quarantined(http_server, tmp_path):
    _serve(http_server)
    mirror = tmp_path / "mirror"
    for p in STRUCTURES:
        if p.name.startswith("3pwp"):
            continue  # absent from the mirror
        dest = pdb.divided_path(mirror / "mmCIF", p.name[:4])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    raw = tmp_path / "raw"
    pdb.download("remote", raw, {"base_url": http_server.base_url, "mirror": str(mirror)})
    assert not _structure_requests(http_server)
    manifest = pl.read_parquet(raw / pdb.MANIFEST)
    err = dict(manifest.select("id", "error").iter_rows())
    assert err["1bd2_B"] is None and err["3pwp_B"].startswith("not in mirror")
    pdb.preprocess(raw, tmp_path / "store", {"cluster_method": "builtin"})
    store = Store(tmp_path / "store")
    assert store.index["id"].to_list() == ["1bd2_B", "5pti_A"]
    assert store.quarantine["id"].to_list() == ["3pwp_B"]


def test_metadata_filters():
    meta = FIX / "metadata"
    df = pdb.select_chains(
        meta / "pdb_seqres.txt.gz", meta / "resolu.idx", meta / "pdb_entry_type.txt", {}
    )
    assert df["id"].to_list() == ["1bd2_B", "3pwp_B", "5pti_A"]
    wide = pdb.select_chains(
        meta / "pdb_seqres.txt.gz", meta / "resolu.idx", meta / "pdb_entry_type.txt",
        {"max_length": 512, "max_resolution": 7.0, "methods": ["diffraction", "NMR"]},
    )  # fmt: skip
    assert set(wide["id"]) == {"1bd2_A", "1bd2_B", "3pwp_A", "3pwp_B", "5pti_A", "9low_A", "9big_A"}
    # 9nmr has no positive resolution; 9dna is not protein; 9sho too short; 9unk has X.
    with pytest.raises(ValueError, match="backend"):
        pdb.resolve_config({"backend": "pymol"})


# ---------------------------------------------------------------------------------- embedded


@pytest.mark.skipif(
    importlib.util.find_spec("MDAnalysisTests") is None, reason="mdanalysistests not installed"
)
def test_embedded_build_has_enough_unique_chains(tmp_path):
    raw = tmp_path / "raw"
    pdb.build_embedded(raw, {})
    manifest = pl.read_parquet(raw / pdb.MANIFEST)
    assert manifest.height >= 60 and manifest["sequence"].n_unique() == manifest.height
    assert manifest["length"].min() > 50 and manifest["length"].max() <= 512
    assert (raw / manifest["file"][0]).is_file()
    pdb.preprocess(raw, tmp_path / "store", {"cluster_method": "builtin", "workers": 2})
    store = Store(tmp_path / "store")
    assert len(store) >= 60
    assert set(store.quarantine["reason"].str.slice(0, 7)) <= {"length "}  # only the > 256 ones
