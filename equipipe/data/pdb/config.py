"""PDB's sources and the options a step reads, checked (defaults: the schema's, see ``config/README.md``)."""

from __future__ import annotations

from typing import Any

from equipipe.config import dataset_defaults

SOURCES: dict[str, dict[str, Any]] = {
    "remote": {
        "seqres": "https://files.wwpdb.org/pub/pdb/derived_data/pdb_seqres.txt.gz",
        "resolu": "https://files.wwpdb.org/pub/pdb/derived_data/index/resolu.idx",
        "entry_type": "https://files.wwpdb.org/pub/pdb/derived_data/pdb_entry_type.txt",
        "structure": "https://files.rcsb.org/download/{id}.cif.gz",
        "mirror_layout": "mmCIF/<id[1:3]>/<id>.cif.gz (rsync of structures/divided/mmCIF)",
        "licence": "CC0 1.0 (wwPDB)",
    },
    "embedded": {
        "package": "mdanalysistests",
        "version": "2.11.0",
        "data_dir": "MDAnalysisTests/data",
        "install": "pip install --no-deps mdanalysistests==2.11.0",
    },
}

DEFAULTS: dict[str, Any] = dataset_defaults("pdb")  # the schema's

BACKENDS = ("gemmi", "biopython")
METHODS = ("diffraction", "EM", "NMR", "other")


def resolve_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """DEFAULTS updated with ``cfg`` and checked (errors name the key and allowed values)."""
    out = {**DEFAULTS, **(cfg or {})}
    if out["backend"] not in BACKENDS:
        raise ValueError(f"pdb config: backend={out['backend']!r} is unknown; allowed: {BACKENDS}")
    bad = [m for m in out["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"pdb config: methods {bad} unknown; allowed: {METHODS}")
    if not 0 <= int(out["min_length"]) < int(out["max_length"]):
        raise ValueError(
            f"pdb config: need 0 <= min_length < max_length, got {out['min_length']}, {out['max_length']}"
        )
    for key in ("concurrency", "retries", "workers", "threads"):
        if int(out[key]) < 1:
            raise ValueError(f"pdb config: {key} must be >= 1, got {out[key]}")
    if out["limit"] is not None and int(out["limit"]) < 1:
        raise ValueError(f"pdb config: limit must be null or >= 1, got {out['limit']}")
    return out
