"""Reading raw SPICE: one record stream from a SPICE HDF5 (any release, the embedded file) or MACE-OFF extended XYZ.

Gradients are read as (M, N, 3) or flat (M, 3N); (M, 3, N) is quarantined with its reason (a
reshape would scramble the forces); with N = 3 the two cannot be told apart and (M, 3, 3) is
read as (M, N, 3), the layout the releases document. HDF5 external links, virtual datasets and
external storage are refused (they would read other files of the machine into the store). A
truncated or unreadable file raises :class:`CorruptFileError`, never a partial result.
:func:`check_record` says why a record must be quarantined (labels, vocabulary, gradient limit).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equipipe.data.embedded import (
    BOHR_ANGSTROM,
    HARTREE_EV,
)
from equipipe.errors import ActionableError

log = logging.getLogger(__name__)


REQUIRED_KEYS = ("atomic_numbers", "conformations", "dft_total_energy", "dft_total_gradient")
FORCE_UNIT = HARTREE_EV / BOHR_ANGSTROM  # 1 hartree/bohr in eV/Å
_WANTED = frozenset((*REQUIRED_KEYS, "subset", "smiles"))


class CorruptFileError(ActionableError):
    """A raw file is truncated or unreadable; it must be downloaded again, never preprocessed."""

    advice = "delete the file and download (or build) it again"


def _bad(ids: list[str], key: str, reason: str, subset: str, source: str) -> Iterator[dict]:
    for id_ in ids:
        yield {"id": id_, "key": key, "subset": subset, "source": source, "error": reason}


def _str0(ds) -> str:
    v = ds[()]
    v = v[0] if np.ndim(v) else v
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_hdf5(path: Path, source: str) -> Iterator[dict]:

    with _open_hdf5(path) as f:
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


def _frames(path: Path) -> Iterator[tuple[int, int, bytes, list[bytes]]]:
    """(line number, atom count, comment line, atom lines) of each frame of an extended-XYZ file.

    Reads line by line; blank lines between frames are skipped. Raises CorruptFileError for a
    header that is not an atom count, a count larger than the bytes left in the file (refused
    at once: nothing is read or allocated past it) and a frame cut short.
    """
    left = path.stat().st_size
    lineno = 0
    with open(path, "rb") as fh:
        for head in fh:
            lineno += 1
            left -= len(head)
            if not head.strip():
                continue
            try:
                natoms = int(head.split()[0])
            except ValueError:
                raise CorruptFileError(
                    f"{path}:{lineno}: expected an atom count, got {head.strip()[:60]!r}; "
                    "the file is corrupt"
                ) from None
            if natoms < 0 or 2 * natoms > left:  # an atom line has at least 2 bytes
                raise CorruptFileError(
                    f"{path}:{lineno}: the frame announces {natoms} atoms but only {left} bytes "
                    "are left in the file; the file is truncated or corrupt"
                )
            lines = []
            for _ in range(natoms + 1):  # the comment line, then one line per atom
                line = fh.readline()
                left -= len(line)
                if not line.endswith(b"\n"):
                    raise CorruptFileError(
                        f"{path}: frame at line {lineno} ({natoms} atoms) ends early; the file "
                        "is truncated - delete it and download it again"
                    )
                lines.append(line)
            yield lineno, natoms, lines[0], lines[1:]
            lineno += natoms + 1


def _read_extxyz(path: Path, source: str) -> Iterator[dict]:
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    znum: dict[str, int] = {}
    counter: dict[str, int] = {}
    for frame_line, natoms, comment, lines in _frames(path):
        info = parse_extxyz_comment(comment.decode(errors="replace"))
        try:
            props, ncols = _properties(info.get("Properties", "species:S:1:pos:R:3"))
            tokens = b"".join(lines).decode(errors="replace").split()
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

    The same frame reader as :func:`read_records` (one frame in memory at a time), without
    parsing the values.
    """
    return sum(1 for _ in _frames(Path(path)))


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


def file_attrs(path: Path) -> dict[str, Any]:
    """Scalar/string file attributes of an HDF5 file (provenance for the store's meta)."""

    with _open_hdf5(path) as f:
        out = {}
        for k, v in f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str | int | float | bool):
                out[f"raw_{k}"] = v
        return out


def _open_hdf5(path: Path):
    """``h5py.File(path, "r")``; CorruptFileError when it cannot be opened."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CorruptFileError(
            f"{path} is not a readable HDF5 file ({e}); it is truncated or corrupt - delete it "
            "and download (or build) it again"
        ) from e
