"""PDB C-alpha chains for flow matching: metadata filters, downloads, embedded set, store.

Sources (``SOURCES``):

- ``remote``: the wwPDB metadata (``pdb_seqres.txt.gz``, ``resolu.idx``,
  ``pdb_entry_type.txt``) is fetched and filtered FIRST (protein chains of X-ray/EM entries,
  resolution <= ``max_resolution``, only the 20 standard one-letter codes in SEQRES,
  ``min_length`` < SEQRES length < ``max_length``); only then are the selected entries'
  mmCIF files fetched from RCSB (``/download/{id}.cif.gz``) in ONE
  :func:`equipipe.data.download.fetch_many` call with bounded concurrency (retries, HTTP Range
  resume, gzip integrity). With ``mirror`` set, a local rsync tree of
  ``structures/divided/mmCIF`` (``<mirror>/mmCIF/<id[1:3]>/<id>.cif.gz`` or
  ``<mirror>/<id[1:3]>/<id>.cif.gz``) is read in place and nothing is downloaded. With
  ``download_dir`` holding the three metadata files they are checked (and matched against
  ``download.expected`` pins where given) and linked, not fetched: ``download_dir`` plus
  ``mirror`` runs with no network at all. A metadata file that does not parse as its wwPDB
  format (an error page served with status 200) is deleted and fetched again, never read as
  "no entries"; a structure that is not a complete gzip is fetched again (``retries`` rounds).
- ``embedded``: real chains shipped in the ``mdanalysistests`` sdist (found with importlib,
  never imported), each kept chain written as its own mmCIF so that :func:`preprocess` reads
  both sources with the same reader.

Raw layout (both sources)::

    <raw>/manifest.parquet   one row per chain: id, pdb_id, chain, sequence, length, file,
                             resolution, method, origin, error (download failure or null)
    <raw>/metadata/...       remote: the three wwPDB files
    <raw>/mmCIF/ab/1abc.cif.gz   remote structures (divided layout)
    <raw>/structures/<id>.cif.gz embedded: one chain per file

Store (``preprocess``): per residue ``pos`` (float32, nm, centred on the chain's C-alpha
mean), ``residue`` (int8, 0..19 in the order ``ARNDCQEGHILKMFPSTWYV``), ``chain_break``
(bool; True at residue i when the C-alpha distance from residue i-1 exceeds
``chain_break_angstrom``, 4.2 Å); index ``id`` (``<pdbid>_<chain>``), ``key`` (50 %-identity
cluster representative, see :mod:`equipipe.data.clustering`), ``n_atoms`` (= residues),
``sequence`` (observed, one-letter), ``source`` (file), ``pdb_id``, ``chain``.

C-alpha extraction (gemmi by default, Biopython's ``MMCIFParser`` with ``backend:
biopython``; both feed one selection routine, so their outputs are identical):

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
- a truncated or corrupt gzip, an unparseable file, a chain with no CA, a missing chain or a
  length outside (``min_length``, ``max_length``) is quarantined with its reason.

Config keys (``DEFAULTS``): ``min_length`` 50 / ``max_length`` 256 (exclusive bounds, as
Proteína), ``max_resolution`` 5.0 Å, ``methods`` ["diffraction", "EM"], ``backend`` "gemmi"
| "biopython", ``mirror`` (path or null), ``base_url`` (null: the real hosts; else a URL
prefix replacing scheme and host of every remote URL, for the loopback test server),
``concurrency`` 8, ``retries`` 3, ``timeout`` 60 s, ``backoff`` 1 s, ``limit`` (at most this
many entries, null for all), ``max_failed_downloads`` 0.01 (fraction of entries whose
download may fail for good before the job fails; they are quarantined), ``cluster_method``
"auto" | "mmseqs" | "builtin", ``cluster_min_seq_id`` 0.5, ``cluster_coverage`` 0.8,
``threads`` 1 (MMseqs2), ``workers`` 1 (parser processes), ``max_bad_fraction`` 0.5,
``embedded_max_length`` 512 (chains kept by ``build_embedded``; ``preprocess`` then applies
``max_length``), ``chain_break_angstrom`` 4.2.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import logging
import multiprocessing as mp
import os
import re
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equipipe.config import dataset_defaults
from equipipe.data.dataset_block import options

log = logging.getLogger(__name__)

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

ONE_LETTER = "ARNDCQEGHILKMFPSTWYV"
THREE_LETTER = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
)  # fmt: skip
RESIDUE_INDEX = {name: i for i, name in enumerate(THREE_LETTER)}
WATER = frozenset({"HOH", "DOD", "WAT", "H2O", "SOL", "TIP", "TIP3", "TIP4", "SPC"})
# Molecular-dynamics names of protonation states -> the PDB residue (embedded MD files only).
MD_ALIASES = {
    "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS", "HIE": "HIS", "HIP": "HIS",
    "HISD": "HIS", "HISE": "HIS", "HISH": "HIS", "HISA": "HIS", "HISB": "HIS",
    "CYX": "CYS", "CYM": "CYS", "CYS2": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS",
}  # fmt: skip

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = (
    "id", "pdb_id", "chain", "sequence", "length", "file", "resolution", "method", "origin", "error",
)  # fmt: skip


def config(cfg: dict[str, Any] | None) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# reading structures: two backends, one selection rule


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
        out.setdefault(ch.name, []).extend(_gemmi_chain_records(ch, f32, index))
    return out


def _gemmi_chain_records(
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


# --------------------------------------------------------------------------------------------
# wwPDB metadata


def parse_seqres(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of ``pdb_seqres.txt(.gz)``: pdb_id, chain, mol, length, sequence."""
    opener = gzip.open if str(path).endswith(".gz") else open
    header = None
    seq: list[str] = []
    with opener(path, "rt") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith(">"):
                if header is not None:
                    yield {**header, "sequence": "".join(seq)}
                head = line[1:].split()
                pdb_chain = head[0]
                pdb_id, _, chain = pdb_chain.partition("_")
                fields = dict(tok.split(":", 1) for tok in head[1:3] if ":" in tok)
                header = {
                    "pdb_id": pdb_id.lower(),
                    "chain": chain,
                    "mol": fields.get("mol", ""),
                    "length": int(fields.get("length", -1)),
                }
                seq = []
            elif line:
                seq.append(line.strip())
    if header is not None:
        yield {**header, "sequence": "".join(seq)}


