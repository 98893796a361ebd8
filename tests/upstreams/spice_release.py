"""Miniature SPICE releases in their exact layouts, built offline from real molecules.

One small GFN2-xTB-labelled set (:func:`equipipe.data.spice.build_embedded`: RDKit molecules,
ETKDG conformers, tblite energies and gradients) is rewritten as

- ``SPICE-2.0.1.hdf5`` / ``SPICE-1.1.4.hdf5``: one group per molecule (numeric names, not
  SMILES), string datasets ``subset`` and ``smiles`` (mapped, explicit H), ``atomic_numbers``
  int16 (N,), ``conformations`` float32 (M, N, 3) bohr, ``dft_total_energy`` float64 (M,)
  hartree, ``dft_total_gradient`` float32 (M, N, 3) hartree/bohr, ``formation_energy`` float64
  (M,) hartree, each with its ``units`` attribute; no file attributes.
- the MACE-OFF23 split as extended XYZ: ``train_large_neut_no_bad_clean.xyz`` and
  ``test_large_neut_all.xyz`` (disjoint molecules), per frame ``REF_energy`` (eV),
  ``REF_forces`` (eV/Å), ``config_type``, ``total_charge``, ``smiles``, ``pbc``.

Every number comes from the labelled set (unit conversions only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from equipipe.data.embedded import BOHR_ANGSTROM, HARTREE_EV

SUBSETS = {
    "2.0.1": "SPICE PubChem Set 1 Single Points Dataset v1.3",
    "1.1.4": "SPICE PubChem Set 1 Single Points Dataset v1.2",
}
MACEOFF_FILES = {"train": "train_large_neut_no_bad_clean.xyz", "test": "test_large_neut_all.xyz"}
SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F", 15: "P", 16: "S", 17: "Cl", 35: "Br", 53: "I"}


def build_labelled(dest: Path, n_molecules: int = 8, conformers: int = 4) -> Path:
    """The labelled set the releases are written from (a SPICE-layout HDF5)."""
    from equipipe.data import spice

    spice.build_embedded(
        dest, {"n_molecules": n_molecules, "conformers": conformers, "seed": 7, "workers": 2}
    )
    return dest / spice.EMBEDDED_FILE


def _molecules(labelled: Path) -> list[dict]:
    import h5py

    out = []
    with h5py.File(labelled, "r") as f:
        for name in sorted(f):
            g = f[name]
            out.append(
                {
                    "draw_index": int(g.attrs["draw_index"]),
                    "smiles": g["smiles"][0].decode(),
                    "z": g["atomic_numbers"][()],
                    "conformations": g["conformations"][()],
                    "energy": g["dft_total_energy"][()],
                    "gradient": g["dft_total_gradient"][()],
                    "formation": g["formation_energy"][()],
                }
            )
    return out


def write_spice_hdf5(labelled: Path, dest: Path, version: str) -> Path:
    """``dest`` = ``SPICE-<version>.hdf5`` in the release layout."""
    import h5py

    string = h5py.string_dtype()
    with h5py.File(dest, "w") as f:
        for m in _molecules(labelled):
            g = f.create_group(str(103_000_000 + 7919 * m["draw_index"]))  # PubChem-like ids
            g.create_dataset("subset", data=[SUBSETS[version]], dtype=string)
            g.create_dataset("smiles", data=[m["smiles"]], dtype=string)
            g.create_dataset("atomic_numbers", data=m["z"], dtype=np.int16)
            for key, data, dtype, units in (
                ("conformations", m["conformations"], np.float32, "bohr"),
                ("dft_total_energy", m["energy"], np.float64, "hartree"),
                ("dft_total_gradient", m["gradient"], np.float32, "hartree/bohr"),
                ("formation_energy", m["formation"], np.float64, "hartree"),
            ):
                g.create_dataset(key, data=data, dtype=dtype).attrs["units"] = units
    return dest


def _frames(molecules: list[dict]) -> tuple[str, int]:
    lines, count = [], 0
    for m in molecules:
        symbols = [SYMBOLS[int(z)] for z in m["z"]]
        for pos_bohr, e_ha, grad in zip(
            m["conformations"], m["energy"], m["gradient"], strict=True
        ):
            pos = pos_bohr.astype(np.float64) * BOHR_ANGSTROM
            forces = -grad.astype(np.float64) * (HARTREE_EV / BOHR_ANGSTROM)
            lines.append(f"{len(symbols)}")
            lines.append(
                "Properties=species:S:1:pos:R:3:REF_forces:R:3 "
                f"REF_energy={e_ha * HARTREE_EV:.8f} config_type=PubChem total_charge=0 "
                f'smiles="{m["smiles"]}" pbc="F F F"'
            )
            for s, x, f in zip(symbols, pos, forces, strict=True):
                lines.append(
                    f"{s:<2} {x[0]:15.8f} {x[1]:15.8f} {x[2]:15.8f} "
                    f"{f[0]:15.8f} {f[1]:15.8f} {f[2]:15.8f}"
                )
            count += 1
    return "\n".join(lines) + "\n", count


def write_maceoff(labelled: Path, dest_dir: Path, n_test_molecules: int = 2) -> dict[str, int]:
    """The two MACE-OFF23 files in ``dest_dir``; returns frames per file name."""
    mols = _molecules(labelled)
    parts = {"train": mols[:-n_test_molecules], "test": mols[-n_test_molecules:]}
    frames = {}
    for split, name in MACEOFF_FILES.items():
        text, n = _frames(parts[split])
        (dest_dir / name).write_text(text)
        frames[name] = n
    return frames


def expected(path: Path, frames: int | None = None) -> dict:
    """A ``download.expected`` entry pinning ``path`` (size, md5, and frames where known)."""
    body = path.read_bytes()
    out = {"size": len(body), "md5": hashlib.md5(body).hexdigest()}
    if frames is not None:
        out["frames"] = frames
    return out


def build_releases(root: Path) -> dict[str, dict[str, dict]]:
    """Every miniature release under ``root/<source>/``: source -> file name -> expected pin."""
    labelled = build_labelled(root / "labelled")
    releases: dict[str, dict[str, dict]] = {}
    for version in SUBSETS:
        d = root / f"spice-{version}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"SPICE-{version}.hdf5"
        path = write_spice_hdf5(labelled, d / name, version)
        n = sum(len(m["energy"]) for m in _molecules(labelled))
        releases[f"spice-{version}"] = {name: expected(path, n)}
    d = root / "maceoff23"
    d.mkdir(parents=True, exist_ok=True)
    frames = write_maceoff(labelled, d)
    releases["maceoff23"] = {name: expected(d / name, n) for name, n in frames.items()}
    return releases
