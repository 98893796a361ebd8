"""The wwPDB metadata files (``pdb_seqres.txt.gz``, ``resolu.idx``, ``pdb_entry_type.txt``) and the chain filter on them.

:func:`select_chains` keeps protein chains of the configured methods, resolution <=
``max_resolution``, only the 20 standard one-letter codes in SEQRES and ``min_length`` <
SEQRES length < ``max_length``, before any structure is fetched.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from typing import Any

from equipipe.data.pdb.config import resolve_config
from equipipe.data.pdb.read import ONE_LETTER


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

    cfg = resolve_config(cfg)
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