def parse_resolu(path: str | os.PathLike) -> dict[str, float]:
    """``resolu.idx`` -> {pdb_id: resolution Å}; entries without a positive value are left out."""
    out: dict[str, float] = {}
    with open(path, errors="replace") as f:
        for line in f:
            if ";" not in line:
                continue
            code, _, value = (s.strip() for s in line.partition(";"))
            if not re.fullmatch(r"[0-9A-Za-z_]{4,12}", code):
                continue
            try:
                res = float(value)
            except ValueError:
                continue
            if res > 0:
                out[code.lower()] = res
    return out


def parse_entry_type(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """``pdb_entry_type.txt`` -> {pdb_id: (type, method)}, e.g. ("prot", "diffraction")."""
    out: dict[str, tuple[str, str]] = {}
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split()
            # an id, then the type: other lines (an HTML page served instead) never count
            if len(parts) >= 3 and re.fullmatch(r"[0-9A-Za-z_]{4,12}", parts[0]):
                out[parts[0].lower()] = (parts[1], parts[2])
    return out


def select_chains(
    seqres: str | os.PathLike,
    resolu: str | os.PathLike,
    entry_type: str | os.PathLike,
    cfg: dict[str, Any],
):
    """The chains that pass the metadata filters, as a polars DataFrame (sorted by id)."""
    import polars as pl

    cfg = config(cfg)
    res = parse_resolu(resolu)
    types = parse_entry_type(entry_type)
    methods = set(cfg["methods"])
    lo, hi = int(cfg["min_length"]), int(cfg["max_length"])
    allowed = set(ONE_LETTER)
    rows = []
    for r in parse_seqres(seqres):
        pid = r["pdb_id"]
        if r["mol"] != "protein":
            continue
        method = types.get(pid, ("", ""))[1]
        if method not in methods:
            continue
        resolution = res.get(pid)
        if resolution is None or resolution > float(cfg["max_resolution"]):
            continue
        seq = r["sequence"].upper()
        if not lo < len(seq) < hi or not set(seq) <= allowed:
            continue
        rows.append(
            {
                "id": f"{pid}_{r['chain']}",
                "pdb_id": pid,
                "chain": r["chain"],
                "sequence": seq,
                "length": len(seq),
                "resolution": resolution,
                "method": method,
            }
        )
    schema = {
        "id": pl.String, "pdb_id": pl.String, "chain": pl.String, "sequence": pl.String,
        "length": pl.Int64, "resolution": pl.Float64, "method": pl.String,
    }  # fmt: skip
    df = pl.DataFrame(rows, schema=schema)
    return df.unique("id", keep="first").sort("id")


# --------------------------------------------------------------------------------------------
# download (remote)


def _remote_url(cfg: dict[str, Any], url: str) -> str:
    base = cfg.get("base_url")
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return base.rstrip("/") + parts.path


def structure_url(pdb_id: str, cfg: dict[str, Any] | None = None) -> str:
    return _remote_url(config(cfg), SOURCES["remote"]["structure"].format(id=pdb_id.lower()))


def divided_path(root: Path, pdb_id: str) -> Path:
    """``root/<id[1:3]>/<id>.cif.gz``: the wwPDB divided layout."""
    pdb_id = pdb_id.lower()
    return root / pdb_id[1:3] / f"{pdb_id}.cif.gz"


def _mirror_root(mirror: str | os.PathLike) -> Path:
    root = Path(mirror).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"pdb config: mirror={str(mirror)!r} is not a directory; give the local rsync copy of "
            "structures/divided/mmCIF (or its parent), or set mirror: null to download"
        )
    return root / "mmCIF" if (root / "mmCIF").is_dir() else root


