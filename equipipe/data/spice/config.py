"""SPICE's sources (release facts and pins) and the options a step reads, checked.

Sources (``SOURCES``): ``spice-2.0.1`` / ``spice-1.1.4``, the release HDF5 from Zenodo;
``maceoff23``, the MACE-OFF23 train/test split of SPICE 1.1.4 as extended XYZ from the
Cambridge Apollo repository (no published checksum); ``embedded``, the GFN2-xTB file that
:mod:`equipipe.data.spice.build` writes in the SPICE HDF5 layout. Option defaults are the
schema's (``workflow/schemas/config.schema.yaml``, documented in ``config/README.md``).
"""

from __future__ import annotations

from typing import Any

from equipipe.config import dataset_defaults

EMBEDDED_FILE = "SPICE-embedded-GFN2.hdf5"
EMBEDDED_SUBSET = "SPICE-format embedded GFN2-xTB set (RDKit NCI first_5K molecules)"


SOURCES: dict[str, dict[str, Any]] = {
    "spice-2.0.1": {
        "kind": "zenodo",
        "record": 10975225,
        "doi": "10.5281/zenodo.10975225",
        "licence": "CC0",
        "format": "hdf5",
        "files": {
            "SPICE-2.0.1.hdf5": {"md5": "bfba2224b6540e1390a579569b475510", "size": 37_479_271_148}
        },
    },
    "spice-1.1.4": {
        "kind": "zenodo",
        "record": 8222043,
        "doi": "10.5281/zenodo.8222043",
        "licence": "CC0",
        "format": "hdf5",
        # size: read from the Zenodo API at download time (not pinned here).
        "files": {"SPICE-1.1.4.hdf5": {"md5": "f27d4c81da0e37d6547276bf6b4ae6a1", "size": None}},
    },
    "maceoff23": {
        "kind": "url",
        "doi": "10.17863/CAM.107498",
        "format": "extxyz",
        # The repository publishes no checksum; sizes are not pinned either (unknown here), so
        # the downloader checks only the Content-Length the server announces and the reader
        # refuses a truncated final frame.
        "checksum": None,
        "files": {
            "train_large_neut_no_bad_clean.xyz": {
                "bitstream": "b185b5ab-91cf-489a-9302-63bfac42824a",
                "size": None,
                "split": "train",
                "frames": 951_005,
            },
            "test_large_neut_all.xyz": {
                "bitstream": "cb8351dd-f09c-413f-921c-67a702a7f0c5",
                "size": None,
                "split": "test",
                "frames": 50_195,
            },
        },
    },
    "embedded": {"kind": "embedded", "format": "hdf5", "files": {EMBEDDED_FILE: {}}},
}

DEFAULTS: dict[str, Any] = {"source": "embedded", **dataset_defaults("spice")}  # the schema's


def resolve_config(cfg: dict | None) -> dict[str, Any]:
    """DEFAULTS updated with ``cfg``; ``source`` checked against ``SOURCES``."""
    cfg = {**DEFAULTS, **(cfg or {})}
    if cfg["source"] not in SOURCES:
        raise ValueError(
            f"spice config key 'source' is {cfg['source']!r}; allowed values: {sorted(SOURCES)}"
        )
    return cfg


PIN_KEYS = ("size", "md5", "sha256", "frames")


def pins(source: str, cfg: dict) -> dict[str, dict[str, Any]]:
    """File name -> release facts of ``source``, overridden by ``cfg['expected']``.

    Each entry holds ``size``, ``md5``, ``sha256`` and ``frames`` (None where unknown) and
    ``pinned_by``: ``"SOURCES"`` or ``"download.expected"``.
    """
    files = SOURCES[source]["files"]
    expected = cfg.get("expected") or {}
    unknown = sorted(set(expected) - set(files))
    if unknown:
        raise ValueError(
            f"spice download.expected names {unknown}, not files of source {source!r}; "
            f"allowed: {sorted(files)}"
        )
    out = {}
    for name, facts in files.items():
        override = expected.get(name) or {}
        bad = sorted(set(override) - set(PIN_KEYS))
        if bad:
            raise ValueError(
                f"spice download.expected.{name} has unknown key(s) {bad}; allowed: {PIN_KEYS}"
            )
        out[name] = {
            **{k: facts.get(k) for k in PIN_KEYS},
            **override,
            "pinned_by": "download.expected" if override else "SOURCES",
        }
    return out


def elements_z(symbols) -> set[int]:
    """Atomic numbers of element symbols (the vocabulary)."""
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    return {table.GetAtomicNumber(str(s)) for s in symbols}
