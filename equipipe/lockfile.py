"""Read the locked environment (``lock/requirements.txt``, written by ``make lock``).

The lock is a pip requirements file with one ``name==version`` per package, each followed by
``--hash=sha256:...`` options (continued lines) and ``# via`` comments.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LockEntry", "lock_hash", "read_lock"]

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


@dataclass
class LockEntry:
    name: str
    version: str
    hashes: list[str] = field(default_factory=list)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, LockEntry]:
    """Entries of a hashed requirements file, keyed by canonical (PEP 503) package name.

    Raises ValueError on a requirement line that is not an exact ``==`` pin.
    """
    text = Path(path).read_text().replace("\\\n", " ")
    out: dict[str, LockEntry] = {}
    for raw in text.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"{path}: not an exact pin: {line[:80]!r}")
        name = _canonical(m.group(1))
        out[name] = LockEntry(name, m.group(3).rstrip(" ;"), _HASH.findall(line))
    return out


def lock_hash(path: str | Path) -> str:
    """sha256 of the lock file's bytes (hex)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