def _write_manifest(df, out_dir: Path) -> Path:
    import polars as pl

    df = df.select([pl.col(c) for c in MANIFEST_COLUMNS])
    dest = out_dir / MANIFEST
    tmp = dest.with_name(dest.name + ".tmp")
    df.write_parquet(tmp)
    os.replace(tmp, dest)
    return dest


METADATA_FILES = {
    "seqres": "pdb_seqres.txt.gz",
    "resolu": "resolu.idx",
    "entry_type": "pdb_entry_type.txt",
}


def _check_metadata(name: str, path: Path) -> None:
    """Refuse a metadata file that is not what wwPDB publishes (e.g. an HTML error page)."""
    from equipipe.data.download import DownloadError, verify_gzip

    if name == "seqres":
        verify_gzip(path)
        n = next(iter(parse_seqres(path)), None) is not None
    elif name == "resolu":
        n = bool(parse_resolu(path))
    else:
        n = bool(parse_entry_type(path))
    if not n:
        head = Path(path).read_bytes()[:80]
        raise DownloadError(
            f"{path} holds no {METADATA_FILES[name]} records (starts with {head!r}); an HTML "
            "error page or an empty file was served: delete it and download it again"
        )


def _metadata(cfg: dict[str, Any], meta: Path, kw: dict[str, Any]) -> dict[str, Path]:
    """The three wwPDB metadata files in ``meta``.

    With ``download_dir`` holding them (a local copy: a cluster node without internet), they
    are checked and linked and nothing is contacted; else each is fetched from wwPDB. A file
    that does not parse (an HTML page served with status 200) is deleted and fetched again.
    """
    from equipipe.data.download import DownloadError, fetch, use_local_copy

    paths: dict[str, Path] = {}
    local = Path(cfg["download_dir"]).expanduser() if cfg.get("download_dir") else None
    meta.mkdir(parents=True, exist_ok=True)
    expected = cfg.get("expected") or {}
    unknown = sorted(set(expected) - set(METADATA_FILES.values()))
    if unknown:
        raise ValueError(
            f"pdb download.expected names {unknown}; allowed: {sorted(METADATA_FILES.values())}"
        )
    for name, filename in METADATA_FILES.items():
        dest = meta / filename
        pin = {k: v for k, v in (expected.get(filename) or {}).items() if v is not None}
        if local is not None and (local / filename).is_file():
            _check_metadata(name, local / filename)
            if not use_local_copy(local / filename, dest, **pin):
                raise DownloadError(
                    f"{local / filename} does not match download.expected.{filename} {pin}: "
                    "replace the local copy or update the pin"
                )
            log.info("pdb: %s from the local copy %s (no network)", filename, local)
            paths[name] = dest
            continue
        url = _remote_url(cfg, SOURCES["remote"][name])
        for attempt in range(1, int(kw["retries"]) + 1):
            fetch(url, dest, **pin, **kw)
            try:
                _check_metadata(name, dest)
                break
            except DownloadError:
                dest.unlink(missing_ok=True)
                if attempt == int(kw["retries"]):
                    raise
                log.warning("pdb: %s was not a %s file; fetching it again", url, filename)
        paths[name] = dest
    return paths


