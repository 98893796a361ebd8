"""Raw SPICE (any source, one reader) -> the store: eV and Å, bad records quarantined with reasons.

The store holds ``pos`` (Å, float32), ``z`` (int64), ``forces`` (eV/Å, float32) per atom and
``energy`` (total energy, eV, float64) per conformer; index fields ``id, key, n_atoms, subset,
source``; the file attributes, the release pins and the download provenance in its metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equipipe.data.dataset_block import options
from equipipe.data.spice.config import SOURCES, elements_z, pins, resolve_config
from equipipe.data.spice.read import CorruptFileError, check_record, file_attrs, read_records


def _source_files(raw_dir: Path, source: str, pinned: dict) -> list[tuple[Path, str]]:
    spec = SOURCES[source]
    out, missing = [], []
    for name, facts in spec["files"].items():
        p = raw_dir / name
        if not p.is_file():
            missing.append(name)
            continue
        size = pinned[name]["size"]
        if size is not None and p.stat().st_size != size:
            raise CorruptFileError(
                f"{p} has {p.stat().st_size} bytes, {pinned[name]['pinned_by']} pins {size}: "
                "truncated or wrong file - delete it and download it again"
            )
        label = f"{source}/{facts['split']}" if "split" in facts else source
        out.append((p, label))
    if missing:
        have = sorted(x.name for x in raw_dir.iterdir()) if raw_dir.is_dir() else []
        raise FileNotFoundError(
            f"spice source {source!r}: {', '.join(missing)} not in {raw_dir} (it has: {have}); "
            f"run the download (or build_embedded) step for {source!r} first, or set 'source'"
        )
    return out


def preprocess(raw_dir: Path, store_dir: Path, cfg: dict | None = None) -> None:
    """Raw SPICE (any source, same reader) -> store in eV and Å; bad records quarantined.

    Quarantined (with a reason): missing HDF5 keys, shape mismatches, non-finite labels,
    elements outside ``elements``, |gradient| > ``max_gradient`` Ha/bohr, single-atom frames.
    Fails (no store) if the quarantined fraction exceeds ``max_bad_fraction`` or a raw file is
    truncated/corrupt.
    """
    from tqdm.auto import tqdm

    from equipipe.data.landing import read_provenance
    from equipipe.store import StoreWriter

    # the download section carries the release pins (download.expected)
    cfg = resolve_config(options(cfg, "download", "preprocess"))
    raw_dir, store_dir = Path(raw_dir), Path(store_dir)
    pinned = pins(cfg["source"], cfg)
    files = _source_files(raw_dir, cfg["source"], pinned)
    vocab = elements_z(cfg["elements"])
    limit = float(cfg["max_gradient"])
    multi = len(files) > 1
    attrs = {
        "dataset": "spice",
        "source": cfg["source"],
        "files": [p.name for p, _ in files],
        "units": {"pos": "angstrom", "energy": "eV", "forces": "eV/angstrom"},
        "energy": "total energy",
        "elements": list(cfg["elements"]),
        "max_gradient_hartree_per_bohr": limit,
        "release_pins": {p.name: pinned[p.name] for p, _ in files},
    }
    for p, _ in files:
        if p.suffix.lower() in (".hdf5", ".h5"):
            attrs.update(file_attrs(p))
    attrs["download"] = read_provenance(raw_dir)
    with StoreWriter(
        store_dir,
        per_atom=["pos", "z", "forces"],
        per_example=["energy"],
        max_bad_fraction=float(cfg["max_bad_fraction"]),
        attrs=attrs,
    ) as writer:
        for path, label in files:
            prefix = f"{label.rsplit('/', 1)[-1]}/" if multi else ""
            bar = tqdm(read_records(path, label), desc=f"preprocess {path.name}", unit="conf")
            frames = 0
            for rec in bar:
                frames += 1
                rid = prefix + rec["id"]
                fields = {"subset": rec["subset"], "source": rec["source"]}
                reason = check_record(rec, vocab, limit)
                if reason:
                    writer.quarantine(rid, reason, key=rec["key"], **fields)
                    continue
                arrays = {
                    "pos": rec["pos"].astype(np.float32, copy=False),
                    "z": rec["z"].astype(np.int64, copy=False),
                    "forces": rec["forces"].astype(np.float32, copy=False),
                    "energy": np.float64(rec["energy"]),
                }
                writer.add(rid, rec["key"], arrays, **fields)
            want = pinned[path.name]["frames"]
            if want is not None and frames != want:
                raise CorruptFileError(
                    f"{path} holds {frames} conformers/frames, {pinned[path.name]['pinned_by']} "
                    f"pins {want}: incomplete or wrong file - delete it and download it again"
                )
