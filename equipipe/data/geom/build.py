"""The embedded GEOM build: ``rdkit_folder.tar.gz`` in the GEOM layout (real molecules, GFN2-xTB energies) and its sha256 manifest."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np

from equipipe.data.dataset_block import options
from equipipe.data.download import file_digest
from equipipe.data.geom.config import ARCHIVE, MANIFEST, resolve_config, sha256_hex, smiles_hash
from equipipe.data.landing import write_json

log = logging.getLogger(__name__)


HARTREE_KCAL = 627.509474  # kcal/mol per hartree
KB_KCAL = 0.0019872043  # Boltzmann constant, kcal/(mol K)


EMBEDDED_FORMAT = "equipipe GEOM-format embedded GFN2-xTB set (RDKit NCI first_5K molecules)"


def _boltzmann(energies_ha: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative energies (kcal/mol) and Boltzmann weights at ``temperature`` K."""
    rel = (energies_ha - energies_ha.min()) * HARTREE_KCAL
    w = np.exp(-rel / (KB_KCAL * temperature))
    return rel, w / w.sum()


def _embedded_molecule(task: dict) -> dict:
    """One molecule in the GEOM pickle layout (runs in a worker); {'error': ...} on failure."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    from equipipe.data.embedded import embed_conformers, seeded_rotations, xtb_singlepoint

    smiles = task["smiles"]
    try:
        mol = embed_conformers(smiles, task["n_confs"], task["embed_seed"], task["prune_rms"])
    except (ValueError, RuntimeError) as e:
        return {"smiles": smiles, "error": str(e)}
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    confs, failed = [], []
    rots = seeded_rotations(mol.GetNumConformers(), task["rotation_seed"])
    for j, conf in enumerate(mol.GetConformers()):
        x = conf.GetPositions()
        x = (x - x.mean(0)) @ rots[j].T  # its own Haar rotation about the centroid
        one = Chem.Mol(mol, confId=conf.GetId())
        c = one.GetConformer()
        for i, p in enumerate(x):
            c.SetAtomPosition(i, Point3D(*map(float, p)))
        # label the stored geometry itself (float64 as RDKit keeps it)
        try:
            energy, _ = xtb_singlepoint(numbers, one.GetConformer().GetPositions())
        except ValueError as e:
            failed.append(f"conformer {j}: {e}")
            continue
        confs.append({"rd_mol": one, "totalenergy": energy, "rotation": rots[j].tolist(), "j": j})
    if not confs:
        return {"smiles": smiles, "error": "; ".join(failed) or "no conformers"}
    e = np.array([c["totalenergy"] for c in confs])
    rel, w = _boltzmann(e, task["temperature"])
    conformers = [
        {
            "geom_id": task["index"] * 1000 + c["j"],
            "confnum": c["j"],
            "totalenergy": float(c["totalenergy"]),
            "relativeenergy": float(r),
            "boltzmannweight": float(b),
            "degeneracy": 1,
            "rd_mol": c["rd_mol"],
            "equipipe_rotation": c["rotation"],  # Haar rotation applied (x -> R x)
        }
        for c, r, b in zip(confs, rel, w)
    ]
    record = {
        "smiles": smiles,
        "charge": int(Chem.GetFormalCharge(mol)),
        "totalconfs": len(conformers),
        "uniqueconfs": len(conformers),
        "temperature": float(task["temperature"]),
        "lowestenergy": float(e.min()),
        "ensembleenergy": float((w * rel).sum()),  # Boltzmann-mean relative energy, kcal/mol
        "conformers": conformers,
    }
    return {
        "smiles": smiles,
        "pickle": pickle.dumps(record, protocol=4),
        "summary": {
            k: record[k]
            for k in (
                "charge",
                "totalconfs",
                "uniqueconfs",
                "temperature",
                "lowestenergy",
                "ensembleenergy",
            )
        },
        "failed": failed,
    }


def build_embedded(out_dir: Path, cfg: dict | None = None) -> None:
    """Write ``out_dir/rdkit_folder.tar.gz`` (GEOM layout) and its sha256 manifest.

    ``n_molecules`` molecules from :func:`equipipe.data.embedded.smiles_pool` (GEOM elements,
    seed ``seed`` — not SPICE's), ETKDGv3 with ``prune_rms`` RMS pruning -> MMFF94 -> each conformer
    centred and rotated by its own seeded Haar rotation (stored as ``equipipe_rotation``) ->
    GFN2-xTB single-point energy (hartree) -> relative energies (kcal/mol) and Boltzmann
    weights at ``temperature``. Molecules that fail are replaced by the next ones of the seeded
    draw. The archive (``rdkit_folder/summary_drugs.json``, ``rdkit_folder/drugs/<hash>.pickle``)
    is byte-reproducible; ``rdkit_folder.manifest.json`` pins the sha256 of every member and
    of the archive, and records the build time.
    """
    from equipipe.data.embedded import GEOM_ELEMENTS, draw_until, item_seed, smiles_pool

    cfg = resolve_config(options(cfg, "embedded"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, seed = int(cfg["n_molecules"]), int(cfg["seed"])
    if n < 1 or int(cfg["conformers"]) < 1:
        raise ValueError(
            f"geom: n_molecules ({n}) and conformers ({cfg['conformers']}) must be >= 1"
        )
    t0 = time.perf_counter()
    pairs, bad = draw_until(
        n,
        lambda m: smiles_pool(m, seed, cfg["min_heavy"], cfg["max_heavy"], GEOM_ELEMENTS),
        lambda j, smi: {
            "index": j,
            "smiles": smi,
            "n_confs": int(cfg["conformers"]),
            "embed_seed": item_seed(seed, j, 0),
            "rotation_seed": item_seed(seed, j, 1),
            "prune_rms": float(cfg["prune_rms"]),
            "temperature": float(cfg["temperature"]),
        },
        _embedded_molecule,
        lambda r: "error" not in r,
        int(cfg["workers"]),
        "GEOM embedded",
    )
    failed = [f"{r['smiles']}: {r['error']}" for _, r in bad]
    for line in failed:
        log.warning("embedded GEOM: skipped %s", line)
    good = [r for _, r in pairs]
    failed += [f"{r['smiles']}: {f}" for r in good for f in r["failed"]]

    members: dict[str, bytes] = {}
    summary: dict[str, dict] = {}
    for r in good:
        rel = f"drugs/{smiles_hash(r['smiles'])}.pickle"
        members[f"rdkit_folder/{rel}"] = r["pickle"]
        summary[r["smiles"]] = {**r["summary"], "pickle_path": rel}
    members["rdkit_folder/summary_drugs.json"] = json.dumps(
        summary, indent=1, sort_keys=True
    ).encode()

    tmp = out_dir / (ARCHIVE + ".partial")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(members):
                info = tarfile.TarInfo(name)
                info.size = len(members[name])
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(members[name]))
    import importlib.metadata

    import rdkit

    manifest = {
        "format": EMBEDDED_FORMAT,
        "archive": ARCHIVE,
        "archive_sha256": file_digest(tmp, "sha256"),
        "members": {name: sha256_hex(data) for name, data in sorted(members.items())},
        "n_molecules": len(good),
        "n_conformers": sum(v["totalconfs"] for v in summary.values()),
        "seed": seed,
        "config": {
            k: cfg[k]
            for k in (
                "n_molecules",
                "conformers",
                "min_heavy",
                "max_heavy",
                "prune_rms",
                "temperature",
            )
        },
        "method": "RDKit ETKDGv3 (prune RMS) -> MMFF94 -> per-conformer seeded Haar rotation -> "
        "GFN2-xTB single point (tblite); Boltzmann weights from relative GFN2 energies",
        "rotation_seeds": "equipipe.data.embedded.seeded_rotations(n_conformers, item_seed(seed, k, 1)) "
        "for the k-th molecule of the draw (geom_id // 1000); applied x -> R x about the centroid",
        "rdkit_version": rdkit.__version__,
        "tblite_version": importlib.metadata.version("tblite"),
        "failed": failed,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "workers": int(cfg["workers"]),
    }
    os.replace(tmp, out_dir / ARCHIVE)
    write_json(out_dir / MANIFEST, manifest)
    log.info(
        "embedded GEOM: %d molecules, %d conformers in %.1f s (%d failures) -> %s",
        manifest["n_molecules"],
        manifest["n_conformers"],
        manifest["build_seconds"],
        len(failed),
        out_dir,
    )
