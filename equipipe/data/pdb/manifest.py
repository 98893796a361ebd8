"""The raw layout both PDB sources write, and its manifest.

::

    <raw>/manifest.parquet   one row per chain: id, pdb_id, chain, sequence, length, file,
                             resolution, method, origin, error (download failure or null)
    <raw>/metadata/...       remote: the three wwPDB files
    <raw>/mmCIF/ab/1abc.cif.gz   remote structures (divided layout)
    <raw>/structures/<id>.cif.gz embedded: one chain per file
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = (
    "id", "pdb_id", "chain", "sequence", "length", "file", "resolution", "method", "origin", "error",
)  # fmt: skip


def write_manifest(df, out_dir: Path) -> Path:
    """Write ``out_dir/manifest.parquet`` (the columns of ``MANIFEST_COLUMNS``) atomically."""
    import polars as pl

    df = df.select([pl.col(c) for c in MANIFEST_COLUMNS])
    dest = out_dir / MANIFEST
    tmp = dest.with_name(dest.name + ".tmp")
    df.write_parquet(tmp)
    os.replace(tmp, dest)
    return dest


def read_manifest(raw_dir: Path):
    """The manifest of a raw folder as a polars DataFrame (FileNotFoundError names the step)."""
    import polars as pl

    path = Path(raw_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the pdb download (remote) or build_embedded step first"
        )
    return pl.read_parquet(path)
