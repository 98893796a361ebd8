"""SPICE force-field data: download, embedded GFN2 build, one reader, preprocessing to a store.

Sources (``SOURCES``):

- ``spice-2.0.1`` / ``spice-1.1.4``: the release HDF5 from Zenodo (size and md5 read from the
  record's API, pinned md5 cross-checked).
- ``maceoff23``: the MACE-OFF23 train/test split of SPICE 1.1.4 as extended XYZ from the
  Cambridge Apollo repository (no published checksum: verified by size where known, and the
  reader refuses a truncated last frame).
- ``embedded``: ``SPICE-embedded-GFN2.hdf5`` built offline by :func:`build_embedded` in the
  exact SPICE HDF5 layout (real molecules, GFN2-xTB labels).

Every source ends in the same :func:`read_records` and :func:`preprocess`. Gradients are read
as (M, N, 3) or flat (M, 3N); (M, 3, N) is quarantined with its reason (a reshape would
scramble the forces); with N = 3 the two cannot be told apart and (M, 3, 3) is read as
(M, N, 3), the layout the releases document. HDF5 external links, virtual datasets and external
storage are refused (they would read other files of the machine into the store). The store holds
``pos`` (Å, float32), ``z`` (int64), ``forces`` (eV/Å, float32) per atom and ``energy`` (total
energy, eV, float64) per conformer; index fields ``id, key, n_atoms, subset, source``.

Config keys (``DEFAULTS``):

- ``source``: one of ``SOURCES`` (default ``embedded``).
- ``download_dir``: an existing folder already holding the source file(s); used instead of
  downloading when every file verifies (linked, not copied). Default None.
- ``zenodo_api`` / ``apollo_base``: repository endpoints (overridable for mirrors and tests).
- ``expected``: ``{file name: {size, md5, sha256, frames}}`` pins that override the release
  facts in ``SOURCES`` (a new release, a mirror's miniature copy); recorded in the store.
- ``n_molecules`` (120), ``conformers`` (8), ``seed`` (0), ``workers`` (2), ``min_heavy`` (8),
  ``max_heavy`` (40), ``thermal_sigma`` (0.03 Å), ``prune_rms`` (0.5 Å): the embedded build.
- ``elements``: the element vocabulary (symbols); others are quarantined.
- ``max_gradient``: largest allowed |gradient component| in hartree/bohr (1.0, the release's
  own cut); larger conformers are quarantined.
- ``max_bad_fraction``: the preprocessing job fails above this quarantined fraction (0.05).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equipipe.config import dataset_defaults
from equipipe.data.dataset_block import options
from equipipe.data.embedded import (
    BOHR_ANGSTROM,
    HARTREE_EV,
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
from equipipe.errors import ActionableError

log = logging.getLogger(__name__)

EMBEDDED_FILE = "SPICE-embedded-GFN2.hdf5"
EMBEDDED_SUBSET = "SPICE-format embedded GFN2-xTB set (RDKit NCI first_5K molecules)"
APOLLO_BASE = "https://www.repository.cam.ac.uk/bitstreams"

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

REQUIRED_KEYS = ("atomic_numbers", "conformations", "dft_total_energy", "dft_total_gradient")
FORCE_UNIT = HARTREE_EV / BOHR_ANGSTROM  # 1 hartree/bohr in eV/Å
_WANTED = frozenset((*REQUIRED_KEYS, "subset", "smiles"))


class CorruptFileError(ActionableError):
    """A raw file is truncated or unreadable; it must be downloaded again, never preprocessed."""

    advice = "delete the file and download (or build) it again"


def _config(cfg: dict | None) -> dict[str, Any]:
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


def _z_of(symbols) -> set[int]:
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    return {table.GetAtomicNumber(str(s)) for s in symbols}


# ----------------------------------------------------------------------------- download


def download(source: str, out_dir: Path, cfg: dict | None = None) -> None:
    """Fetch ``source``'s file(s) into ``out_dir`` through :mod:`equipipe.data.download`.

    Zenodo sources: size and md5 from the record's API (the md5 must equal the pinned one),
    then a resumable, verified download. ``maceoff23``: the two extended-XYZ bitstreams.
    ``embedded`` builds the file instead (:func:`build_embedded`). With ``cfg['download_dir']``
    set, a file there that verifies is linked into ``out_dir`` and nothing is downloaded.
    """
    from equipipe.data import landing
    from equipipe.data.download import DownloadError, zenodo_file

    cfg = _config({**options(cfg, "download"), "source": source})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = SOURCES[source]
    if spec["kind"] == "embedded":
        build_embedded(out_dir, cfg)
        return
    counter = count_extxyz_frames if spec["format"] == "extxyz" else None
    landed = {}
    for name, facts in pins(source, cfg).items():
        exp = landing.Expected(
            **{k: facts[k].lower() if isinstance(facts[k], str) else facts[k] for k in PIN_KEYS},
            origin={k: facts["pinned_by"] for k in PIN_KEYS if facts[k] is not None},
        )
        if cfg.get("download_dir"):
            rec = landing.land_local_copy(
                Path(cfg["download_dir"]) / name, out_dir, name, exp, cfg, count_frames=counter
            )
            if rec is not None:
                landed[name] = rec
                continue
        if spec["kind"] == "zenodo":
            remote = zenodo_file(spec["record"], name, api=cfg["zenodo_api"])
            if exp.md5 and remote.md5 and remote.md5 != exp.md5:
                raise DownloadError(
                    f"Zenodo record {spec['record']} lists md5 {remote.md5} for {name}, but "
                    f"{facts['pinned_by']} pins {exp.md5}: the record changed; check it and "
                    "update the pin (download.expected, or SOURCES in equipipe/data/spice.py)",
                    url=remote.url,
                )
            if exp.size and remote.size and remote.size != exp.size:
                raise DownloadError(
                    f"Zenodo lists {remote.size} bytes for {name}, {facts['pinned_by']} pins "
                    f"{exp.size}",
                    url=remote.url,
                )
            for key in ("md5", "size"):
                if getattr(exp, key) is None and getattr(remote, key) is not None:
                    setattr(exp, key, getattr(remote, key))
                    exp.origin[key] = "Zenodo API"
            url = remote.url
        else:
            url = f"{cfg['apollo_base'].rstrip('/')}/{spec['files'][name]['bitstream']}/download"
        landed[name] = landing.fetch_and_land(url, out_dir, name, exp, cfg, count_frames=counter)
    landing.write_provenance(out_dir, source, landed)


# ----------------------------------------------------------------------------- embedded build


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

    cfg = _config(options(cfg, "embedded"))
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


# ----------------------------------------------------------------------------- reading


def _bad(ids: list[str], key: str, reason: str, subset: str, source: str) -> Iterator[dict]:
    for id_ in ids:
        yield {"id": id_, "key": key, "subset": subset, "source": source, "error": reason}


def _str0(ds) -> str:
    v = ds[()]
    v = v[0] if np.ndim(v) else v
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_hdf5(path: Path, source: str) -> Iterator[dict]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CorruptFileError(
            f"{path} is not a readable HDF5 file ({e}); it is truncated or corrupt - delete it "
            "and download (or build) it again"
        ) from e
    with f:
        try:
            names = list(f.keys())
        except (OSError, RuntimeError) as e:
            raise CorruptFileError(f"{path}: cannot list groups ({e}); file is corrupt") from e
        for name in names:
            try:
                yield from _read_group(f, name, source)
            except (OSError, RuntimeError) as e:
                raise CorruptFileError(
                    f"{path}: reading group {name!r} failed ({e}); the file is truncated or "
                    "corrupt - delete it and download (or build) it again"
                ) from e


def _read_group(f, name: str, source: str) -> Iterator[dict]:
    import h5py

    foreign = _foreign_link(f, name)
    if foreign:
        yield from _bad([f"{name}/*"], name, foreign, "", source)
        return
    g = f[name]
    if not isinstance(g, h5py.Group):
        yield from _bad([f"{name}/*"], name, "top-level object is not a group", "", source)
        return
    # one lookup per member: h5py's per-access overhead dominates on small groups
    wanted = [k for k in g.keys() if k in _WANTED]
    foreign = next((r for r in (_foreign_link(g, k) for k in wanted) if r), None)
    ds = {} if foreign else {k: g[k] for k in wanted}
    foreign = foreign or next((r for r in map(_foreign_data, ds.values()) if r), None)
    if foreign:
        yield from _bad([f"{name}/*"], name, foreign, "", source)
        return
    subset = _str0(ds["subset"]) if "subset" in ds else ""
    smiles = _str0(ds["smiles"]) if "smiles" in ds else ""
    m = None
    if "conformations" in ds and ds["conformations"].ndim >= 1:
        m = ds["conformations"].shape[0]
    elif "dft_total_energy" in ds:
        m = int(np.prod(ds["dft_total_energy"].shape))
    ids = [f"{name}/{i}" for i in range(m)] if m else [f"{name}/*"]
    missing = [k for k in REQUIRED_KEYS if k not in ds]
    if missing:
        yield from _bad(ids, name, f"missing HDF5 key(s): {', '.join(missing)}", subset, source)
        return
    try:
        z = np.asarray(ds["atomic_numbers"][()]).astype(np.int64).reshape(-1)
        conf = np.asarray(ds["conformations"][()], dtype=np.float64)
        energy = np.asarray(ds["dft_total_energy"][()], dtype=np.float64).reshape(-1)
        grad = np.asarray(ds["dft_total_gradient"][()], dtype=np.float64)
    except (ValueError, TypeError) as e:  # e.g. strings where numbers belong
        yield from _bad(ids, name, f"unreadable dataset values: {e}", subset, source)
        return
    n = len(z)
    if conf.ndim != 3 or conf.shape[1:] != (n, 3):
        reason = f"shape mismatch: conformations {conf.shape} vs {n} atomic_numbers"
        yield from _bad(ids, name, reason, subset, source)
        return
    reason = _gradient_layout_problem(grad.shape, m, n)
    if len(energy) != m:
        reason = f"shape mismatch: {m} conformations, dft_total_energy {energy.shape}"
    if reason:
        yield from _bad(ids, name, reason, subset, source)
        return
    # whole-group unit conversion (float64 maths, float32 results = the store's dtypes)
    pos = (conf * BOHR_ANGSTROM).astype(np.float32)
    forces = (grad.reshape(m, n, 3) * -FORCE_UNIT).astype(np.float32)
    energy = energy * HARTREE_EV
    for i in range(m):
        yield {
            "id": ids[i],
            "key": name,
            "z": z,
            "pos": pos[i],
            "energy": float(energy[i]),
            "forces": forces[i],
            "subset": subset,
            "source": source,
            "smiles": smiles,
            "error": None,
        }


def _foreign_link(group, name: str) -> str | None:
    """Why member ``name`` must not be followed: an external link (another file); else None.

    Soft and hard links stay inside the file and are fine. Nothing is opened here.
    """
    import h5py

    if group.id.links.get_info(name.encode()).type != h5py.h5l.TYPE_EXTERNAL:
        return None  # cheap check first: no Python link object per member
    link = group.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        return (
            f"HDF5 external link {name!r} -> {link.filename}:{link.path} refused: a release "
            "file never reads other files"
        )
    return None


def _foreign_data(ds) -> str | None:
    """Why a dataset must not be read: virtual (maps other files) or external raw storage."""
    import h5py

    if not isinstance(ds, h5py.Dataset):
        return None
    plist = ds.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return f"HDF5 virtual dataset {ds.name!r} refused: it maps data of other files"
    if plist.get_external_count() > 0:
        return f"HDF5 dataset {ds.name!r} with external raw storage refused: it reads other files"
    return None


def _gradient_layout_problem(shape: tuple[int, ...], m: int, n: int) -> str | None:
    """Why a ``dft_total_gradient`` of ``shape`` cannot be read as (M, N, 3); None if it can.

    Accepted: (M, N, 3), the releases' layout, and the flat (M, 3N) of some releases (atom-major:
    x, y, z of atom 0, then atom 1, ...). Refused: (M, 3, N), components first, which has the
    right number of values but whose reshape would scramble the forces; and anything else.
    With N == 3 the two layouts cannot be told apart by shape: (M, 3, 3) is read as (M, N, 3),
    the layout every SPICE release documents.
    """
    if shape == (m, n, 3) or shape == (m, 3 * n):
        return None
    if shape == (m, 3, n):
        return (
            f"dft_total_gradient stored as (M, 3, N) = {shape} (components first) instead of "
            f"(M, N, 3) = {(m, n, 3)}: refusing it, a reshape would scramble the forces"
        )
    return (
        f"shape mismatch: {m} conformations of {n} atoms, dft_total_gradient {shape} "
        f"(accepted: (M, N, 3) = {(m, n, 3)} or flat (M, 3N) = {(m, 3 * n)})"
    )


_KV = re.compile(r"""([A-Za-z_][\w.:-]*)\s*(?:=\s*("[^"]*"|'[^']*'|\{[^}]*\}|\S+))?""")
ENERGY_KEYS = ("REF_energy", "energy", "DFT_energy", "dft_energy", "Energy")
FORCE_KEYS = ("REF_forces", "forces", "DFT_forces", "dft_forces")


