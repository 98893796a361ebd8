"""SPICE: embedded GFN2 build, the one reader, preprocessing/quarantine, download."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from rdkit import Chem

from equipipe.data import spice
from equipipe.data.download import DownloadError
from equipipe.data.embedded import BOHR_ANGSTROM, HARTREE_EV, xtb_singlepoint
from equipipe.store import Store, TooManyBadRecords
from tests.httpserver import Fault

FIX = Path(__file__).parent / "fixtures" / "spice"
SMALL = {"n_molecules": 4, "conformers": 2, "seed": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded2")
    spice.build_embedded(out, {**SMALL, "workers": 2})
    return out / spice.EMBEDDED_FILE


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            f"{g}/{k}": np.asarray(f[g][k][()])
            for g in f
            for k in f[g]
            if k not in ("smiles", "subset")
        } | {f"{g}/rot": f[g].attrs["haar_rotations"] for g in f}


# ----------------------------------------------------------------------------- embedded file


def test_embedded_layout_is_spice(built):
    assert not list(built.parent.glob("*.partial"))
    with h5py.File(built, "r") as f:
        assert f.attrs["level_of_theory"] == "GFN2-xTB"
        assert "embedded" in f.attrs["subset"] and "GFN2" in f.attrs["subset"]
        assert "Haar" in f.attrs["orientation"]
        atom_e = {
            int(k): v for k, v in json.loads(f.attrs["isolated_atom_energies_hartree"]).items()
        }
        assert len(f) == 4
        for g in f.values():
            assert set(g) == {
                "subset",
                "smiles",
                "atomic_numbers",
                "conformations",
                "dft_total_energy",
                "dft_total_gradient",
                "formation_energy",
            }
            z = g["atomic_numbers"][()]
            n = len(z)
            assert g["atomic_numbers"].dtype == np.int16
            assert g["conformations"].dtype == np.float32 and g["conformations"].shape == (2, n, 3)
            assert g["dft_total_energy"].dtype == np.float64 and g["dft_total_energy"].shape == (2,)
            assert g["dft_total_gradient"].dtype == np.float32
            assert g["dft_total_gradient"].shape == (2, n, 3)
            assert g["formation_energy"].dtype == np.float64
            assert g["conformations"].attrs["units"] == "bohr"
            assert g["dft_total_energy"].attrs["units"] == "hartree"
            assert g["dft_total_gradient"].attrs["units"] == "hartree/bohr"
            assert g["formation_energy"].attrs["units"] == "hartree"
            assert g["subset"].shape == (1,) and g["smiles"].shape == (1,)
            assert g["subset"].asstr()[0] == f.attrs["subset"]
            # mapped explicit-H SMILES: atom order = map index
            mol = Chem.MolFromSmiles(g["smiles"].asstr()[0], sanitize=False)
            by_map = {a.GetAtomMapNum(): a.GetAtomicNum() for a in mol.GetAtoms()}
            assert [by_map[i + 1] for i in range(n)] == z.tolist()
            # bohr: C-H bonds ~2.06 bohr, molecules tens of bohr across at most
            x = g["conformations"][0].astype(np.float64)
            d = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(n, 1)]
            assert 1.7 < d.min() < 2.2
            # hartree: GFN2 total energies of 8-40 heavy atoms are -20 .. -150 Ha
            e = g["dft_total_energy"][()]
            assert np.all((e < -10) & (e > -200))
            ref = sum(atom_e[int(v)] for v in z)
            np.testing.assert_allclose(g["formation_energy"][()], e - ref, rtol=0, atol=1e-9)
            assert np.abs(g["dft_total_gradient"][()]).max() < 1.0
            np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)  # centred, then rotated


def test_rotation_recorded_and_gradient_consistent(built):
    with h5py.File(built, "r") as f:
        g = f["embedded-0000"]
        z = g["atomic_numbers"][()]
        rots = g.attrs["haar_rotations"]
        x = g["conformations"][1].astype(np.float64) * BOHR_ANGSTROM
        e_stored = g["dft_total_energy"][1]
        grad_stored = g["dft_total_gradient"][1].astype(np.float64)
    r = rots[1]
    assert rots.shape == (2, 3, 3) and not np.allclose(rots[0], rots[1])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    # the label belongs to the stored geometry
    e, grad = xtb_singlepoint(z, x)
    assert e == pytest.approx(e_stored, abs=1e-9)
    np.testing.assert_allclose(grad, grad_stored, atol=2e-6)
    # undoing the rotation leaves the energy and rotates the gradient back
    e0, grad0 = xtb_singlepoint(z, x @ r)  # rows: R^T x
    assert e0 == pytest.approx(e_stored, abs=1e-7)
    np.testing.assert_allclose(grad0 @ r.T, grad_stored, atol=1e-5)


def test_embedded_deterministic_across_workers_and_seeds(built, tmp_path):
    spice.build_embedded(tmp_path / "w1", {**SMALL, "workers": 1})
    a, b = _arrays(built), _arrays(tmp_path / "w1" / spice.EMBEDDED_FILE)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    spice.build_embedded(tmp_path / "s1", {**SMALL, "seed": 1, "n_molecules": 2, "workers": 1})
    c = _arrays(tmp_path / "s1" / spice.EMBEDDED_FILE)
    assert not np.array_equal(c["embedded-0000/rot"], a["embedded-0000/rot"])


def test_embedded_through_preprocess_units(built, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(built, raw / spice.EMBEDDED_FILE)
    spice.preprocess(raw, tmp_path / "store", {"source": "embedded"})
    store = Store(tmp_path / "store")
    assert len(store) == 8 and store.quarantine.height == 0
    assert set(store.index.columns) >= {"id", "key", "n_atoms", "subset", "source"}
    row = store.rows(["embedded-0002/1"])[0]
    ex = store.get(int(row))
    with h5py.File(built, "r") as f:
        g = f["embedded-0002"]
        np.testing.assert_allclose(
            ex["pos"], g["conformations"][1] * BOHR_ANGSTROM, rtol=1e-6, atol=1e-6
        )
        assert ex["energy"] == pytest.approx(g["dft_total_energy"][1] * 27.211386, rel=1e-12)
        np.testing.assert_allclose(
            ex["forces"], -g["dft_total_gradient"][1] * 27.211386 / 0.529177, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(ex["z"], g["atomic_numbers"][()])
    assert ex["z"].dtype == np.int64 and ex["pos"].dtype == np.float32
    assert store.index["key"][int(row)] == "embedded-0002"
    assert store.index["source"][0] == "embedded"
    assert store.meta["raw_level_of_theory"] == "GFN2-xTB"
    assert store.meta["units"]["forces"] == "eV/angstrom"


# ----------------------------------------------------------------------------- extxyz reader


def test_extxyz_comment_parser():
    info = spice.parse_extxyz_comment(
        'Properties=species:S:1:pos:R:3 REF_energy=-1.5 smiles="[C:1]([H:2])" '
        "pbc=\"F F F\" config_type=PubChem flag Lattice='1 0 0 0 1 0 0 0 1'"
    )
    assert info["REF_energy"] == "-1.5" and info["smiles"] == "[C:1]([H:2])"
    assert info["pbc"] == "F F F" and info["flag"] == "T" and info["Lattice"].startswith("1 0")


def test_extxyz_reader_maceoff_style():
    recs = list(spice.read_records(FIX / "maceoff_small.xyz", source="maceoff23/train"))
    assert len(recs) == 4
    good = [r for r in recs if r["error"] is None]
    assert len(good) == 3
    ethanol = [r for r in good if r["z"].tolist().count(6) == 2 and len(r["z"]) == 9]
    assert [r["id"].rsplit("/", 1)[1] for r in ethanol] == ["0", "1"]
    assert ethanol[0]["key"] == ethanol[1]["key"] == ethanol[0]["smiles"]
    assert ethanol[0]["subset"] == "PubChem" and ethanol[0]["source"] == "maceoff23/train"
    # units untouched (eV, eV/Å) and consistent with an xTB recomputation
    r = ethanol[0]
    e, g = xtb_singlepoint(r["z"], r["pos"])
    assert r["energy"] == pytest.approx(e * HARTREE_EV, abs=1e-6)
    np.testing.assert_allclose(r["forces"], -g * HARTREE_EV / BOHR_ANGSTROM, atol=1e-6)
    (atom,) = [r for r in recs if r["error"]]
    assert "single-atom" in atom["error"] and atom["subset"] == "IsolatedAtom"


def test_extxyz_reader_groups_by_formula_without_smiles():
    recs = list(spice.read_records(FIX / "plain_small.xyz"))
    assert [r["id"] for r in recs] == ["H2O/0", "H2O/1"]
    assert all(r["error"] is None and r["forces"].shape == (3, 3) for r in recs)
    assert recs[0]["source"] == "plain_small.xyz"


def test_extxyz_truncated_is_an_error(tmp_path):
    text = (FIX / "maceoff_small.xyz").read_text()
    bad = tmp_path / "cut.xyz"
    bad.write_text(text[: len(text) - 200])
    with pytest.raises(spice.CorruptFileError, match="truncated|corrupt"):
        list(spice.read_records(bad))


def test_preprocess_maceoff_two_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIX / "maceoff_small.xyz", raw / "train_large_neut_no_bad_clean.xyz")
    shutil.copy(FIX / "maceoff_small.xyz", raw / "test_large_neut_all.xyz")
    frames = {
        "train_large_neut_no_bad_clean.xyz": {"frames": 4},
        "test_large_neut_all.xyz": {"frames": 4},
    }
    cfg = {"source": "maceoff23", "max_bad_fraction": 0.3, "expected": frames}
    spice.preprocess(raw, tmp_path / "store", cfg)
    store = Store(tmp_path / "store")
    assert len(store) == 6
    assert store.meta["release_pins"]["test_large_neut_all.xyz"]["pinned_by"] == "download.expected"
    assert sorted(set(store.index["source"])) == ["maceoff23/test", "maceoff23/train"]
    assert all(i.startswith(("train/", "test/")) for i in store.index["id"])
    q = store.quarantine
    assert q.height == 2 and all("single-atom" in r for r in q["reason"])


def test_preprocess_refuses_a_file_with_other_frame_counts(tmp_path):
    """A file cut at a frame boundary reads cleanly; the pinned frame count catches it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIX / "maceoff_small.xyz", raw / "train_large_neut_no_bad_clean.xyz")
    shutil.copy(FIX / "maceoff_small.xyz", raw / "test_large_neut_all.xyz")
    with pytest.raises(spice.CorruptFileError, match="holds 4 .* SOURCES pins 951005"):
        spice.preprocess(raw, tmp_path / "store", {"source": "maceoff23"})
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="allowed"):
        spice.preprocess(raw, tmp_path / "s", {"source": "maceoff23", "expected": {"x.xyz": {}}})


