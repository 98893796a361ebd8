"""The embedded SPICE build: ``SPICE-embedded-GFN2.hdf5``, real molecules with GFN2-xTB labels, in the exact SPICE HDF5 layout."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from equipipe.data.dataset_block import options
from equipipe.data.embedded import (
    BOHR_ANGSTROM,
    draw_until,
    embed_conformers,
    isolated_atom_energies,
    item_seed,
    mapped_smiles,
    seeded_rotations,
    smiles_pool,
    thermal_perturb,
    xtb_singlepoint,
)
from equipipe.data.spice.config import EMBEDDED_FILE, EMBEDDED_SUBSET, resolve_config

log = logging.getLogger(__name__)


def _build_molecule(task: dict) -> dict | str:
    """One molecule of the embedded set (runs in a worker); an error string on failure."""
    try:
        mol = embed_conformers(task["smiles"], task["n_confs"], task["embed_seed"], task["prune"])
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int16)
        base = [c.GetPositions() for c in mol.GetConformers()]
        rng = np.random.default_rng(task["perturb_seed"])
        rots = task["rotations"]
        m, n = task["n_confs"], len(z)
        conf = np.empty((m, n, 3), np.float32)
        grad = np.empty((m, n, 3), np.float32)
        energy = np.empty(m, np.float64)
        for i in range(m):
            # rigid molecules give fewer distinct conformers than asked: cycle through them,
            # each with its own thermal kick (SPICE also takes several MD snapshots per start)
            x = thermal_perturb(base[i % len(base)], rng, task["sigma"])
            x = (x - x.mean(0)) @ rots[i].T  # its own Haar rotation about the centroid
            conf[i] = (x / BOHR_ANGSTROM).astype(np.float32)
            # label the stored (rotated, float32-rounded) geometry itself, so the gradient is
            # in the same rotated frame and energy/positions are exactly consistent
            e, g = xtb_singlepoint(z, conf[i].astype(np.float64) * BOHR_ANGSTROM)
            energy[i], grad[i] = e, g
        return {
            "smiles": task["smiles"],
            "mapped_smiles": mapped_smiles(mol),
            "z": z,
            "conformations": conf,
            "energy": energy,
            "gradient": grad,
            "n_distinct": len(base),
        }
    except (ValueError, RuntimeError) as e:
        return f"{task['smiles']}: {e}"


def build_embedded(out_dir: Path, cfg: dict | None = None) -> None:
    """Write ``out_dir/SPICE-embedded-GFN2.hdf5``: real molecules, GFN2-xTB labels, SPICE layout.

    ``n_molecules`` molecules from :func:`smiles_pool` (seeded), ``conformers`` conformers each
    (ETKDGv3 -> MMFF94 -> thermal kick -> own Haar rotation about the centroid), labelled with
    GFN2-xTB at the stored geometry. Molecules that fail (embedding, MMFF, SCF) are replaced
    by the next ones of the seeded draw. Parallel over molecules (``workers`` processes); the
    file is identical for any worker count. Lands atomically (temporary name, then rename).
    """
    import h5py
    import rdkit

    cfg = resolve_config(options(cfg, "embedded"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, m, seed = int(cfg["n_molecules"]), int(cfg["conformers"]), int(cfg["seed"])
    if n < 1 or m < 1:
        raise ValueError(f"spice: n_molecules ({n}) and conformers ({m}) must be >= 1")
    elements = tuple(cfg["elements"])
    t0 = time.perf_counter()
    atom_e = isolated_atom_energies(elements)

    pairs, bad = draw_until(
        n,
        lambda count: smiles_pool(count, seed, cfg["min_heavy"], cfg["max_heavy"], elements),
        lambda j, smi: {
            "index": j,
            "smiles": smi,
            "n_confs": m,
            "embed_seed": item_seed(seed, j, 0),
            "perturb_seed": item_seed(seed, j, 1),
            "rotations": seeded_rotations(m, item_seed(seed, j, 2)),
            "sigma": float(cfg["thermal_sigma"]),
            "prune": float(cfg["prune_rms"]),
        },
        _build_molecule,
        lambda r: not isinstance(r, str),
        int(cfg["workers"]),
        "SPICE embedded",
    )
    failed = [r for _, r in bad]
    for r in failed:
        log.warning("embedded SPICE: skipped %s", r)
    good = [(t["index"], {**r, "rotations": t["rotations"]}) for t, r in pairs]

    import importlib.metadata

    dest = out_dir / EMBEDDED_FILE
    tmp = out_dir / (EMBEDDED_FILE + ".partial")
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs["level_of_theory"] = "GFN2-xTB"
        f.attrs["subset"] = EMBEDDED_SUBSET
        f.attrs["generator"] = "equipipe.data.spice.build_embedded"
        f.attrs["molecule_source"] = "rdkit/Data/NCI/first_5K.smi"
        f.attrs["conformer_method"] = "RDKit ETKDGv3 -> MMFF94 -> Gaussian thermal displacement"
        f.attrs["thermal_sigma_angstrom"] = float(cfg["thermal_sigma"])
        f.attrs["prune_rms_angstrom"] = float(cfg["prune_rms"])
        f.attrs["seed"] = seed
        f.attrs["n_molecules"] = n
        f.attrs["conformers"] = m
        f.attrs["min_heavy"] = int(cfg["min_heavy"])
        f.attrs["max_heavy"] = int(cfg["max_heavy"])
        f.attrs["orientation"] = (
            "each conformer centred at its centroid and rotated by its own seeded Haar-random "
            "rotation R (x -> R x); labels computed at the stored rotated geometry, so the "
            "gradient is rotated the same way; per-group attrs 'haar_rotations' (M,3,3)"
        )
        f.attrs["rotation_seeds"] = (
            "equipipe.data.embedded.seeded_rotations(conformers, item_seed(seed, k, 2)) for "
            "the k-th molecule of the seeded draw (group attr 'draw_index')"
        )
        f.attrs["isolated_atom_energies_hartree"] = json.dumps(
            {str(z): e for z, e in sorted(atom_e.items())}
        )
        f.attrs["rdkit_version"] = rdkit.__version__
        f.attrs["tblite_version"] = importlib.metadata.version("tblite")
        f.attrs["n_failed"] = len(failed)
        f.attrs["failed"] = json.dumps(failed)
        string = h5py.string_dtype()
        for rank, (j, r) in enumerate(good):
            g = f.create_group(f"embedded-{rank:04d}")
            g.create_dataset("subset", data=[EMBEDDED_SUBSET], dtype=string)
            g.create_dataset("smiles", data=[r["mapped_smiles"]], dtype=string)
            g.create_dataset("atomic_numbers", data=r["z"], dtype=np.int16)
            ds = g.create_dataset("conformations", data=r["conformations"], dtype=np.float32)
            ds.attrs["units"] = "bohr"
            ref = sum(atom_e[int(z)] for z in r["z"])
            ds = g.create_dataset("formation_energy", data=r["energy"] - ref, dtype=np.float64)
            ds.attrs["units"] = "hartree"
            ds = g.create_dataset("dft_total_energy", data=r["energy"], dtype=np.float64)
            ds.attrs["units"] = "hartree"
            ds = g.create_dataset("dft_total_gradient", data=r["gradient"], dtype=np.float32)
            ds.attrs["units"] = "hartree/bohr"
            g.attrs["haar_rotations"] = r["rotations"]
            g.attrs["draw_index"] = j
            g.attrs["canonical_smiles"] = r["smiles"]
            g.attrs["n_distinct_conformers"] = r["n_distinct"]
    os.replace(tmp, dest)
    log.info(
        "embedded SPICE: %d molecules x %d conformers in %.1f s (%d skipped) -> %s",
        n,
        m,
        time.perf_counter() - t0,
        len(failed),
        dest,
    )
