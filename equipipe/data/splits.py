"""Molecule-/cluster-level splits and nested training subsets.

Splits group examples by the store's ``key`` column (molecule, SMILES group, sequence
cluster) so no key lands in two splits; a key's split comes from a seeded stable hash, so it
does not depend on the order of the store or on the other keys. Training subsets are nested:
every subset is a prefix of one seeded ranking of the training examples (of their keys, for a
count of ``molecules``), so 500 ⊂ 5k ⊂ 50k ⊂ all and adding a size later writes one small id
list and changes nothing else. A subset larger than the training split is an error, not the
whole split.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import polars as pl

UNITS = ("conformers", "chains", "molecules", "examples", "fraction")


def stable_hash(text: str, seed: int) -> float:
    """Deterministic hash of ``text`` with ``seed`` to a float in [0, 1)."""
    h = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def assign_splits(keys: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each distinct key to a split name by cumulative fraction of its hash value.

    Fractions are normalised; order of the dict is the order of the intervals. Every split with
    a positive fraction receives at least one key when there are enough keys.
    """
    names = [n for n, f in fractions.items() if f > 0]
    if not names:
        raise ValueError(f"split fractions {fractions} are all zero")
    total = sum(fractions[n] for n in names)
    ranked = sorted(set(keys), key=lambda k: stable_hash(k, seed))
    n = len(ranked)
    # Allocate by counts of keys (largest remainder), at least one per split where possible.
    raw = [fractions[name] / total * n for name in names]
    counts = [max(1, math.floor(r)) if n >= len(names) else math.floor(r) for r in raw]
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    order = sorted(range(len(names)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < n:
        counts[order[i % len(order)]] += 1
        i += 1
    out: dict[str, str] = {}
    start = 0
    for name, c in zip(names, counts):
        for key in ranked[start : start + c]:
            out[key] = name
        start += c
    return out


def make_split(
    index: pl.DataFrame,
    fractions: dict[str, float],
    seed: int,
    predefined: dict[str, Any] | None = None,
) -> pl.DataFrame:
    """One row per example: id, key, n_atoms, split, rank (seeded order for nested subsets).

    ``predefined = {"column": "source", "values": {"maceoff23/train": "train", ...}}`` keeps a
    release's own split (e.g. MACE-OFF23's train/test files) instead of hashing keys; examples
    whose value is not listed are split by ``fractions`` as usual.
    """
    mapping = assign_splits(index["key"].cast(pl.String).to_list(), fractions, seed)
    hashed = pl.col("key").replace_strict(mapping, return_dtype=pl.String)
    if predefined:
        column, values = predefined["column"], predefined["values"]
        if column not in index.columns:
            raise ValueError(
                f"split.predefined.column {column!r} is not an index column; allowed: {index.columns}"
            )
        given = (
            pl.col(column)
            .cast(pl.String)
            .replace_strict(values, default=None, return_dtype=pl.String)
        )
        hashed = pl.coalesce(given, hashed)
    df = (
        index.with_columns(pl.col("key").cast(pl.String))
        .select("id", "key", "n_atoms", hashed.alias("split"))
        .with_columns(
            pl.col("id")
            .map_elements(lambda s: stable_hash(s, seed + 1), return_dtype=pl.Float64)
            .alias("rank"),
        )
    )
    return df.sort("rank")


def subset_size(size: float | int, unit: str, n_available: int, name: str = "subset") -> int:
    """Number of units of subset ``name``: a count in ``unit``, or a fraction of ``n_available``.

    A count above ``n_available`` is refused (naming the subset, the unit and what there is),
    never clamped to the whole split.
    """
    if unit not in UNITS:
        raise ValueError(f"subset {name!r}: unit {unit!r} is not one of {UNITS}")
    if unit == "fraction":
        if not 0 < size <= 1:
            raise ValueError(f"subset {name!r}: a fraction needs 0 < size <= 1, got {size}")
        n = math.ceil(size * n_available)
    else:
        n = int(size)
    if n < 1:
        raise ValueError(f"subset {name!r}: size {size} {unit} selects no example")
    if n > n_available:
        raise ValueError(
            f"subset {name!r} asks for {n} {unit} but the training split has only {n_available} "
            f"{unit}; lower its size, or give it as a fraction (unit: fraction)"
        )
    return n


def make_subset(
    split: pl.DataFrame, size: float | int, unit: str, name: str = "subset"
) -> pl.DataFrame:
    """Ids of a nested training subset, in the split's seeded rank order.

    ``conformers``, ``chains``, ``examples``: the first n training rows. ``molecules``: every
    training row of the first n distinct keys (ranked by their first row), so "10 molecules"
    is 10 molecules with all their conformers. ``fraction``: the first ceil(size * rows) rows.
    A smaller subset of a unit is always contained in a larger one of the same unit.
    """
    train = split.filter(pl.col("split") == "train").sort("rank")
    if train.height == 0:
        raise ValueError(f"subset {name!r}: the split has no training examples")
    if unit == "molecules":
        keys = train["key"].unique(maintain_order=True)
        chosen = keys.head(subset_size(size, unit, keys.len(), name))
        return train.filter(pl.col("key").is_in(chosen.implode())).select("id")
    n = subset_size(size, unit, train.height, name)
    return train.head(n).select("id")


def write_split(
    store_dir: Path,
    out: Path,
    fractions: dict[str, float],
    seed: int,
    predefined: dict | None = None,
) -> None:
    """CLI helper: read the store index, write ``split.parquet``."""
    index = pl.read_parquet(Path(store_dir) / "index.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    make_split(index, fractions, seed, predefined).write_parquet(out)


def write_subset(
    split_file: Path, out: Path, size: float | int, unit: str, name: str | None = None
) -> None:
    """CLI helper: write one subset's id list (``name`` for messages; default: ``out``'s stem)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_subset(pl.read_parquet(split_file), size, unit, name or out.stem).write_parquet(out)
