"""Batches for one run: a training subset and held-out examples from a store.

Examples stay in the memory-mapped store; a batch is gathered and collated when asked for.
The training order is a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from equipipe.store import Store
from equipipe.tasks.base import Batch, Task


@dataclass
class RunData:
    store: Store
    train_rows: np.ndarray  # store rows of the training subset
    val_rows: np.ndarray  # store rows of the held-out examples used for evaluation
    batch_size: int
    seed: int
    per_key: bool = False  # each epoch: one random example per key (cluster), as Proteina samples

    def __post_init__(self) -> None:
        keys = self.store.index["key"].cast(str).to_numpy()[self.train_rows]
        order = np.argsort(keys, kind="stable")
        _, starts = np.unique(keys[order], return_index=True)
        self._groups = np.split(self.train_rows[order], starts[1:])  # rows of each key, key-sorted

    @classmethod
    def open(
        cls,
        store_dir: str | Path,
        split_file: str | Path,
        subset_file: str | Path,
        batch_size: int,
        seed: int,
        eval_split: str = "val",
        eval_examples: int | None = None,
        per_key: bool = False,
    ) -> RunData:
        store = Store(store_dir)
        split = pl.read_parquet(split_file)
        subset_ids = pl.read_parquet(subset_file)["id"].to_list()
        held = split.filter(pl.col("split") == eval_split).sort("rank")
        if held.height == 0:
            raise ValueError(f"split {split_file} has no {eval_split!r} examples to evaluate on")
        if eval_examples:
            held = held.head(eval_examples)
        train_rows, held_rows = store.rows(subset_ids), store.rows(held["id"].to_list())
        return cls(store, train_rows, held_rows, batch_size, seed, per_key)

    @property
    def n_train(self) -> int:
        return len(self.train_rows)

    @property
    def epoch_size(self) -> int:
        """Examples seen per epoch: all training examples, or one per key with ``per_key``."""
        return len(self._groups) if self.per_key else self.n_train

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_size / self.batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.per_key:
            picks = np.array([g[rng.integers(len(g))] for g in self._groups])
            return picks[rng.permutation(len(picks))]
        return self.train_rows[rng.permutation(self.n_train)]

    def train_examples(self, step: int) -> list[dict]:
        """Examples of training step ``step`` (0-based): epoch-wise seeded permutations."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        rows = self._epoch_order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return [self.store.get(int(r)) for r in rows]

    def train_sample(self, n: int) -> list[dict]:
        """Up to n training examples (seeded) for fitting normalisation statistics."""
        rng = np.random.default_rng([self.seed, 10**6])
        rows = (
            self.train_rows if self.n_train <= n else rng.choice(self.train_rows, n, replace=False)
        )
        return [self.store.get(int(r)) for r in rows]

    def val_batches(self, task: Task, batch_size: int) -> list[Batch]:
        """Held-out batches in a fixed order (the same at every evaluation)."""
        out = []
        for a in range(0, len(self.val_rows), batch_size):
            rows = self.val_rows[a : a + batch_size]
            out.append(task.collate([self.store.get(int(r)) for r in rows]))
        return out
