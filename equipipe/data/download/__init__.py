"""The one downloader for every remote source: resumable, verified, atomic.

Every file that a pipeline rule downloads goes through :func:`fetch` (or :func:`fetch_many`);
the modules of this package hold one concern each:

- :mod:`.policy`: which addresses may be contacted (https only, plain http to loopback only;
  private, link-local and reserved addresses refused before any socket opens, redirects
  included; ``EQUIPIPE_DOWNLOAD_ALLOW`` lists trusted ``host:port`` exceptions).
- :mod:`.transfer`: one resumable transfer into ``<dest>.partial`` (HTTP ``Range``), verified,
  then renamed into place; retries with backoff; a bounded pool for many files.
- :mod:`.verify`: size and md5 / sha256 checks, gzip integrity, a user's verified local copy.
- :mod:`.repositories`: Zenodo and Dataverse look-ups (URL, size, checksum of a file).
- :mod:`.remote`: :class:`RemoteFile` and :class:`DownloadError`.

Only the standard library speaks HTTP (``urllib``); ``tqdm`` draws the progress bars.
Where a finished file lands (the undeclared cache, hard links) is :mod:`equipipe.data.landing`.
"""

from equipipe.data.download.policy import ALLOW_ENV, address_refusal, check_url
from equipipe.data.download.remote import DownloadError, RemoteFile
from equipipe.data.download.repositories import dataverse_files, zenodo_file
from equipipe.data.download.transfer import fetch, fetch_many
from equipipe.data.download.verify import file_digest, use_local_copy, verify_gzip

__all__ = [
    "ALLOW_ENV",
    "DownloadError",
    "RemoteFile",
    "address_refusal",
    "check_url",
    "dataverse_files",
    "fetch",
    "fetch_many",
    "file_digest",
    "use_local_copy",
    "verify_gzip",
    "zenodo_file",
]
