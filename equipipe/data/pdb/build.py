"""The embedded PDB set: real protein chains shipped in the ``mdanalysistests`` sdist.

The package is found with importlib, never imported. Each kept chain is written as its own
gzip'd mmCIF (the format the remote source delivers), so that preprocessing reads both sources
with the same reader.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

from equipipe.data.dataset_block import options
from equipipe.data.pdb.config import SOURCES, resolve_config
from equipipe.data.pdb.manifest import write_manifest
from equipipe.data.pdb.read import (
    RESIDUE_INDEX,
    WATER,
    chain_arrays,
    gemmi_chain_records,
    read_text,
    select_residues,
)

log = logging.getLogger(__name__)

# Molecular-dynamics names of protonation states -> the PDB residue (embedded MD files only).
MD_ALIASES = {
    "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS", "HIE": "HIS", "HIP": "HIS",
    "HISD": "HIS", "HISE": "HIS", "HISH": "HIS", "HISA": "HIS", "HISB": "HIS",
    "CYX": "CYS", "CYM": "CYS", "CYS2": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS",
}  # fmt: skip


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
        recs = gemmi_chain_records(clean)
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

    cfg = resolve_config(options(cfg, "embedded"))
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
    write_manifest(pl.DataFrame(rows, schema=schema), out_dir)
    log.info("pdb embedded: %d unique chains written to %s", len(rows), out_dir)
