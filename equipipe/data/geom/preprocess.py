"""Raw GEOM (``geom-rdkit``/``embedded`` archive or ``midi`` pickles) -> the store.

Store: per atom ``pos`` (float32 Å, centred on the conformer's centroid) and ``z`` (int8); per
example ``energy`` (GFN2-xTB total energy, hartree; NaN for ``midi``) and ``boltzmann_weight``
(NaN for ``midi``). Index: ``id`` = ``<smiles-hash>/<geom_id>`` (or ``c<position>`` in the
molecule's list where there is no geom_id), ``key`` = SMILES (molecule-level splits),
``n_atoms``, plus ``smiles_hash, conformer, geom_id, max_radius, source`` and, for ``midi``,
``midi_split``.

Quarantined with reasons, never dropped silently: elements outside ``elements``; the
max-radius rule (after centring every atom must lie within the grid's inscribed ball radius
(G-1)/2·Δ minus ``radius_margin``, so it stays inside the ball under ANY rotation plus the
training shift: a radius rule, not an atom count); missing or unreadable molecules;
non-finite coordinates; duplicate ids.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from equipipe.data.dataset_block import options
from equipipe.data.geom.config import MANIFEST, max_radius_allowed, resolve_config, smiles_hash
from equipipe.data.geom.read import (
    conformer_record,
    records_midi,
    records_rdkit_folder,
    select_conformers,
)
from equipipe.data.landing import read_provenance


def preprocess(raw_dir: Path, store_dir: Path, cfg: dict | None = None) -> None:
    """Raw GEOM (``geom-rdkit``/``embedded`` archive or ``midi`` pickles) -> store; see module doc.

    Keeps ``conformers_per_molecule`` conformers per molecule (``conformer_order``), centres
    each on its centroid, and quarantines (with a reason) elements outside ``elements``,
    conformers breaking the max-radius rule and unreadable records. Fails with no store if
    the quarantined fraction exceeds ``max_bad_fraction``, and before reading anything if a
    pickle cannot be verified (unless ``allow_unverified_pickles``).
    """
    from rdkit import Chem, RDLogger
    from tqdm.auto import tqdm

    from equipipe.store import StoreWriter

    # the download section carries the trust options (allow_unverified_pickles, midi_sha256)
    cfg = resolve_config(options(cfg, "download", "preprocess"))
    source = cfg["source"]
    raw_dir, store_dir = Path(raw_dir), Path(store_dir)
    if source == "midi" and cfg["conformer_order"] == "lowest_energy":
        raise ValueError(
            "geom: conformer_order 'lowest_energy' needs energies; the midi source "
            "has none - use 'first'"
        )
    table = Chem.GetPeriodicTable()
    vocab = {table.GetAtomicNumber(str(s)) for s in cfg["elements"]}
    limit = max_radius_allowed(cfg)
    if limit <= 0:
        raise ValueError(
            f"geom: grid {cfg['grid_size']} x {cfg['grid_spacing']} A minus "
            f"radius_margin {cfg['radius_margin']} A leaves no room for atoms"
        )
    n_keep = int(cfg["conformers_per_molecule"])
    attrs = {
        "dataset": "geom",
        "source": source,
        "units": {"pos": "angstrom", "energy": "hartree", "boltzmann_weight": "1"},
        "elements": list(cfg["elements"]),
        "grid_size": int(cfg["grid_size"]),
        "grid_spacing": float(cfg["grid_spacing"]),
        "radius_margin": float(cfg["radius_margin"]),
        "max_radius": limit,
        "conformers_per_molecule": n_keep,
        "conformer_order": cfg["conformer_order"],
        "centring": "centroid of all atoms (incl. H)",
    }
    attrs["download"] = read_provenance(raw_dir)
    if (raw_dir / MANIFEST).is_file():
        m = json.loads((raw_dir / MANIFEST).read_text())
        attrs["raw_format"] = m.get("format")
        attrs["raw_build_seconds"] = m.get("build_seconds")
    records = (
        records_midi(raw_dir, cfg)
        if source == "midi"
        else records_rdkit_folder(raw_dir, cfg, source)
    )
    writer = StoreWriter(
        store_dir,
        per_atom=["pos", "z"],
        per_example=["energy", "boltzmann_weight"],
        max_bad_fraction=float(cfg["max_bad_fraction"]),
        attrs=attrs,
    )
    seen: set[str] = set()
    RDLogger.DisableLog("rdApp.*")
    try:
        with writer:
            for rec in tqdm(records, desc=f"preprocess geom/{source}", unit="mol"):
                extra = {"source": source}
                if "midi_split" in rec:
                    extra["midi_split"] = rec["midi_split"]
                if "error" in rec:
                    writer.quarantine(rec["id"], rec["error"], key=rec["key"], **extra)
                    continue
                smiles, h = rec["smiles"], smiles_hash(rec["smiles"])
                for j, conf in select_conformers(rec["conformers"], n_keep, cfg["conformer_order"]):
                    if not isinstance(conf, dict) or conf.get("__rdkit_mol__"):
                        conf = {"rd_mol": conf}  # a bare molecule (arrays from the sandbox)
                    gid = conf.get("geom_id")
                    suffix = str(int(gid)) if isinstance(gid, int | np.integer) else f"c{j}"
                    rid = f"{h}/{suffix}"
                    if rid in seen:
                        writer.quarantine(
                            rid + f"#dup{j}", "duplicate example id", key=smiles, **extra
                        )
                        continue
                    seen.add(rid)
                    arrays, reason, radius = conformer_record(conf.get("rd_mol"), vocab, limit)
                    if reason:
                        writer.quarantine(rid, reason, key=smiles, **extra)
                        continue
                    energy = _float(conf.get("totalenergy"))
                    weight = _float(conf.get("boltzmannweight"))
                    arrays["energy"] = np.float64(energy)
                    arrays["boltzmann_weight"] = np.float64(weight)
                    writer.add(
                        rid,
                        smiles,
                        arrays,
                        smiles_hash=h,
                        conformer=j,
                        geom_id=int(gid) if isinstance(gid, int | np.integer) else -1,
                        max_radius=radius,
                        **extra,
                    )
    finally:
        RDLogger.EnableLog("rdApp.*")


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