def download(source: str, out_dir: Path, cfg: dict[str, Any]) -> None:
    """Fetch the metadata, filter, then fetch the selected structures (or use the mirror).

    ``source="embedded"`` builds the embedded set instead (no network).
    """
    import polars as pl

    from equipipe.data import landing
    from equipipe.data.download import DownloadError, fetch_many, verify_gzip

    cfg = options(cfg, "preprocess", "download")  # the metadata filters are preprocess keys
    if source == "embedded":
        return build_embedded(out_dir, cfg)
    if source != "remote":
        raise ValueError(f"pdb source {source!r} is unknown; allowed: {tuple(SOURCES)}")
    cfg = config(cfg)
    out_dir = Path(out_dir)
    # Everything is fetched into the undeclared cache (it survives a failed job, which
    # Snakemake answers by deleting out_dir) and hard-linked into out_dir at the end.
    cache = landing.cache_dir(out_dir)
    kw = {
        "retries": int(cfg["retries"]),
        "timeout": float(cfg["timeout"]),
        "backoff": float(cfg["backoff"]),
    }
    paths = _metadata(cfg, cache / "metadata", kw)
    chains = select_chains(paths["seqres"], paths["resolu"], paths["entry_type"], cfg)
    entries = sorted(chains["pdb_id"].unique().to_list())
    if cfg["limit"] is not None:
        entries = entries[: int(cfg["limit"])]
        chains = chains.filter(pl.col("pdb_id").is_in(entries))
    log.info("pdb: %d chains in %d entries pass the metadata filters", chains.height, len(entries))

    errors: dict[str, str] = {}
    if cfg["mirror"]:
        root = _mirror_root(cfg["mirror"])
        files = {e: divided_path(root, e).resolve() for e in entries}
        for e, f in files.items():
            if not f.is_file():
                errors[e] = f"not in mirror: {f}"
        file_col = {e: str(f) for e, f in files.items()}
    else:
        cached = {e: divided_path(cache / "mmCIF", e) for e in entries}
        todo = list(entries)  # finished ones in the cache: no request, gzip checked again
        # A server may answer 200 with an HTML error page instead of the file (no size or
        # checksum is published for a structure): what is not a complete gzip is deleted and
        # fetched again, up to `retries` rounds, before it counts as failed.
        rounds = int(cfg["retries"])
        for k in range(rounds):
            failed: dict[str, str] = {}
            items = [(structure_url(e, cfg), cached[e]) for e in todo]
            try:
                fetch_many(items, concurrency=int(cfg["concurrency"]), **kw)
            except DownloadError as err:
                failures = getattr(err, "failures", None)
                if failures is None:
                    raise
                by_dest = {Path(d).resolve(): e for e, d in cached.items()}
                for _remote, dest, exc in failures:
                    failed[by_dest[Path(dest).resolve()]] = f"download failed: {exc}"
            for e in todo:  # gzip integrity of every cached structure (a few ms each)
                if e in failed:
                    continue
                try:
                    verify_gzip(cached[e])
                except DownloadError as exc:
                    cached[e].unlink(missing_ok=True)
                    failed[e] = f"corrupt gzip: {exc}"
            todo = [e for e, m in failed.items() if m.startswith("corrupt gzip")]
            errors.update({e: m for e, m in failed.items() if e not in todo or k == rounds - 1})
            if not todo:
                break
            log.warning("pdb: %d structures were not gzip files; fetching them again", len(todo))
        allowed = float(cfg["max_failed_downloads"]) * max(len(entries), 1)
        if len(errors) > allowed:
            sample = "\n".join(f"  {e}: {m}" for e, m in sorted(errors.items())[:10])
            raise DownloadError(
                f"{len(errors)} of {len(entries)} PDB structures failed to download (more than "
                f"max_failed_downloads={cfg['max_failed_downloads']}):\n{sample}\n"
                f"Rerun to resume (finished and partial files are kept in {cache}), or raise "
                "max_failed_downloads."
            )
        for e in entries:
            if e not in errors:
                landing.land(cached[e], divided_path(out_dir / "mmCIF", e))
        file_col = {
            e: str(divided_path(out_dir / "mmCIF", e).relative_to(out_dir)) for e in entries
        }
    for p in paths.values():
        landing.land(p, out_dir / "metadata" / p.name)
    manifest = chains.with_columns(
        pl.col("pdb_id").replace_strict(file_col, return_dtype=pl.String).alias("file"),
        pl.lit("remote").alias("origin"),
        pl.col("pdb_id")
        .replace_strict(errors, default=None, return_dtype=pl.String)
        .alias("error"),
    )
    _write_manifest(manifest, out_dir)


