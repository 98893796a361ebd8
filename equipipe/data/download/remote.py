"""What a remote file must look like once downloaded, and the error when it cannot be had."""

from __future__ import annotations

import re
from dataclasses import dataclass

from equipipe.errors import ActionableError

_HEX = re.compile(r"^[0-9a-f]+$")


class DownloadError(ActionableError):
    """A download (or the metadata look-up before it) failed for good.

    ``url`` is the address concerned; nothing is left at the destination path.
    """

    advice = "check the address and the network connection, then rerun the job"

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class RemoteFile:
    """A remote file and what it must look like once downloaded.

    ``size`` in bytes; ``md5`` / ``sha256`` as lower-case hex digests; ``name`` a display name
    (the repository's file name), also used as the progress bar label.
    """

    url: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.size is not None and (not isinstance(self.size, int) or self.size < 0):
            raise ValueError(f"RemoteFile.size must be a non-negative int, got {self.size!r}")
        for algo, length in (("md5", 32), ("sha256", 64)):
            value = getattr(self, algo)
            if value is None:
                continue
            norm = value.strip().lower()
            if len(norm) != length or not _HEX.match(norm):
                raise ValueError(f"RemoteFile.{algo} must be {length} hex digits, got {value!r}")
            object.__setattr__(self, algo, norm)