# ----------------------------------------------------------------------------- quarantine


def _water(seed: int):
    rng = np.random.default_rng(seed)
    x = np.array([[0.0, 0.0, 0.12], [0.0, 0.77, -0.47], [0.0, -0.77, -0.47]])
    x = x + rng.normal(0, 0.02, x.shape)
    e, g = xtb_singlepoint(np.array([8, 1, 1]), x)
    return x / BOHR_ANGSTROM, e, g


def _group(f, name, z, conf, energy, grad, drop=()):
    g = f.create_group(name)
    items = {
        "subset": ([b"test subset"], h5py.string_dtype()),
        "smiles": ([b"[O:1]([H:2])[H:3]"], h5py.string_dtype()),
        "atomic_numbers": (np.asarray(z), np.int16),
        "conformations": (np.asarray(conf), np.float32),
        "dft_total_energy": (np.asarray(energy), np.float64),
        "dft_total_gradient": (np.asarray(grad), np.float32),
        "formation_energy": (np.asarray(energy) + 1.0, np.float64),
    }
    for k, (v, dt) in items.items():
        if k not in drop:
            g.create_dataset(k, data=v, dtype=dt)


def _bad_file(path: Path, n_good: int = 1) -> None:
    w = [_water(s) for s in range(3)]
    conf = np.stack([c for c, _, _ in w])
    e = np.array([x for _, x, _ in w])
    g = np.stack([x for _, _, x in w])
    z = [8, 1, 1]
    with h5py.File(path, "w") as f:
        for i in range(n_good):
            _group(f, f"good{i}", z, conf, e, g)
        _group(f, "nogradient", z, conf[:1], e[:1], g[:1], drop=("dft_total_gradient",))
        _group(f, "nanenergy", z, conf[:1], [np.nan], g[:1])
        _group(f, "uranium", [92, 1, 1], conf[:1], e[:1], g[:1])
        _group(f, "shape", [8, 1, 1, 1], conf[:1], e[:1], g[:1])
        _group(f, "biggrad", z, conf[:1], e[:1], g[:1] * 0 + 2.0)
        _group(f, "infgrad", z, conf[:1], e[:1], np.where(g[:1] > 0, np.inf, g[:1]))
        _group(f, "gradsize", z, conf[:1], e[:1], g[:1, :2])