def parse_extxyz_comment(line: str) -> dict[str, str]:
    """``key=value`` pairs of an extended-XYZ comment line (quotes stripped; bare keys -> 'T')."""
    out = {}
    for mt in _KV.finditer(line):
        val = mt.group(2)
        if val is None:
            val = "T"
        elif val[:1] in "\"'{":
            val = val[1:-1]
        out[mt.group(1)] = val
    return out


@functools.lru_cache(maxsize=64)
def _properties(spec: str) -> tuple[dict[str, tuple[str, slice]], int]:
    """``Properties=`` spec -> ({name: (type, column slice)}, total columns)."""
    parts = spec.split(":")
    if len(parts) % 3:
        raise ValueError(f"malformed Properties={spec!r}")
    cols, col = {}, 0
    for i in range(0, len(parts), 3):
        name, kind, width = parts[i], parts[i + 1], int(parts[i + 2])
        cols[name] = (kind, slice(col, col + width))
        col += width
    return cols, col


def _column(tokens: list[str], props: dict, ncols: int, name: str, dtype) -> np.ndarray:
    """Property ``name`` of a frame's row-major token list as an (n_atoms, width) array."""
    cols = props[name][1]
    data = [tokens[c::ncols] for c in range(cols.start, cols.stop)]
    return np.array(data, dtype=dtype).T.copy()


