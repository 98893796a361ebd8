"""Data that is wrong or hostile is refused with its reason: gradient layouts, HDF5 links."""

from __future__ import annotations

import json
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from equipipe.data import geom, spice
from equipipe.data.download import ALLOW_ENV, address_refusal
from equipipe.store import Store
from tests.httpserver import LoopbackServer
from tests.test_geom import _archive
from tests.test_geom import _mol as _geom_mol
from tests.test_geom import _record as _geom_record
from tests.test_spice import _group, _water

BIN = Path(sys.executable).parent


def _preprocess(raw, tmp_path, **cfg) -> Store:
    spice.preprocess(raw, tmp_path / "store", {"source": "spice-1.1.4", **cfg})
    return Store(tmp_path / "store")


def test_gradient_layouts_accepted_and_components_first_refused(tmp_path):
    w = [_water(s) for s in range(3)]
    conf = np.stack([c for c, _, _ in w])
    e = np.array([x for _, x, _ in w])
    g = np.stack([x for _, _, x in w])  # (M, N, 3)
    z = [8, 1, 1, 1]  # four atoms, so (M, 3, N) and (M, N, 3) differ in shape
    conf4 = np.concatenate([conf, conf[:, :1] + 1.5], axis=1)
    g4 = np.concatenate([g, -g[:, :1]], axis=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    with h5py.File(raw / "SPICE-1.1.4.hdf5", "w") as f:
        _group(f, "mn3", z, conf4, e, g4)
        _group(f, "flat", z, conf4, e, g4.reshape(3, -1))
        _group(f, "m3n", z, conf4, e, g4.transpose(0, 2, 1))
    store = _preprocess(raw, tmp_path, max_bad_fraction=0.5)
    forces = {i: store.get(k)["forces"] for k, i in enumerate(store.index["id"])}
    for c in range(3):
        np.testing.assert_array_equal(forces[f"mn3/{c}"], forces[f"flat/{c}"])
        np.testing.assert_allclose(forces[f"mn3/{c}"], -g4[c] * spice.FORCE_UNIT, rtol=1e-6)
    q = dict(zip(store.quarantine["id"], store.quarantine["reason"]))
    assert sorted(q) == ["m3n/0", "m3n/1", "m3n/2"]
    assert "(M, 3, N) = (3, 3, 4)" in q["m3n/0"] and "scramble" in q["m3n/0"]


def test_hdf5_external_links_and_virtual_datasets_are_refused(tmp_path):
    w = [_water(s) for s in range(2)]
    conf = np.stack([c for c, _, _ in w])
    e = np.array([x for _, x, _ in w])
    g = np.stack([x for _, _, x in w])
    z = [8, 1, 1]
    other = tmp_path / "elsewhere.hdf5"  # any file of the machine the attacker points at
    with h5py.File(other, "w") as f:
        _group(f, "secret", z, conf, e, g)
    raw = tmp_path / "raw"
    raw.mkdir()
    with h5py.File(raw / "SPICE-1.1.4.hdf5", "w") as f:
        _group(f, "good", z, conf, e, g)
        f["linked_group"] = h5py.ExternalLink(str(other), "/secret")
        grp = f.create_group("linked_member")
        for k in ("subset", "smiles", "atomic_numbers", "conformations", "dft_total_energy"):
            f.copy(f[f"good/{k}"], grp, name=k)
        grp["dft_total_gradient"] = h5py.ExternalLink(str(other), "/secret/dft_total_gradient")
        vgrp = f.create_group("virtual")
        for k in ("subset", "smiles", "atomic_numbers", "dft_total_energy", "dft_total_gradient"):
            f.copy(f[f"good/{k}"], vgrp, name=k)
        layout = h5py.VirtualLayout(shape=conf.shape, dtype=np.float32)
        layout[...] = h5py.VirtualSource(str(other), "/secret/conformations", shape=conf.shape)
        vgrp.create_virtual_dataset("conformations", layout)
        xgrp = f.create_group("external_storage")
        for k in ("subset", "smiles", "atomic_numbers", "dft_total_energy", "dft_total_gradient"):
            f.copy(f[f"good/{k}"], xgrp, name=k)
        blob = tmp_path / "blob.bin"
        blob.write_bytes(conf.astype(np.float32).tobytes())
        xgrp.create_dataset(
            "conformations", shape=conf.shape, dtype=np.float32, external=[(str(blob), 0, 1 << 20)]
        )
    store = _preprocess(raw, tmp_path, max_bad_fraction=0.9)
    assert set(store.index["key"]) == {"good"}
    q = dict(zip(store.quarantine["key"], store.quarantine["reason"]))
    assert "external link" in q["linked_group"] and "elsewhere.hdf5" in q["linked_group"]
    assert "external link 'dft_total_gradient'" in q["linked_member"]
    assert "virtual dataset" in q["virtual"]
    assert "external raw storage" in q["external_storage"]


# ----------------------------------------------------------------------------- redirects


def test_redirect_to_a_loopback_service_not_allowed_is_refused_before_connecting(tmp_path):
    from equipipe.data.download import DownloadError, fetch

    with LoopbackServer() as upstream, LoopbackServer(allow=False) as internal:
        internal.add("/admin/secret", b"internal data")
        url = upstream.redirect("/file.bin", internal.url("/admin/secret"))
        with pytest.raises(DownloadError, match="loopback address"):
            fetch(url, tmp_path / "file.bin", retries=1, progress=False)
        assert [r.status for r in upstream.requests] == [302]
        assert internal.requests == []  # no connection ever reached it
    assert not (tmp_path / "file.bin").exists()


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
     "fe80::1", "fc00::1", "100.64.0.1", "0.0.0.0", "::ffff:127.0.0.1", "224.0.0.1"],
)  # fmt: skip
def test_private_ranges_are_refused_and_public_ones_allowed(ip, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    assert address_refusal(ip, 443, "mirror.example")
    assert address_refusal("93.184.215.14", 443, "example.org") is None
    monkeypatch.setenv(ALLOW_ENV, f"mirror.example:443,[{ip}]:8443")
    assert address_refusal(ip, 443, "mirror.example") is None  # allowed explicitly, by name
    assert address_refusal(ip, 8443, None) is None  # or by address
    assert address_refusal(ip, 444, "mirror.example")  # only that port


def test_metadata_address_is_refused_before_any_socket_connects(monkeypatch, tmp_path):
    import socket as socket_module

    from equipipe.data.download import DownloadError, fetch

    opened = []
    real = socket_module.socket

    class Spy(real):
        def connect(self, address):  # never lets a test reach a non-loopback address
            opened.append(address)
            raise OSError("the test allows no connection")

    monkeypatch.setattr(socket_module, "socket", Spy)
    with pytest.raises(DownloadError, match="link-local address"):
        fetch("https://169.254.169.254/latest/meta-data", tmp_path / "x", retries=1)
    assert opened == []


# ----------------------------------------------------------------------------- pickles


class _CorruptMol:
    """Pickles as the allow-listed ``rdkit.Chem.rdchem.Mol(binary)`` with a corrupted binary."""

    def __init__(self, binary: bytes):
        self.binary = binary

    def __reduce__(self):
        from rdkit.Chem import rdchem

        return (rdchem.Mol, (self.binary,))


def _segfaulting_binary() -> bytes:
    """Ethanol's RDKit binary with one count field set to 1000: RDKit reads past its buffer."""
    mol = _geom_mol("CCO", seed=1)
    binary = bytearray(mol.ToBinary())
    binary[126:130] = struct.pack("<I", 1000)
    return bytes(binary)


def test_segfaulting_mol_pickle_is_quarantined_not_a_dead_job(tmp_path):
    binary = _segfaulting_binary()
    # It really kills a process that unpickles it (as today's preprocess did: exit 139).
    probe = subprocess.run(
        [sys.executable, "-c", f"from rdkit import Chem; Chem.Mol({binary!r})"],
        capture_output=True,
    )
    assert probe.returncode == -signal.SIGSEGV
    hostile = _geom_record("CCO", [-1.0])
    hostile["conformers"][0]["rd_mol"] = _CorruptMol(binary)
    members = {
        "rdkit_folder/drugs/a.pickle": pickle.dumps(_geom_record("CCN", [-2.0, -1.5])),
        "rdkit_folder/drugs/hostile.pickle": pickle.dumps(hostile),
        "rdkit_folder/drugs/b.pickle": pickle.dumps(_geom_record("CCC", [-3.0])),
    }
    assert len(members["rdkit_folder/drugs/hostile.pickle"]) < 1200
    raw = tmp_path / "raw"
    raw.mkdir()
    _archive(raw / geom.ARCHIVE, members)
    cfg = {"source": "geom-rdkit", "allow_unverified_pickles": True, "workers": 2}
    out = subprocess.run(
        [str(BIN / "equipipe"), "preprocess", "geom", "--raw", str(raw),
         "--out", str(tmp_path / "store"), "--cfg", json.dumps(cfg)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    store = Store(tmp_path / "store")
    assert sorted(set(store.index["key"])) == ["CCC", "CCN"] and len(store) == 3
    q = store.quarantine.filter(pl.col("id").str.ends_with("/*"))
    assert q.height == 1 and "SIGSEGV" in q["reason"][0], q
