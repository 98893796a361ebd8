"""A byte-bounded cache for model-independent evaluation inputs.

An evaluation re-seeds its generator, so every evaluation of a run draws the same noise seeds
and rotations and builds the same inputs (e.g. the denoising task's noise fields and clean
density grids). Those inputs do not depend on the model and can be kept across evaluations.

The budget is in bytes and the policy is *first come, first kept*: entries are stored until the
next one would exceed the budget, and then nothing more is stored (nothing is evicted). An
evaluation revisits the same keys in the same order every time, so an LRU that cannot hold
them all would evict each entry just before its reuse and never hit; keeping the first ones
makes the hit rate the budget's share of the inputs.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any


class BoundedCache:
    """dict-like store of values with a size in bytes, holding at most ``max_bytes``.

    Args:
        max_bytes: budget for the values' ``nbytes`` (plus the keys' length when they are
            bytes); 0 disables the cache.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._data: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Any | None:
        """The stored value, or None (counted as a hit or a miss)."""
        value = self._data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Store ``value`` (of ``nbytes`` bytes) unless that would exceed the budget."""
        if key in self._data:
            return True
        size = int(nbytes) + _key_bytes(key)
        if self.nbytes + size > self.max_bytes:
            return False
        self._data[key] = value
        self.nbytes += size
        return True

    def clear(self) -> None:
        self._data.clear()
        self.nbytes = 0


def _key_bytes(key: Hashable) -> int:
    if isinstance(key, bytes):
        return len(key)
    if isinstance(key, tuple):
        return sum(_key_bytes(k) for k in key)
    return 0