def _formula(symbols: list[str]) -> str:
    counts: dict[str, int] = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    order = [s for s in ("C", "H") if s in counts] + sorted(s for s in counts if s not in "CH")
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order)


def _read_extxyz(path: Path, source: str) -> Iterator[dict]:
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    znum: dict[str, int] = {}
    counter: dict[str, int] = {}
    lineno = 0
    size = path.stat().st_size
    with open(path) as fh:
        while True:
            head = fh.readline()
            lineno += 1
            if not head:
                return
            if not head.strip():
                continue
            try:
                natoms = int(head.split()[0])
            except ValueError:
                raise CorruptFileError(
                    f"{path}:{lineno}: expected an atom count, got {head.strip()[:60]!r}; "
                    "the file is corrupt"
                ) from None
            if natoms < 0 or 2 * natoms > size:  # an atom line has at least 2 bytes
                raise CorruptFileError(
                    f"{path}:{lineno}: the frame announces {natoms} atoms, more than the "
                    f"{size}-byte file can hold; the file is corrupt"
                )
            comment = fh.readline()
            lines = []
            for _ in range(natoms):  # stops at the end of the file: nothing allocated past it
                line = fh.readline()
                if not line:
                    break
                lines.append(line)
            if not comment.endswith("\n") or (
                natoms and (len(lines) < natoms or not lines[-1].endswith("\n"))
            ):
                raise CorruptFileError(
                    f"{path}: frame at line {lineno} ({natoms} atoms) ends early; the file is "
                    "truncated - delete it and download it again"
                )
            frame_line = lineno
            lineno += 1 + natoms
            info = parse_extxyz_comment(comment)
            try:
                props, ncols = _properties(info.get("Properties", "species:S:1:pos:R:3"))
                tokens = "".join(lines).split()
                if len(tokens) != natoms * ncols:
                    raise ValueError(f"{len(tokens)} values for {natoms} atoms x {ncols} columns")

                if "species" in props:
                    symbols = tokens[props["species"][1].start :: ncols]
                    for s in symbols:
                        if s not in znum:
                            znum[s] = table.GetAtomicNumber(s)
                    z = np.array([znum[s] for s in symbols], dtype=np.int64)
                elif "Z" in props:
                    z = _column(tokens, props, ncols, "Z", np.int64).ravel()
                    symbols = [table.GetElementSymbol(int(v)) for v in z]
                else:
                    raise ValueError("no species or Z column in Properties")
                pos = _column(tokens, props, ncols, "pos", np.float64)
                fkey = next((k for k in FORCE_KEYS if k in props), None)
                forces = _column(tokens, props, ncols, fkey, np.float64) if fkey else None
            except (ValueError, KeyError, RuntimeError) as e:
                raise CorruptFileError(
                    f"{path}:{frame_line}: malformed frame ({e}); the file is corrupt"
                ) from e
            key = info.get("smiles") or _formula(symbols)
            i = counter.get(key, 0)
            counter[key] = i + 1
            rec = {
                "id": f"{key}/{i}",
                "key": key,
                "z": z,
                "pos": pos,
                "subset": info.get("config_type", ""),
                "source": source,
                "smiles": info.get("smiles", ""),
                "error": None,
            }
            ekey = next((k for k in ENERGY_KEYS if k in info), None)
            try:
                rec["energy"] = float(info[ekey]) if ekey else None
            except ValueError:
                rec["error"] = f"unparseable energy {info[ekey]!r}"
            if ekey is None:
                rec["error"] = f"no energy key (looked for {', '.join(ENERGY_KEYS)})"
            elif forces is None:
                rec["error"] = f"no forces column (looked for {', '.join(FORCE_KEYS)})"
            elif natoms == 1:
                rec["error"] = "single-atom frame (isolated-atom reference), not a molecule"
            rec["forces"] = forces
            yield rec


