"""C-alpha chains of mmCIF files: two backends (gemmi, Biopython's ``MMCIFParser``), one selection rule.

Both backends feed :func:`select_residues`, so their outputs are identical:

- first model only; the chain is the author chain id (``auth_asym_id``);
- a chain is its polymer: only residues of the chain's polymer entity are considered, read
  from the file (``_entity.type`` of the residue's ``label_entity_id`` is ``polymer``; a file
  without ``_entity`` uses ``label_seq_id``, which only polymer residues carry). Ligands,
  waters, ions and other non-polymer groups that share the author chain are never selected,
  never quarantine the chain and never create a break, whatever their atom names (the
  methionine moiety of SAM has atoms N, CA and C; a free amino acid ligand is named GLU);
- a polymer residue named one of the 20 standard amino acids contributes its CA (residues
  without a CA are skipped, which a later CA-CA distance flags as a break);
- modified residues: a polymer residue with a CA and any other name (``MSE``, ``SEP``,
  ``UNK``, ...) quarantines the whole chain ("non-standard residue MSE"), as Proteína keeps
  standard residues only; polymer caps without a CA (``ACE``, ``NH2``) are skipped;
- a file with neither ``_entity`` nor ``label_seq_id`` (legacy files; the embedded builder's
  input) falls back to names: water skipped, a non-standard residue with backbone N, CA and C
  quarantines the chain, any other residue is skipped;
- alternate locations: altloc ``A`` if present, else the highest occupancy (first on ties);
  the same rule picks between point-mutation variants sharing one residue number;
- a truncated or corrupt gzip, an unparseable file, a chain with no CA or a missing chain is
  reported with its reason (the caller quarantines it).
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from equipipe.data.pdb.config import BACKENDS

ONE_LETTER = "ARNDCQEGHILKMFPSTWYV"
THREE_LETTER = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
)  # fmt: skip
RESIDUE_INDEX = {name: i for i, name in enumerate(THREE_LETTER)}
WATER = frozenset({"HOH", "DOD", "WAT", "H2O", "SOL", "TIP", "TIP3", "TIP4", "SPC"})


class StructureError(Exception):
    """A structure file that cannot be read at all (truncated gzip, not mmCIF, ...)."""


@dataclass
class CAChain:
    """One chain's C-alpha trace as stored: nm, centred."""

    chain: str
    sequence: str
    residue: np.ndarray  # (L,) int8
    pos: np.ndarray  # (L, 3) float32 nm, centred
    chain_break: np.ndarray  # (L,) bool


# A residue as a backend reports it: (name, seq number, insertion code, has N and C,
# [(altloc, occupancy, x, y, z) for every CA], polymer) with float32 occupancy and coordinates
# (Å); polymer is True/False from the file's entity records, None when the file has none.
_Record = tuple[str, int, str, bool, list[tuple[str, float, float, float, float]], bool | None]
_ResKey = tuple[str, int, str, str]  # (auth chain, auth seq number, insertion code, name)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of a (gzip/bzip2-compressed) file; a truncated or corrupt archive raises.

    Decompressing here (not inside the parser) is what guarantees integrity: gemmi's own gzip
    reader accepts a stream cut at a line boundary when its trailer looks plausible.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StructureError(f"cannot read file: {e}") from e
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise StructureError(
            f"truncated or corrupt compressed file ({type(e).__name__}: {e})"
        ) from e
    return raw


def read_text(path: str | os.PathLike) -> str:
    """:func:`read_bytes` decoded (UTF-8, else Latin-1)."""
    return _decode(read_bytes(path))


