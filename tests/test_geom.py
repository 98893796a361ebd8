"""GEOM data: restricted unpickling, the trust gate, the streaming reader, filters, download."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from equipipe.data import geom, safe_pickle
from equipipe.store import Store

FIXTURES = Path(__file__).parent / "fixtures" / "geom"


def _mol(smiles: str, seed: int = 7, stretch: float = 1.0):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(m, randomSeed=seed) == 0
    if stretch != 1.0:
        conf = m.GetConformer()
        for i, p in enumerate(conf.GetPositions()):
            conf.SetAtomPosition(i, (p * stretch).tolist())
    return m


def _record(smiles: str, energies: list[float], **kw) -> dict:
    confs = [
        {
            "geom_id": 100 + j,
            "totalenergy": e,
            "relativeenergy": 0.0,
            "boltzmannweight": 1.0 / len(energies),
            "degeneracy": 1,
            "rd_mol": _mol(smiles, seed=j + 1, **kw),
        }
        for j, e in enumerate(energies)
    ]
    return {"smiles": smiles, "charge": 0, "totalconfs": len(confs), "conformers": confs}


def _archive(path: Path, members: dict[str, bytes]) -> str:
    """Write an rdkit_folder-style tar.gz; return its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


class Evil:
    """A pickle payload that would run a shell command when unpickled by plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- safe_pickle


def test_restricted_unpickler_admits_rdkit_molecules_and_plain_data():
    m = _mol("c1ccccc1O")
    obj = {"smiles": "Oc1ccccc1", "confs": [{"rd_mol": m, "e": -1.5, "w": (0.5, 2)}], "s": {1, 2}}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        out = safe_pickle.loads(pickle.dumps(obj, protocol=proto))
        got = out["confs"][0]["rd_mol"]
        assert got.GetNumAtoms() == m.GetNumAtoms()
        np.testing.assert_allclose(
            got.GetConformer().GetPositions(), m.GetConformer().GetPositions()
        )
        assert out["s"] == {1, 2} and out["confs"][0]["w"] == (0.5, 2)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"conformers": [Evil(marker)]})
    with pytest.raises(safe_pickle.RefusedPickle, match="refused global"):
        safe_pickle.loads(payload)
    assert not marker.exists()
    # other classic gadgets are refused too
    for gadget in (("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen")):
        assert gadget not in safe_pickle.ALLOWED_GLOBALS
    with pytest.raises(safe_pickle.RefusedPickle):
        safe_pickle.loads(b"cbuiltins\neval\n(S'1+1'\ntR.")


# ----------------------------------------------------------------------------- trust gate


def test_midi_pickles_refused_without_opt_in_and_restricted_with_it(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    mols = {"train": ["CCO", "CCN"], "val": ["CCC"], "test": ["CO"]}
    for split, smis in mols.items():
        data = [(s, [_mol(s, seed=1), _mol(s, seed=2)]) for s in smis]
        (raw / f"{split}_data.pickle").write_bytes(pickle.dumps(data))
    cfg = {"source": "midi", "grid_size": 32, "grid_spacing": 0.5}
    with pytest.raises(geom.UntrustedPickleError, match="allow_unverified_pickles"):
        geom.preprocess(raw, tmp_path / "store", cfg)
    assert not (tmp_path / "store").exists()

    geom.preprocess(raw, tmp_path / "store", {**cfg, "allow_unverified_pickles": True})
    idx = Store(tmp_path / "store").index
    assert idx.height == 8 and set(idx["midi_split"]) == {"train", "val", "test"}
    assert np.isnan(Store(tmp_path / "store").get(0)["energy"])

    # a pinned sha256 verifies without the opt-in; a wrong pin is refused before unpickling
    pins = {s: hashlib.sha256((raw / f"{s}_data.pickle").read_bytes()).hexdigest() for s in mols}
    geom.preprocess(raw, tmp_path / "store2", {**cfg, "midi_sha256": pins})
    with pytest.raises(geom.CorruptFileError, match="sha256"):
        geom.preprocess(raw, tmp_path / "store3", {**cfg, "midi_sha256": {**pins, "val": "0" * 64}})

    # opting in does not open the door to code: the restricted unpickler still refuses it
    marker = tmp_path / "pwned"
    (raw / "val_data.pickle").write_bytes(pickle.dumps([("CC", [Evil(marker)])]))
    with pytest.raises(safe_pickle.RefusedPickle):
        geom.preprocess(raw, tmp_path / "store4", {**cfg, "allow_unverified_pickles": True})
    assert not marker.exists()


def test_archive_without_checksum_is_refused_and_tampering_detected(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    md5 = _archive(
        raw / geom.ARCHIVE, {"rdkit_folder/drugs/a.pickle": pickle.dumps(_record("CCO", [-1.0]))}
    )
    cfg = {"source": "geom-rdkit"}
    with pytest.raises(geom.UntrustedPickleError, match="no published or pinned checksum"):
        geom.preprocess(raw, tmp_path / "s", cfg)
    with pytest.raises(geom.CorruptFileError, match="md5"):
        geom.preprocess(raw, tmp_path / "s", {**cfg, "rdkit_folder_md5": "0" * 32})
    geom.preprocess(raw, tmp_path / "s", {**cfg, "rdkit_folder_md5": md5})
    assert len(Store(tmp_path / "s")) == 1
    geom.preprocess(raw, tmp_path / "s2", {**cfg, "allow_unverified_pickles": True})


# ----------------------------------------------------------------------------- reader + filters


def test_filters_quarantine_with_reasons_and_conformer_order(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    members = {
        "rdkit_folder/summary_drugs.json": b"{}",
        "rdkit_folder/drugs/ok.pickle": pickle.dumps(
            _record("CC(=O)Nc1ccccc1", [-3.0, -5.0, -4.0])
        ),
        "rdkit_folder/drugs/phos.pickle": pickle.dumps(_record("CP(C)(=O)OC", [-2.0])),
        "rdkit_folder/drugs/big.pickle": pickle.dumps(
            _record("CCCCCCCCCCCCCCCCCCCC", [-1.0], stretch=1.0)
        ),
        "rdkit_folder/drugs/junk.pickle": b"not a pickle at all",
        "rdkit_folder/qm9/skip.pickle": pickle.dumps(_record("C", [-1.0])),
    }
    md5 = _archive(raw / geom.ARCHIVE, members)
    cfg = {
        "source": "geom-rdkit",
        "rdkit_folder_md5": md5,
        "conformers_per_molecule": 2,
        "grid_size": 32,
        "grid_spacing": 0.5,
        "radius_margin": 1.5,
        "max_bad_fraction": 0.9,
    }
    geom.preprocess(raw, tmp_path / "s", cfg)
    store = Store(tmp_path / "s")
    q = {r["id"]: r["reason"] for r in store.quarantine.iter_rows(named=True)}
    reasons = " | ".join(q.values())
    assert "element P outside the vocabulary" in reasons
    assert "max radius" in reasons and "unreadable pickle" in reasons
    h = geom.smiles_hash("CC(=O)Nc1ccccc1")
    assert store.index["id"].to_list() == [f"{h}/100", f"{h}/101"]  # file order
    limit = geom.max_radius_allowed(cfg)
    assert limit == pytest.approx(7.75 - 1.5)
    for i in range(len(store)):
        ex = store.get(i)
        r = np.sqrt((ex["pos"] ** 2).sum(1))
        assert r.max() <= limit and np.abs(ex["pos"].mean(0)).max() < 1e-5  # centred
        assert ex["pos"].dtype == np.float32 and ex["z"].dtype == np.int8
    # the 20-carbon chain breaks the radius rule in every orientation: quarantined, not cropped
    assert any(k.startswith(geom.smiles_hash("CCCCCCCCCCCCCCCCCCCC")) for k in q)

    geom.preprocess(raw, tmp_path / "s2", {**cfg, "conformer_order": "lowest_energy"})
    ids = Store(tmp_path / "s2").index["id"].to_list()
    assert ids == [f"{h}/101", f"{h}/102"]  # energies -5, -4
    energies = [float(Store(tmp_path / "s2").get(i)["energy"]) for i in range(2)]
    assert energies == [-5.0, -4.0]


@pytest.fixture(scope="module")
def embedded_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("geom_embedded")
    geom.build_embedded(raw, {"n_molecules": 3, "conformers": 2, "workers": 1, "max_heavy": 14})
    return raw


def test_embedded_archive_streams_through_the_same_reader(embedded_raw, tmp_path):
    manifest = json.loads((embedded_raw / geom.MANIFEST).read_text())
    assert manifest["n_molecules"] == 3 and manifest["build_seconds"] > 0
    with tarfile.open(embedded_raw / geom.ARCHIVE, "r:gz") as tar:
        names = tar.getnames()
    assert "rdkit_folder/summary_drugs.json" in names
    summary = json.loads(
        tarfile.open(embedded_raw / geom.ARCHIVE)
        .extractfile("rdkit_folder/summary_drugs.json")
        .read()
    )
    assert len(summary) == 3 and all(
        v["pickle_path"].startswith("drugs/") for v in summary.values()
    )

    _, check = geom.member_verifier(embedded_raw, geom.resolve_config({}))
    records = list(geom.iter_rdkit_folder(embedded_raw / geom.ARCHIVE, check))
    assert len(records) == 3
    for _, rec in records:
        assert set(rec) >= {
            "smiles",
            "charge",
            "totalconfs",
            "uniqueconfs",
            "lowestenergy",
            "ensembleenergy",
            "conformers",
        }
        w = [c["boltzmannweight"] for c in rec["conformers"]]
        assert sum(w) == pytest.approx(1.0)
        for c in rec["conformers"]:
            assert set(c) >= {
                "geom_id",
                "totalenergy",
                "relativeenergy",
                "boltzmannweight",
                "degeneracy",
                "rd_mol",
            }
            R = np.array(c["equipipe_rotation"])
            np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-10)
            assert c["totalenergy"] < 0 and c["relativeenergy"] >= 0

    geom.preprocess(embedded_raw, tmp_path / "store", {})
    store = Store(tmp_path / "store")
    assert len(store) + store.quarantine.height == manifest["n_conformers"]
    assert store.index["key"].n_unique() <= 3 and np.isfinite(store.get(0)["energy"])


def test_embedded_member_not_in_manifest_is_refused(embedded_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(embedded_raw / geom.ARCHIVE, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    name = next(n for n in members if n.endswith(".pickle"))
    members[name] = pickle.dumps(_record("CCO", [-1.0]))  # swapped content, same name
    with open(raw / geom.ARCHIVE, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for n, data in members.items():
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((embedded_raw / geom.MANIFEST).read_text())
    manifest["archive_sha256"] = None  # only the per-member pins are left to catch it
    (raw / geom.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(geom.UntrustedPickleError, match="not pinned"):
        geom.preprocess(raw, tmp_path / "store", {})
    # and the archive-level pin catches it first when present
    (raw / geom.MANIFEST).write_text((embedded_raw / geom.MANIFEST).read_text())
    with pytest.raises(geom.CorruptFileError, match="sha256"):
        geom.preprocess(raw, tmp_path / "store", {})


def test_truncated_archive_is_never_preprocessed(embedded_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = (embedded_raw / geom.ARCHIVE).read_bytes()
    (raw / geom.ARCHIVE).write_bytes(data[: len(data) // 2])
    with pytest.raises(geom.CorruptFileError):
        geom.preprocess(
            raw, tmp_path / "store", {"source": "geom-rdkit", "allow_unverified_pickles": True}
        )
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- download


def test_remote_download_verifies_against_the_dataverse_api(http_server, tmp_path):
    archive = tmp_path / "src.tar.gz"
    md5 = _archive(archive, {"rdkit_folder/drugs/x.pickle": pickle.dumps(_record("CCOC", [-2.0]))})
    body = archive.read_bytes()
    api = json.loads((FIXTURES / "dataverse_dataset.json").read_text())
    df = api["data"]["latestVersion"]["files"][0]["dataFile"]
    df.update(filesize=len(body), md5=md5, checksum={"type": "MD5", "value": md5})
    http_server.add_json("/api/datasets/:persistentId/", api)
    http_server.add(f"/api/access/datafile/{geom.RDKIT_FOLDER_ID}", body)
    raw = tmp_path / "raw"
    geom.download("remote", raw, {"dataverse_api": http_server.url("/api")})
    record = json.loads((raw / geom.ARCHIVE_SOURCE_JSON).read_text())
    assert record["md5"] == md5 and record["checksum_source"] == "Dataverse API"
    assert (raw / geom.ARCHIVE).read_bytes() == body
    geom.preprocess(raw, tmp_path / "store", {"source": "geom-rdkit"})  # verified by the API's md5
    assert len(Store(tmp_path / "store")) == 1


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="conformer_order"):
        geom.resolve_config({"conformer_order": "random"})
    with pytest.raises(ValueError, match="source"):
        geom.resolve_config({"source": "nope"})