def count_extxyz_frames(path: str | os.PathLike) -> int:
    """Number of complete frames of an extended-XYZ file; CorruptFileError if one is cut short.

    Reads line by line (no frame is held in memory); an atom count larger than the bytes left
    in the file is refused at once.
    """
    path = Path(path)
    left = path.stat().st_size
    n = 0
    with open(path, "rb") as fh:
        for head in fh:
            left -= len(head)
            if not head.strip():
                continue
            try:
                natoms = int(head.split()[0])
            except ValueError:
                raise CorruptFileError(
                    f"{path}: frame {n + 1}: expected an atom count, got {head[:60]!r}"
                ) from None
            if natoms < 0 or 2 * natoms > left:
                raise CorruptFileError(
                    f"{path}: frame {n + 1} announces {natoms} atoms but only {left} bytes are "
                    "left in the file; the file is truncated or corrupt"
                )
            for _ in range(natoms + 1):
                line = fh.readline()
                left -= len(line)
                if not line.endswith(b"\n"):
                    raise CorruptFileError(
                        f"{path}: frame {n + 1} ({natoms} atoms) ends early; the file is truncated"
                    )
            n += 1
    return n


def read_records(path: str | os.PathLike, source: str | None = None) -> Iterator[dict]:
    """Records of a SPICE HDF5 (any release, the embedded file included) or MACE-OFF extxyz.

    Each record: ``id`` (``<group>/<conformer index>``), ``key`` (HDF5 group, or the extxyz
    ``smiles`` / formula), ``z`` (N,) int64, ``pos`` (N,3) Å, ``energy`` total in eV,
    ``forces`` (N,3) eV/Å, ``subset``, ``source``, ``smiles``, and ``error``: None, or why the
    record cannot be used (missing keys, shape mismatch, ...; arrays may then be absent).
    Label checks (finite values, vocabulary, gradient limit) are :func:`check_record`'s job.

    Raises:
        CorruptFileError: the file is truncated or unreadable (never a partial result).
    """
    path = Path(path)
    source = source or path.name
    if path.suffix.lower() in (".hdf5", ".h5"):
        return _read_hdf5(path, source)
    if path.suffix.lower() in (".xyz", ".extxyz"):
        return _read_extxyz(path, source)
    raise ValueError(f"{path}: unknown SPICE file type (expected .hdf5/.h5 or .xyz/.extxyz)")