def _decode(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def polymer_index(column) -> dict[_ResKey, bool] | None:
    """Which residues of model 1 belong to a polymer entity, from the mmCIF categories.

    ``column(tag)`` returns the values of one mmCIF item (a list of strings) or None; both
    backends pass their parser's own view of the same file, so they decide identically.
    Returns (auth chain, auth seq number, insertion code, residue name) -> polymer, or None
    when the file has neither ``_entity.type`` nor ``_atom_site.label_seq_id``.
    """
    seq = column("_atom_site.label_seq_id")
    ent = column("_atom_site.label_entity_id")
    types = dict(zip(column("_entity.id") or [], column("_entity.type") or []))
    use_types = bool(types) and bool(ent)
    if not use_types and not seq:
        return None
    chain = column("_atom_site.auth_asym_id") or column("_atom_site.label_asym_id")
    num = column("_atom_site.auth_seq_id") or column("_atom_site.label_seq_id")
    comp = column("_atom_site.label_comp_id") or column("_atom_site.auth_comp_id")
    if not chain or not num or not comp:
        return None
    icode = column("_atom_site.pdbx_PDB_ins_code") or ["?"] * len(chain)
    model = column("_atom_site.pdbx_PDB_model_num")
    first = model[0] if model else None
    out: dict[_ResKey, bool] = {}
    last = None
    for i in range(len(chain)):
        if model and model[i] != first:
            continue
        key = (chain[i], num[i], icode[i], comp[i])
        if key == last:
            continue  # atoms of the residue just seen
        last = key
        try:
            rkey = (chain[i], int(num[i]), "" if icode[i] in ("?", ".") else icode[i], comp[i])
        except ValueError:
            continue
        if use_types:
            poly = types.get(ent[i], "").strip("'\"").lower() == "polymer"
        else:
            poly = seq[i] not in ("?", ".")
        out[rkey] = out.get(rkey, False) or poly
    return out


def _gemmi_records(data: bytes | str, chains: set[str] | None) -> dict[str, list[_Record]]:
    import gemmi

    try:
        doc = gemmi.cif.read_string(data)  # bytes are accepted: no decode, no copy
        if len(doc) == 0:
            raise ValueError("no data block")
        st = gemmi.make_structure_from_block(doc[0])
    except Exception as e:  # gemmi raises ValueError/RuntimeError for malformed CIF
        raise StructureError(f"unparseable mmCIF ({type(e).__name__}: {e})") from e
    if len(st) == 0:
        raise StructureError("unparseable mmCIF (no atoms / no model)")
    block = doc[0]

    def column(tag: str) -> list[str] | None:
        values = block.find_values(tag)
        return list(values) if values is not None and len(values) else None

    index = polymer_index(column)
    out: dict[str, list[_Record]] = {}
    f32 = np.float32
    for ch in st[0]:  # gemmi may split one author chain into parts: concatenate in file order
        if chains is not None and ch.name not in chains:
            continue
        out.setdefault(ch.name, []).extend(gemmi_chain_records(ch, f32, index))
    return out


def gemmi_chain_records(
    chain, f32=np.float32, index: dict[_ResKey, bool] | None = None
) -> list[_Record]:
    """Records of the residues of one gemmi chain that have a CA (the others never count)."""
    recs: list[_Record] = []
    for res in chain:
        polymer = None
        if index is not None:
            polymer = index.get((chain.name, res.seqid.num, res.seqid.icode.strip(), res.name))
            if not polymer:
                continue  # ligand, water, ion sharing the author chain: never part of it
        ca = res.find_atom("CA", "*")
        if ca is None:
            continue  # water, ions, ligands, residues without CA: never selected
        name = res.name
        if ca.has_altloc():
            cas = [
                (
                    a.altloc.strip("\x00"),
                    float(f32(a.occ)),
                    float(f32(a.pos.x)),
                    float(f32(a.pos.y)),
                    float(f32(a.pos.z)),
                )
                for a in res
                if a.name == "CA"
            ]
        else:
            p = ca.pos
            cas = [("", float(f32(ca.occ)), float(f32(p.x)), float(f32(p.y)), float(f32(p.z)))]
        # Backbone N and C only matter for telling non-standard amino acids from ligands.
        has_nc = name in RESIDUE_INDEX or (
            res.find_atom("N", "*") is not None and res.find_atom("C", "*") is not None
        )
        seqid = res.seqid
        recs.append((name, seqid.num, seqid.icode.strip(), has_nc, cas, polymer))
    return recs


def _biopython_records(data: bytes | str, chains: set[str] | None) -> dict[str, list[_Record]]:
    import warnings

    from Bio.PDB.MMCIFParser import MMCIFParser

    parser = MMCIFParser(QUIET=True, PERMISSIVE=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = parser.get_structure("x", io.StringIO(_decode(data)))
    except Exception as e:  # Biopython raises many kinds for malformed input
        raise StructureError(f"unparseable mmCIF ({type(e).__name__}: {e})") from e
    mmcif = parser._mmcif_dict  # the parsed categories (Biopython keeps them on the parser)

    def column(tag: str) -> list[str] | None:
        values = mmcif.get(tag)
        return list(values) if values else None

    index = polymer_index(column)
    models = list(st)
    if not models:
        raise StructureError("unparseable mmCIF (no atoms / no model)")
    f32 = np.float32
    out: dict[str, list[_Record]] = {}
    for ch in models[0]:
        if chains is not None and ch.id not in chains:
            continue
        recs = out.setdefault(ch.id, [])
        for residue in ch:
            # A point mutation is one DisorderedResidue holding several residues: unpack.
            variants = residue.disordered_get_list() if residue.is_disordered() == 2 else [residue]
            for res in variants:
                name = res.get_resname()
                _, num, icode = res.id
                polymer = None
                if index is not None:
                    polymer = index.get((ch.id, int(num), icode.strip(), name))
                    if not polymer:
                        continue  # ligand, water, ion sharing the author chain
                elif name in WATER:
                    continue
                cas = []
                has_n = has_c = False
                for a in res.get_unpacked_list():
                    an = a.get_name()
                    if an == "CA":
                        x, y, z = a.get_coord()
                        alt = a.get_altloc().strip()
                        cas.append(
                            (
                                alt,
                                float(f32(a.get_occupancy() or 0.0)),
                                float(x),
                                float(y),
                                float(z),
                            )
                        )
                    elif an == "N":
                        has_n = True
                    elif an == "C":
                        has_c = True
                if cas:  # residues without a CA are never selected (as in the gemmi reader)
                    recs.append((name, int(num), icode.strip(), has_n and has_c, cas, polymer))
    return out


_READERS = {"gemmi": _gemmi_records, "biopython": _biopython_records}


def _pick_ca(cas: list[tuple[str, float, float, float, float]]) -> int:
    """Index of the CA to use: no altloc / altloc A first, else highest occupancy (first on ties)."""
    for i, c in enumerate(cas):
        if c[0] in ("", "A"):
            return i
    best = 0
    for i, c in enumerate(cas):
        if c[1] > cas[best][1]:
            best = i
    return best


def select_residues(
    records: list[_Record],
) -> tuple[list[tuple[str, tuple[float, float, float]]], str | None]:
    """Apply the selection rule to one chain's records.

    Returns ``([(residue name, CA xyz Å), ...], reason)`` with ``reason`` set when the chain
    must be quarantined (non-standard residue). Records flagged non-polymer are skipped; a
    polymer residue with a CA that is not one of the 20 quarantines; records without polymer
    information (None) follow the legacy name rule (module docstring).
    """
    out: list[tuple[str, tuple[float, float, float]]] = []
    n = len(records)
    i = 0
    while i < n:
        rec = records[i]
        j = i + 1
        # Variants sharing (number, insertion code) are alternatives of one residue.
        if j < n and records[j][1] == rec[1] and records[j][2] == rec[2]:
            while j < n and records[j][1] == rec[1] and records[j][2] == rec[2]:
                j += 1
            flat = [(c, k) for k in range(i, j) for c in records[k][4]]
            if flat:
                rec = records[flat[_pick_ca([c for c, _ in flat])][1]]
        i = j
        name, _, _, has_nc, cas = rec[:5]
        polymer = rec[5] if len(rec) > 5 else None
        if polymer is False:
            continue
        if name in RESIDUE_INDEX:
            if cas:
                c = cas[0] if len(cas) == 1 else cas[_pick_ca(cas)]
                out.append((name, (c[2], c[3], c[4])))
        elif cas and (polymer or has_nc):
            return out, f"non-standard residue {name}"
    return out, None


_ONE_OF = dict(zip(THREE_LETTER, ONE_LETTER))


def chain_arrays(
    selected: list[tuple[str, tuple[float, float, float]]], chain: str, break_angstrom: float = 4.2
) -> CAChain:
    """Selected residues -> stored arrays (nm, centred; breaks where CA-CA > ``break_angstrom``)."""
    names = [name for name, _ in selected]
    xyz = np.array([p for _, p in selected], dtype=np.float32).astype(np.float64)
    residue = np.array([RESIDUE_INDEX[name] for name in names], dtype=np.int8)
    step = np.linalg.norm(np.diff(xyz, axis=0), axis=1)
    chain_break = np.zeros(len(selected), dtype=bool)
    chain_break[1:] = step > break_angstrom
    pos = ((xyz - xyz.mean(axis=0)) / 10.0).astype(np.float32)
    seq = "".join([_ONE_OF[name] for name in names])
    return CAChain(chain, seq, residue, pos, chain_break)


def read_ca_chains(
    path: str | os.PathLike,
    chains: Iterable[str] | None = None,
    backend: str = "gemmi",
    break_angstrom: float = 4.2,
) -> dict[str, CAChain | str]:
    """C-alpha traces of the requested chains of one mmCIF(.gz) file.

    Returns chain -> :class:`CAChain`, or a quarantine reason string ("no CA atoms",
    "non-standard residue MSE", "chain X not in file"). Raises :class:`StructureError` when
    the file as a whole cannot be read.
    """
    if backend not in _READERS:
        raise ValueError(f"backend {backend!r} is unknown; allowed: {BACKENDS}")
    want = None if chains is None else set(chains)
    records = _READERS[backend](read_bytes(path), want)
    out: dict[str, CAChain | str] = {}
    names = sorted(want) if want is not None else list(records)
    for name in names:
        recs = records.get(name)
        if recs is None:
            out[name] = f"chain {name} not in file"
            continue
        selected, reason = select_residues(recs)
        if reason is not None:
            out[name] = reason
        elif not selected:
            out[name] = "no CA atoms"
        else:
            out[name] = chain_arrays(selected, name, break_angstrom)
    return out
