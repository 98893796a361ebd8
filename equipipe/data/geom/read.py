"""Reading raw GEOM: molecule records from an ``rdkit_folder`` archive or the MiDi pickles, and one conformer's arrays.

The archive is read member by member from the gzip stream (``tarfile`` ``r|gz``): the ~300k
pickles are never unpacked to disk. Every pickle is verified first (:mod:`equipipe.data.geom.trust`),
then loaded by the restricted unpickler inside sandboxed, memory-limited child processes that
hand back plain arrays: a molecule whose rebuild crashes its child becomes a record with the
reason, never a dead job.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from equipipe.data.geom.config import ARCHIVE, MIDI_SPLITS, smiles_hash
from equipipe.data.geom.trust import CorruptFileError, member_verifier, verify_midi_file

log = logging.getLogger(__name__)


def iter_rdkit_folder(
    archive: Path,
    check: Callable[[str, bytes], None] | None = None,
    subset: str = "drugs",
    max_molecules: int | None = None,
    workers: int = 1,
) -> Iterator[tuple[str, dict | Exception]]:
    """Stream ``(member name, molecule dict | error)`` from an ``rdkit_folder.tar.gz``.

    Members are read in archive order from the gzip stream (nothing is unpacked); only
    ``*/<subset>/*.pickle`` members are unpickled, each after ``check(name, bytes)`` (raises on
    an unverified member), through the restricted unpickler, in ``workers`` sandboxed child
    processes (:mod:`equipipe.data.pickle_sandbox`): RDKit molecules come back as plain arrays
    (``{"__rdkit_mol__": True, "z", "pos", "n_conformers"}``). A member that fails to load,
    or crashes its child, is yielded as its exception (the caller quarantines it); an
    unverified member raises.
    """
    from equipipe.data.pickle_sandbox import Sandbox

    def members() -> Iterator[tuple[str, bytes]]:
        n = 0
        with tarfile.open(archive, mode="r|gz") as tar:
            for info in tar:
                if not info.isfile() or not info.name.endswith(".pickle"):
                    continue
                if f"/{subset}/" not in f"/{info.name}":
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if check is not None:
                    check(info.name, data)
                yield info.name, data
                n += 1
                if max_molecules is not None and n >= max_molecules:
                    return

    try:
        with Sandbox(workers) as box:
            for name, obj in box.map(members()):
                if not isinstance(obj, dict | Exception):
                    obj = ValueError(f"pickle holds a {type(obj).__name__}, expected a dict")
                yield name, obj
    except (tarfile.ReadError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise CorruptFileError(
            f"{archive} is truncated or corrupt ({type(e).__name__}: {e}); "
            "delete it and download (or build) it again"
        ) from e


def select_conformers(conformers: list, n: int, order: str) -> list[tuple[int, dict]]:
    """(position in the molecule's list, conformer) of the ``n`` conformers to keep."""
    items = list(enumerate(conformers))
    if order == "lowest_energy":

        def energy(item):
            e = item[1].get("totalenergy") if isinstance(item[1], dict) else None
            return float(e) if e is not None and math.isfinite(float(e)) else math.inf

        items.sort(key=energy)  # stable: ties keep the file order
    return items[:n]


def conformer_record(
    mol, vocabulary: set[int], limit: float
) -> tuple[dict[str, np.ndarray] | None, str | None, float]:
    """Arrays (pos centred, z) of an RDKit conformer, or a quarantine reason.

    Returns (arrays or None, reason or None, max centroid distance in Å).
    """
    from rdkit import Chem

    if isinstance(mol, Chem.Mol):  # trusted data only; untrusted pickles come back as arrays
        from equipipe.data.pickle_sandbox import plain

        mol = plain(mol)
    if not (isinstance(mol, dict) and mol.get("__rdkit_mol__")):
        return None, f"no RDKit molecule (got {type(mol).__name__})", math.nan
    if not mol["n_conformers"] or mol["pos"] is None:
        return None, "RDKit molecule has no conformer", math.nan
    z = np.asarray(mol["z"], dtype=np.int64).reshape(-1)
    if z.size == 0:
        return None, "molecule has no atoms", math.nan
    table = Chem.GetPeriodicTable()
    bad = sorted({int(x) for x in z} - vocabulary)
    if bad:
        names = ", ".join(table.GetElementSymbol(b) if 0 < b < 119 else str(b) for b in bad)
        return None, f"element {names} outside the vocabulary", math.nan
    pos = np.asarray(mol["pos"], dtype=np.float64)
    if pos.shape != (len(z), 3) or not np.all(np.isfinite(pos)):
        return None, "non-finite or malformed coordinates", math.nan
    pos = pos - pos.mean(0)
    r = float(np.sqrt((pos**2).sum(1)).max())
    if r > limit:
        return None, f"max radius {r:.2f} A > {limit:.2f} A (inscribed ball minus margin)", r
    return {"pos": pos.astype(np.float32), "z": z.astype(np.int8)}, None, r


def records_rdkit_folder(raw_dir: Path, cfg: dict, source: str) -> Iterator[dict]:
    """Molecule records of ``raw_dir/rdkit_folder.tar.gz`` (verified first), or why one is unusable."""
    archive = raw_dir / ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(
            f"geom source {source!r}: {archive} not found; run the download (or build_embedded) "
            "step first"
        )
    how, check = member_verifier(raw_dir, cfg)
    log.info("geom: %s: %s", archive, how)
    workers = int(cfg["workers"])
    for name, obj in iter_rdkit_folder(archive, check, "drugs", cfg["max_molecules"], workers):
        if isinstance(obj, Exception):
            stem = Path(name).stem
            yield {
                "error": f"unreadable pickle: {type(obj).__name__}: {obj}",
                "key": stem,
                "id": f"{smiles_hash(stem)}/*",
                "member": name,
            }
            continue
        smiles = obj.get("smiles")
        confs = obj.get("conformers")
        if not isinstance(smiles, str) or not isinstance(confs, list):
            yield {
                "error": "pickle lacks 'smiles' or 'conformers'",
                "key": str(smiles or name),
                "id": f"{smiles_hash(str(smiles or name))}/*",
                "member": name,
            }
            continue
        yield {"smiles": smiles, "conformers": confs, "member": name}


def records_midi(raw_dir: Path, cfg: dict) -> Iterator[dict]:
    """Molecule records of the three MiDi pickles (each verified first), in one sandboxed child."""
    from equipipe.data.pickle_sandbox import DEFAULT_MEMORY_BYTES, Sandbox

    paths = {split: raw_dir / f"{split}_data.pickle" for split in MIDI_SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"geom source 'midi': {path} not found; run the download first")
    # one sandboxed child for the three files, its memory limit sized to the largest
    memory = max(DEFAULT_MEMORY_BYTES, *(30 * p.stat().st_size for p in paths.values()))
    with Sandbox(1, memory_bytes=memory, timeout_s=3600) as box:
        yield from _records_midi_files(paths, cfg, box)


def _records_midi_files(paths: dict[str, Path], cfg: dict, box) -> Iterator[dict]:
    for split, path in paths.items():
        how = verify_midi_file(path, split, cfg)
        log.info("geom: %s: %s", path, how)
        [(_, data)] = list(box.map([(path.name, path.read_bytes())]))
        if isinstance(data, pickle.UnpicklingError):
            raise data  # refused by the allow-list: a hostile file fails the job
        if isinstance(data, Exception):
            yield {"error": str(data), "key": f"{split}:*", "id": f"{split}/*", "midi_split": split}
            continue
        if not isinstance(data, list):
            raise CorruptFileError(f"{path} holds a {type(data).__name__}, expected a list")
        for i, item in enumerate(data):
            if cfg["max_molecules"] is not None and i >= int(cfg["max_molecules"]):
                break
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
                yield {
                    "error": "entry is not (smiles, [Mol])",
                    "key": f"{split}:{i}",
                    "id": f"{split}-{i}/*",
                    "midi_split": split,
                }
                continue
            smiles, mols = item
            confs = [{"rd_mol": m} for m in (mols if isinstance(mols, list | tuple) else [mols])]
            yield {"smiles": smiles, "conformers": confs, "midi_split": split, "member": path.name}
