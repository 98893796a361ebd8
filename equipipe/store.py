"""Ragged-array dataset store: one folder per dataset.

Layout::

    store/
      meta.json            {"per_atom": [...], "per_example": [...], "dtypes": {...}, "n": N, ...}
      offsets.npy          int64 (N + 1,): example i owns rows offsets[i]:offsets[i+1]
      atom_<name>.npy      per-atom (or per-residue) arrays concatenated along axis 0
      example_<name>.npy   per-example arrays, one row per example
      index.parquet        one row per example: id, key (molecule / cluster), n_atoms, source fields
      quarantine.parquet   id, reason (+ source fields): bad records, never silently dropped

Arrays are opened with memory mapping, so loading a subset is indexing, not copying files.
The writer streams to temporary files in ``<store>.partial`` and lands the folder at ``close``.
Used as a context manager it cleans up after itself: an exception inside the ``with`` block (a
corrupt raw file, an interrupt) or while landing removes ``<store>.partial``; only a store that
fails the ``max_bad_fraction`` check keeps it, so that its ``quarantine.parquet`` can be read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from equipipe.errors import ActionableError


class TooManyBadRecords(ActionableError):
    """More than the configured fraction of records were quarantined."""


class StoreWriter:
    """Stream examples into a store folder.

    ``per_atom`` names arrays whose first axis is the example's atom/residue count;
    ``per_example`` names arrays stored once per example (scalars or fixed shapes).
    Use as a context manager; ``close`` writes everything and checks the bad fraction.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        per_atom: Sequence[str],
        per_example: Sequence[str] = (),
        max_bad_fraction: float = 0.5,
        attrs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.per_atom = tuple(per_atom)
        self.per_example = tuple(per_example)
        self.max_bad_fraction = max_bad_fraction
        self.attrs = dict(attrs or {})
        self.tmp = self.path.with_name(self.path.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._atom_files = {k: open(self.tmp / f"atom_{k}.bin", "wb") for k in self.per_atom}
        self._atom_meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._example_rows: dict[str, list[np.ndarray]] = {k: [] for k in self.per_example}
        self._counts: list[int] = []
        self._index: list[dict[str, Any]] = []
        self._bad: list[dict[str, Any]] = []
        self._ids: set[str] = set()

    def add(self, id: str, key: str, arrays: dict[str, np.ndarray], **fields: Any) -> None:
        """Append one example. ``arrays`` must hold every per-atom and per-example name."""
        if id in self._ids:
            raise ValueError(f"duplicate example id {id!r}")
        n = None
        for k in self.per_atom:
            a = np.ascontiguousarray(arrays[k])
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"{id}: per-atom array {k!r} has {a.shape[0]} rows, expected {n}")
            meta = (a.dtype.str, a.shape[1:])
            if self._atom_meta.setdefault(k, meta) != meta:
                raise ValueError(f"{id}: array {k!r} changed dtype/shape to {meta}")
            self._atom_files[k].write(a.tobytes())
        for k in self.per_example:
            self._example_rows[k].append(np.asarray(arrays[k]))
        self._ids.add(id)
        self._counts.append(int(n or 0))
        self._index.append({"id": id, "key": key, "n_atoms": int(n or 0), **fields})

    def quarantine(self, id: str, reason: str, **fields: Any) -> None:
        """Record a bad record with a reason (it is not added to the store)."""
        self._bad.append(
            {"id": str(id), "reason": str(reason), **{k: str(v) for k, v in fields.items()}}
        )

    @property
    def n_good(self) -> int:
        return len(self._counts)

    def close(self) -> None:
        for f in self._atom_files.values():
            f.close()
        total = len(self._counts) + len(self._bad)
        bad_frac = len(self._bad) / total if total else 0.0
        quarantine = (
            pl.DataFrame(self._bad, schema_overrides={"id": pl.String, "reason": pl.String})
            if self._bad
            else pl.DataFrame(schema={"id": pl.String, "reason": pl.String})
        )
        quarantine.write_parquet(self.tmp / "quarantine.parquet")
        if not self._counts or bad_frac > self.max_bad_fraction:
            reasons = (
                quarantine.group_by("reason").len().sort("len", descending=True).head(5).rows()
                if self._bad
                else []
            )
            raise TooManyBadRecords(
                f"{len(self._bad)} of {total} records quarantined ({bad_frac:.1%}) > allowed "
                f"max_bad_fraction={self.max_bad_fraction}; commonest reasons: {reasons}. "
                f"See {self.tmp / 'quarantine.parquet'}; raise max_bad_fraction in the dataset's "
                "config if this is expected."
            )
        offsets = np.zeros(len(self._counts) + 1, dtype=np.int64)
        np.cumsum(self._counts, out=offsets[1:])
        np.save(self.tmp / "offsets.npy", offsets)
        n_rows = int(offsets[-1])
        dtypes: dict[str, Any] = {}
        for k in self.per_atom:
            dtype, tail = self._atom_meta.get(k, ("<f4", ()))
            raw = np.fromfile(self.tmp / f"atom_{k}.bin", dtype=np.dtype(dtype)).reshape(
                (n_rows, *tail)
            )
            np.save(self.tmp / f"atom_{k}.npy", raw)
            os.remove(self.tmp / f"atom_{k}.bin")
            dtypes[k] = [dtype, list(tail)]
        for k in self.per_example:
            arr = np.stack(self._example_rows[k]) if self._example_rows[k] else np.zeros(0)
            np.save(self.tmp / f"example_{k}.npy", arr)
            dtypes[k] = [arr.dtype.str, list(arr.shape[1:])]
        pl.DataFrame(self._index).write_parquet(self.tmp / "index.parquet")
        meta = {
            "per_atom": list(self.per_atom),
            "per_example": list(self.per_example),
            "dtypes": dtypes,
            "n": len(self._counts),
            "n_quarantined": len(self._bad),
            **self.attrs,
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.close()
        except TooManyBadRecords:
            raise  # keeps <store>.partial/quarantine.parquet for inspection (named in the message)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the partial store (a failed or interrupted writer leaves nothing behind)."""
        for f in self._atom_files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Store:
    """Read-only view of a store folder; arrays are memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.offsets = np.load(self.path / "offsets.npy")
        self.index = pl.read_parquet(self.path / "index.parquet")
        self.atom = {
            k: np.load(self.path / f"atom_{k}.npy", mmap_mode="r") for k in self.meta["per_atom"]
        }
        self.example = {
            k: np.load(self.path / f"example_{k}.npy", mmap_mode="r")
            for k in self.meta["per_example"]
        }
        self._row_of = {id_: i for i, id_ in enumerate(self.index["id"].to_list())}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def quarantine(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "quarantine.parquet")

    def get(self, i: int) -> dict[str, np.ndarray]:
        """Example ``i`` (row of the index) as plain in-memory arrays."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {k: np.array(v[a:b]) for k, v in self.atom.items()}
        out.update({k: np.array(v[i]) for k, v in self.example.items()})
        return out

    def rows(self, ids: Iterable[str]) -> np.ndarray:
        """Index rows of the given example ids (KeyError names the first unknown id)."""
        try:
            return np.array([self._row_of[i] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"example id {e.args[0]!r} is not in the store {self.path}") from None

    def load(self, ids: Iterable[str]) -> list[dict[str, np.ndarray]]:
        """Examples for the given ids, in that order."""
        return [self.get(int(r)) for r in self.rows(ids)]