# --------------------------------------------------------------------------------------------
# embedded (mdanalysistests)


_EMBEDDED_FILE = re.compile(r"\.(pdb|ent|cif|pdbx)(\.gz|\.bz2)?$", re.I)
_PDB_CODE = re.compile(r"^[0-9][0-9a-z]{3}$", re.I)


def mdanalysistests_data_dir() -> Path:
    """``MDAnalysisTests/data`` of the installed ``mdanalysistests`` (found, not imported)."""
    spec = importlib.util.find_spec("MDAnalysisTests")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        data = Path(loc) / "data"
        if data.is_dir():
            return data
    raise FileNotFoundError(
        "the embedded PDB set needs the mdanalysistests package (real protein files): "
        f"{SOURCES['embedded']['install']}"
    )


def _entry_name(path: Path, info_entry: str | None) -> str:
    """A PDB code if the file names one, else the file stem ('_' -> '-' so ids split at '_')."""
    if info_entry and _PDB_CODE.match(info_entry):
        return info_entry.lower()
    stem = path.name
    stem = _EMBEDDED_FILE.sub("", stem)
    m = re.fullmatch(r"([0-9][0-9a-z]{3})[A-Za-z0-9]?", stem, re.I)  # dssp/1ahsA -> 1ahs
    if m:
        return m.group(1).lower()
    if _PDB_CODE.match(path.parent.name):  # merge/2zmm/protein.pdb -> 2zmm
        return path.parent.name.lower()
    return stem.replace("_", "-").lower()


def _read_any_structure(path: Path):
    """gemmi Structure from a PDB/mmCIF file (gz/bz2 too); None when it cannot be read."""
    import gemmi

    try:
        text = read_text(path)
        name = re.sub(r"\.(gz|bz2)$", "", path.name.lower())
        if name.endswith((".cif", ".pdbx")):
            doc = gemmi.cif.read_string(text)
            st = gemmi.make_structure_from_block(doc[0])
        else:
            st = gemmi.read_pdb_string(text)
    except Exception as e:  # noqa: BLE001 - any unreadable test file (some are broken on purpose) is skipped
        log.debug("embedded: skipping %s (%s)", path, e)
        return None
    return st if len(st) else None