def check_record(rec: dict, vocabulary: set[int], max_gradient: float) -> str | None:
    """Why a record must be quarantined, or None. ``max_gradient`` in hartree/bohr."""
    if rec.get("error"):
        return rec["error"]
    z, pos, forces, energy = rec["z"], rec["pos"], rec["forces"], rec["energy"]
    if pos.shape != (len(z), 3) or forces.shape != (len(z), 3):
        return f"shape mismatch: {len(z)} atoms, pos {pos.shape}, forces {forces.shape}"
    try:
        in_vocab = bool(_allowed_table(frozenset(vocabulary))[z].all())
    except IndexError:  # Z < -256 or > 255
        in_vocab = False
    if not in_vocab:
        outside = sorted({int(v) for v in z} - vocabulary)
        return f"elements outside the vocabulary: Z={outside}"
    if energy is None or not math.isfinite(energy):
        return f"non-finite energy ({energy})"
    if not math.isfinite(pos.sum()):  # NaN/inf propagate through the sum
        return "non-finite positions"
    worst = float(np.abs(forces).max()) / FORCE_UNIT if forces.size else 0.0  # NaN propagates
    if not math.isfinite(worst):
        return "non-finite forces/gradient"
    if worst > max_gradient:
        return f"|gradient| {worst:.3g} Ha/bohr > max_gradient {max_gradient}"
    return None


