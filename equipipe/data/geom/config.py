"""GEOM's sources, the trust pins and the options a step reads, checked (defaults: the schema's).

Sources (``SOURCES``): ``geom-rdkit`` (alias ``remote``), ``rdkit_folder.tar.gz`` from Harvard
Dataverse (``summary_drugs.json`` + one RDKit pickle per molecule); ``midi``, MiDi's processed
split ``{train,val,test}_data.pickle`` (list of ``(smiles, [RDKit Mol])``) from the mirror in
DATA.md, which publishes no checksum; ``embedded``, the archive :mod:`equipipe.data.geom.build`
writes in the ``rdkit_folder`` layout with a sha256 manifest.
"""

from __future__ import annotations

import hashlib
from typing import Any

from equipipe.config import dataset_defaults

GEOM_DOI = "10.7910/DVN/JNGTDF"
RDKIT_FOLDER_ID = 4327252
ARCHIVE = "rdkit_folder.tar.gz"
ARCHIVE_SOURCE_JSON = ARCHIVE + ".source.json"  # what the API published, written at download
MANIFEST = "rdkit_folder.manifest.json"  # embedded build: sha256 of every member
MIDI_URL = "https://bits.csb.pitt.edu/files/geom_raw/"
MIDI_SPLITS = ("train", "val", "test")


SOURCES: dict[str, dict[str, Any]] = {
    "geom-rdkit": {
        "kind": "dataverse",
        "doi": GEOM_DOI,
        "file_id": RDKIT_FOLDER_ID,
        "files": {ARCHIVE: {}},  # size and md5 from the Dataverse API at download time
        "format": "rdkit_folder",
    },
    "midi": {
        "kind": "url",
        "base": MIDI_URL,
        "files": {f"{s}_data.pickle": {"split": s} for s in MIDI_SPLITS},
        "checksum": None,  # none published: pin with midi_sha256 or opt in explicitly
        "format": "midi_pickles",
    },
    "embedded": {
        "kind": "embedded",
        "files": {ARCHIVE: {}, MANIFEST: {}},
        "format": "rdkit_folder",
    },
}

DEFAULTS: dict[str, Any] = {"source": "embedded", **dataset_defaults("geom")}  # the schema's

CONFORMER_ORDERS = ("first", "lowest_energy")


SOURCE_ALIASES = {"remote": "geom-rdkit"}


def resolve_config(cfg: dict | None) -> dict[str, Any]:
    """DEFAULTS updated with ``cfg`` and checked; ``download.expected`` folded into the trust pins."""
    cfg = {**DEFAULTS, **(cfg or {})}
    cfg["source"] = SOURCE_ALIASES.get(cfg["source"], cfg["source"])
    if cfg["source"] not in SOURCES:
        raise ValueError(
            f"geom config key 'source' is {cfg['source']!r}; allowed values: {sorted(SOURCES)}"
        )
    if cfg["conformer_order"] not in CONFORMER_ORDERS:
        raise ValueError(
            f"geom config key 'conformer_order' is {cfg['conformer_order']!r}; allowed values: "
            f"{list(CONFORMER_ORDERS)}"
        )
    if int(cfg["conformers_per_molecule"]) < 1:
        raise ValueError("geom config key 'conformers_per_molecule' must be >= 1")
    if (
        float(cfg["radius_margin"]) < 0
        or float(cfg["grid_spacing"]) <= 0
        or int(cfg["grid_size"]) < 2
    ):
        raise ValueError("geom config keys grid_size >= 2, grid_spacing > 0, radius_margin >= 0")
    unknown = sorted(set(cfg["midi_sha256"] or {}) - set(MIDI_SPLITS))
    if unknown:
        raise ValueError(
            f"geom config key 'midi_sha256' has {unknown}; allowed keys: {list(MIDI_SPLITS)}"
        )
    _fold_expected(cfg)
    return cfg


PIN_KEYS = ("size", "md5", "sha256")
MIDI_FILES = {f"{s}_data.pickle": s for s in MIDI_SPLITS}


def _fold_expected(cfg: dict) -> None:
    """``download.expected`` ({file name: {size, md5, sha256}}) -> the trust pins, checked.

    ``rdkit_folder.tar.gz``'s md5 pins the archive (as ``rdkit_folder_md5``); a MiDi file's
    sha256 pins it (as ``midi_sha256[split]``); a pin given both ways must agree.
    """
    expected = cfg.get("expected") or {}
    allowed = [ARCHIVE, *MIDI_FILES]
    unknown = sorted(set(expected) - set(allowed))
    if unknown:
        raise ValueError(f"geom download.expected names {unknown}; allowed: {allowed}")
    for name, pin in expected.items():
        bad = sorted(set(pin or {}) - set(PIN_KEYS))
        if bad:
            raise ValueError(
                f"geom download.expected.{name} has unknown key(s) {bad}; allowed: {PIN_KEYS}"
            )
    md5 = (expected.get(ARCHIVE) or {}).get("md5")
    if md5:
        old = cfg.get("rdkit_folder_md5")
        if old and old.lower() != md5.lower():
            raise ValueError(
                f"geom: rdkit_folder_md5 {old} and download.expected.{ARCHIVE}.md5 {md5} differ"
            )
        cfg["rdkit_folder_md5"] = md5.lower()
    sha = dict(cfg.get("midi_sha256") or {})
    for name, split in MIDI_FILES.items():
        want = (expected.get(name) or {}).get("sha256")
        if want:
            if sha.get(split) and sha[split].lower() != want.lower():
                raise ValueError(
                    f"geom: midi_sha256.{split} and download.expected.{name}.sha256 differ"
                )
            sha[split] = want.lower()
    cfg["midi_sha256"] = sha


def size_pin(cfg: dict, name: str) -> int | None:
    """The size ``download.expected`` pins for file ``name``, or None."""
    size = ((cfg.get("expected") or {}).get(name) or {}).get("size")
    return int(size) if size is not None else None


def max_radius_allowed(cfg: dict) -> float:
    """Largest centroid distance (Å) an atom may have: (G-1)/2·Δ - radius_margin."""
    return (int(cfg["grid_size"]) - 1) / 2 * float(cfg["grid_spacing"]) - float(
        cfg["radius_margin"]
    )


def smiles_hash(smiles: str) -> str:
    """16 hex digits identifying a SMILES string (first part of every example id)."""
    return hashlib.sha1(smiles.encode()).hexdigest()[:16]


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