def test_quarantine_each_bad_kind(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _bad_file(raw / "SPICE-1.1.4.hdf5")
    spice.preprocess(raw, tmp_path / "store", {"source": "spice-1.1.4", "max_bad_fraction": 0.9})
    store = Store(tmp_path / "store")
    assert len(store) == 3 and store.index["key"].to_list() == ["good0"] * 3
    assert store.index["subset"][0] == "test subset"
    q = dict(zip(store.quarantine["id"], store.quarantine["reason"]))
    assert "missing HDF5 key(s): dft_total_gradient" in q["nogradient/0"]
    assert "non-finite energy" in q["nanenergy/0"]
    assert "Z=[92]" in q["uranium/0"]
    assert "shape mismatch" in q["shape/0"]
    assert "max_gradient" in q["biggrad/0"]
    assert "non-finite forces" in q["infgrad/0"]
    assert "shape mismatch" in q["gradsize/0"]
    assert len(q) == 7


def test_too_many_bad_records_fails_without_store(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _bad_file(raw / "SPICE-1.1.4.hdf5")
    with pytest.raises(TooManyBadRecords, match="max_bad_fraction"):
        spice.preprocess(raw, tmp_path / "store", {"source": "spice-1.1.4"})
    assert not (tmp_path / "store").exists()


def test_truncated_hdf5_is_a_clear_error(built, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = built.read_bytes()
    (raw / spice.EMBEDDED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(spice.CorruptFileError, match="truncated or corrupt"):
        spice.preprocess(raw, tmp_path / "store", {})
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "store.partial").exists()


def test_missing_source_file_names_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        spice.preprocess(tmp_path, tmp_path / "store", {"source": "spice-2.0.1"})
    with pytest.raises(ValueError, match="allowed values"):
        spice.preprocess(tmp_path, tmp_path / "store", {"source": "spice-9"})


# ----------------------------------------------------------------------------- download


def _zenodo(http_server, body: bytes, md5: str | None = None) -> str:
    record = json.loads((FIX / "zenodo_record.json").read_text())
    entry = record["files"][1]
    entry["size"] = len(body)
    entry["checksum"] = f"md5:{md5 or hashlib.md5(body).hexdigest()}"
    http_server.add_json("/api/records/8222043", record)
    http_server.add(entry["links"]["self"], body)
    return http_server.url("/api")


def _pin(body: bytes) -> dict:
    return {"expected": {"SPICE-1.1.4.hdf5": {"md5": hashlib.md5(body).hexdigest()}}}


def test_download_zenodo_then_preprocess(http_server, tmp_path):
    src = tmp_path / "src.hdf5"
    _bad_file(src, n_good=20)
    body = src.read_bytes()
    api = _zenodo(http_server, body)
    path = "/api/records/8222043/files/SPICE-1.1.4.hdf5/content"
    http_server.set_faults(path, Fault(drop_after=len(body) // 3, times=1))
    out = tmp_path / "raw"
    spice.download("spice-1.1.4", out, {"zenodo_api": api, **_pin(body)})
    assert (out / "SPICE-1.1.4.hdf5").read_bytes() == body
    assert http_server.requests_for(path)[-1].headers.get("Range", "").startswith("bytes=")
    spice.preprocess(out, tmp_path / "store", {"source": "spice-1.1.4", "max_bad_fraction": 0.2})
    assert len(Store(tmp_path / "store")) == 60


def test_download_refuses_changed_zenodo_record(http_server, tmp_path):
    body = b"not the real SPICE file"
    api = _zenodo(http_server, body)  # its md5 differs from the one pinned in SOURCES
    with pytest.raises(DownloadError, match="record changed"):
        spice.download("spice-1.1.4", tmp_path / "raw", {"zenodo_api": api})
    assert not (tmp_path / "raw" / "SPICE-1.1.4.hdf5").exists()


def test_download_corrupt_body_leaves_nothing(http_server, tmp_path):
    body = b"x" * 5000
    api = _zenodo(http_server, body)
    http_server.set_faults(
        "/api/records/8222043/files/SPICE-1.1.4.hdf5/content", Fault(corrupt=True, times=None)
    )
    with pytest.raises(DownloadError):
        spice.download("spice-1.1.4", tmp_path / "raw", {"zenodo_api": api, **_pin(body)})
    assert not (tmp_path / "raw" / "SPICE-1.1.4.hdf5").exists()


def test_download_maceoff_bitstreams(http_server, tmp_path):
    bodies = {}
    for name, facts in spice.SOURCES["maceoff23"]["files"].items():
        bodies[name] = (FIX / "maceoff_small.xyz").read_bytes()
        http_server.add(f"/bitstreams/{facts['bitstream']}/download", bodies[name])
    spice.download("maceoff23", tmp_path / "raw", {"apollo_base": http_server.url("/bitstreams")})
    for name, body in bodies.items():
        assert (tmp_path / "raw" / name).read_bytes() == body


def test_download_dir_is_used_when_it_verifies(http_server, tmp_path):
    local = tmp_path / "mirror"
    local.mkdir()
    body = b"pretend SPICE bytes"
    (local / "SPICE-1.1.4.hdf5").write_bytes(body)
    cfg = {"download_dir": str(local), "zenodo_api": http_server.url("/api"), **_pin(body)}
    spice.download("spice-1.1.4", tmp_path / "raw", cfg)
    assert (tmp_path / "raw" / "SPICE-1.1.4.hdf5").read_bytes() == body
    assert http_server.requests == []
    # a copy that does not verify is ignored and the file is downloaded
    api = _zenodo(http_server, b"other")
    spice.download("spice-1.1.4", tmp_path / "raw2", {**cfg, "zenodo_api": api, **_pin(b"other")})
    assert (tmp_path / "raw2" / "SPICE-1.1.4.hdf5").read_bytes() == b"other"