@functools.lru_cache(maxsize=8)
def _allowed_table(vocabulary: frozenset[int]) -> np.ndarray:
    table = np.zeros(256, dtype=bool)  # negative Z index from the end: all False there
    table[list(vocabulary)] = True
    return table


# ----------------------------------------------------------------------------- preprocess


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
    from equipipe.store import StoreWriter, TooManyBadRecords

    # the download section carries the release pins (download.expected)
    cfg = _config(options(cfg, "download", "preprocess"))
    raw_dir, store_dir = Path(raw_dir), Path(store_dir)
    pinned = pins(cfg["source"], cfg)
    files = _source_files(raw_dir, cfg["source"], pinned)
    vocab = _z_of(cfg["elements"])
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
            attrs.update(_file_attrs(p))
    attrs["download"] = read_provenance(raw_dir)
    writer = StoreWriter(
        store_dir,
        per_atom=["pos", "z", "forces"],
        per_example=["energy"],
        max_bad_fraction=float(cfg["max_bad_fraction"]),
        attrs=attrs,
    )
    try:
        with writer:
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
    except TooManyBadRecords:
        raise  # keeps <store>.partial/quarantine.parquet for inspection (named in the message)
    except BaseException:
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise


def _file_attrs(path: Path) -> dict[str, Any]:
    """Scalar/string file attributes of an HDF5 file (provenance for the store's meta)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            out = {}
            for k, v in f.attrs.items():
                if isinstance(v, bytes):
                    v = v.decode()
                if isinstance(v, np.generic):
                    v = v.item()
                if isinstance(v, str | int | float | bool):
                    out[f"raw_{k}"] = v
            return out
    except OSError as e:
        raise CorruptFileError(
            f"{path} is not a readable HDF5 file ({e}); it is truncated or corrupt - delete it "
            "and download (or build) it again"
        ) from e