def _chain_candidates(path: Path, data_dir: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Chains of one file that pass the selection rule and the embedded length range."""
    import gemmi

    st = _read_any_structure(path)
    if st is None:
        return []
    info = dict(st.info.items()) if hasattr(st.info, "items") else {}
    entry = _entry_name(path, info.get("_entry.id"))
    lo, hi = int(cfg["min_length"]), int(cfg["embedded_max_length"])
    out = []
    seen_names: set[str] = set()
    for ch in st[0]:
        if ch.name in seen_names:
            continue  # a split author chain is handled with its first part
        seen_names.add(ch.name)
        clean = gemmi.Chain(ch.name.strip() or "A")
        for part in st[0]:
            if part.name != ch.name:
                continue
            for res in part:
                r = res.clone()
                r.name = MD_ALIASES.get(r.name, r.name)
                if r.name in WATER:
                    continue
                backbone = all(r.find_atom(a, "*") is not None for a in ("N", "CA", "C"))
                if r.name not in RESIDUE_INDEX and not backbone:
                    continue  # ligands, ions, caps: not part of the chain we store
                r.het_flag = "A" if r.name in RESIDUE_INDEX else "H"
                clean.add_residue(r)
        recs = _gemmi_chain_records(clean)
        selected, reason = select_residues(recs)
        if reason is not None or not lo < len(selected) <= hi:
            continue
        ca = chain_arrays(selected, clean.name, float(cfg["chain_break_angstrom"]))
        out.append(
            {
                "entry": entry,
                "chain": clean.name,
                "sequence": ca.sequence,
                "gemmi_chain": clean,
                "origin": str(path.relative_to(data_dir)),
                "resolution": _resolution(st),
            }
        )
    return out


def _resolution(st) -> float | None:
    res = float(getattr(st, "resolution", 0.0) or 0.0)
    return res if res > 0 else None


def _write_chain_mmcif(chain, entry: str, dest: Path) -> None:
    """One chain as a gzip'd mmCIF (model 1), the format the remote source delivers."""
    import gemmi

    st = gemmi.Structure()
    st.name = entry.upper()
    model = gemmi.Model(1)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    st.assign_label_seq_id()
    doc = st.make_mmcif_document()
    text = doc.as_string()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with gzip.open(tmp, "wt", compresslevel=6) as f:
        f.write(text)
    os.replace(tmp, dest)


def _embedded_priority(path: Path) -> tuple[int, str]:
    name = path.name.lower()
    is_cif = ".cif" in name or ".pdbx" in name
    has_code = bool(re.match(r"^[0-9][0-9a-z]{3}", name))
    return (0 if is_cif and has_code else 1 if has_code else 2, str(path))


def build_embedded(out_dir: Path, cfg: dict[str, Any]) -> None:
    """Write the real protein chains of ``mdanalysistests`` as one mmCIF per chain + manifest.

    Every PDB/mmCIF(.gz/.bz2) file under ``MDAnalysisTests/data`` is read with gemmi; model 1's
    chains pass the same selection rule as :func:`preprocess` (MD protonation names such as
    HSD are mapped to HIS first; water, ions and ligands are left out), are kept when
    ``min_length`` < length <= ``embedded_max_length`` and are de-duplicated by sequence
    (mmCIF files with a PDB code first, then PDB files with a code, then the rest; path order
    within). Works offline; the package is located, never imported.
    """
    import polars as pl

    cfg = config(options(cfg, "embedded"))
    out_dir = Path(out_dir)
    data_dir = mdanalysistests_data_dir()
    files = sorted(
        (p for p in data_dir.rglob("*") if p.is_file() and _EMBEDDED_FILE.search(p.name)),
        key=_embedded_priority,
    )
    seen: set[str] = set()
    used_ids: set[str] = set()
    rows = []
    for path in files:
        for cand in _chain_candidates(path, data_dir, cfg):
            if cand["sequence"] in seen:
                continue
            seen.add(cand["sequence"])
            cid = f"{cand['entry']}_{cand['chain']}"
            n = 2
            while cid in used_ids:
                cid = f"{cand['entry']}-{n}_{cand['chain']}"
                n += 1
            used_ids.add(cid)
            rel = Path("structures") / f"{cid}.cif.gz"
            _write_chain_mmcif(cand["gemmi_chain"], cid.rsplit("_", 1)[0], out_dir / rel)
            rows.append(
                {
                    "id": cid,
                    "pdb_id": cid.rsplit("_", 1)[0],
                    "chain": cand["chain"],
                    "sequence": cand["sequence"],
                    "length": len(cand["sequence"]),
                    "file": str(rel),
                    "resolution": cand["resolution"],
                    "method": None,
                    "origin": f"mdanalysistests-{SOURCES['embedded']['version']}:{cand['origin']}",
                    "error": None,
                }
            )
    if not rows:
        raise RuntimeError(f"no protein chain found under {data_dir}; is mdanalysistests complete?")
    schema = {
        "id": pl.String, "pdb_id": pl.String, "chain": pl.String, "sequence": pl.String,
        "length": pl.Int64, "file": pl.String, "resolution": pl.Float64, "method": pl.String,
        "origin": pl.String, "error": pl.String,
    }  # fmt: skip
    _write_manifest(pl.DataFrame(rows, schema=schema), out_dir)
    log.info("pdb embedded: %d unique chains written to %s", len(rows), out_dir)


# --------------------------------------------------------------------------------------------
# preprocess


def read_manifest(raw_dir: Path):
    import polars as pl

    path = Path(raw_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the pdb download (remote) or build_embedded step first"
        )
    return pl.read_parquet(path)


def _process_file(args: tuple[str, list[str], str, int, int, float]) -> list[tuple[str, Any]]:
    """Worker: one file -> [(chain, arrays dict | reason)] for the requested chains."""
    path, chains, backend, lo, hi, break_a = args
    try:
        result = read_ca_chains(path, chains, backend, break_a)
    except StructureError as e:
        return [(c, str(e)) for c in chains]
    out: list[tuple[str, Any]] = []
    for c in chains:
        r = result[c]
        if isinstance(r, str):
            out.append((c, r))
        elif not lo < len(r.sequence) < hi:
            out.append((c, f"length {len(r.sequence)} outside ({lo}, {hi})"))
        else:
            arrays = {"pos": r.pos, "residue": r.residue, "chain_break": r.chain_break}
            out.append((c, (arrays, r.sequence)))
    return out


def preprocess(raw_dir: Path, store_dir: Path, cfg: dict[str, Any]) -> None:
    """Manifest + mmCIF files -> store (see the module docstring); bad chains quarantined."""
    from tqdm import tqdm

    from equipipe.data.clustering import cluster_sequences, mmseqs_available
    from equipipe.store import StoreWriter

    cfg = config(options(cfg, "preprocess"))
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    rows = manifest.to_dicts()
    method = cfg["cluster_method"]
    used = (
        "mmseqs" if method == "mmseqs" or (method == "auto" and mmseqs_available()) else "builtin"
    )
    clusters = cluster_sequences(
        {r["id"]: r["sequence"] for r in rows},
        float(cfg["cluster_min_seq_id"]),
        float(cfg["cluster_coverage"]),
        method,
        int(cfg["threads"]),
    )
    lo, hi = int(cfg["min_length"]), int(cfg["max_length"])
    by_file: dict[str, list[dict[str, Any]]] = {}
    origins = {str(r.get("origin") or "") for r in rows}
    source = cfg.get("source") or (
        "embedded" if any(o.startswith("mdanalysistests") for o in origins) else "remote"
    )
    attrs = {
        "dataset": "pdb",
        "source": source,  # as the SPICE and GEOM stores record theirs
        "units": {"pos": "nm"},
        "residue_alphabet": ONE_LETTER,
        "backend": cfg["backend"],
        "centred": True,
        "chain_break_angstrom": float(cfg["chain_break_angstrom"]),
        "length_range_exclusive": [lo, hi],
        "clustering": {
            "method": used,
            "min_seq_id": float(cfg["cluster_min_seq_id"]),
            "coverage": float(cfg["cluster_coverage"]),
            "cov_mode": 1,
        },
    }
    with StoreWriter(
        store_dir,
        per_atom=("pos", "residue", "chain_break"),
        max_bad_fraction=float(cfg["max_bad_fraction"]),
        attrs=attrs,
    ) as writer:
        for r in rows:
            fields = {"source": r["file"], "pdb_id": r["pdb_id"], "chain": r["chain"]}
            if r.get("error"):
                writer.quarantine(r["id"], r["error"], **fields)
                continue
            by_file.setdefault(r["file"], []).append(r)
        jobs = []
        for file, group in by_file.items():
            path = Path(file) if Path(file).is_absolute() else raw_dir / file
            jobs.append(
                (
                    str(path),
                    [g["chain"] for g in group],
                    cfg["backend"],
                    lo,
                    hi,
                    float(cfg["chain_break_angstrom"]),
                )
            )
        workers = int(cfg["workers"])
        pool = None
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: the parent holds polars/torch thread pools that fork can deadlock
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        try:
            results = (
                pool.map(_process_file, jobs, chunksize=16) if pool else map(_process_file, jobs)
            )
            bar = tqdm(
                zip(by_file.values(), results),
                total=len(jobs),
                desc="pdb: parsing mmCIF",
                unit="file",
            )
            for group, result in bar:
                by_chain = dict(result)
                for r in group:
                    fields = {"source": r["file"], "pdb_id": r["pdb_id"], "chain": r["chain"]}
                    res = by_chain[r["chain"]]
                    if isinstance(res, str):
                        writer.quarantine(r["id"], res, **fields)
                        continue
                    arrays, seq = res
                    writer.add(r["id"], clusters[r["id"]], arrays, sequence=seq, **fields)
        finally:
            if pool is not None:
                pool.shutdown()
