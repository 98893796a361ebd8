"""Whether a GEOM pickle may be unpickled: checked against a published or pinned checksum first.

The whole archive's md5 against the Dataverse value (or ``rdkit_folder_md5``), each embedded
member's sha256 against the build's manifest, each MiDi file against ``midi_sha256``; without
any of these a pickle is refused unless ``allow_unverified_pickles`` opts in. Even a verified
pickle is read by the restricted unpickler (:mod:`equipipe.data.safe_pickle`) in sandboxed
children (:mod:`equipipe.data.pickle_sandbox`), see :mod:`equipipe.data.geom.read`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from equipipe.data.download import file_digest
from equipipe.data.geom.config import ARCHIVE, ARCHIVE_SOURCE_JSON, MANIFEST, sha256_hex
from equipipe.errors import ActionableError

log = logging.getLogger(__name__)


class UntrustedPickleError(ActionableError):
    """A pickle without a matching published/pinned checksum, and no explicit opt-in."""


class CorruptFileError(ActionableError):
    """A raw file is truncated or does not match its checksum: never preprocessed."""

    advice = "delete the file and download (or build) it again"


def member_verifier(raw_dir: Path, cfg: dict) -> tuple[str, Callable[[str, bytes], None] | None]:
    """How the pickles of ``raw_dir/rdkit_folder.tar.gz`` are trusted, checked BEFORE reading.

    Returns (description, per-member check or None). Order: an embedded manifest (per-member
    sha256); else the archive's md5 against ``rdkit_folder_md5`` (pinned) or the API's value
    recorded at download; else refused, unless ``allow_unverified_pickles``.

    Raises:
        CorruptFileError: the archive does not match its published/pinned checksum.
        UntrustedPickleError: nothing to verify against and no opt-in.
    """
    raw_dir = Path(raw_dir)
    archive = raw_dir / ARCHIVE
    manifest_path = raw_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        pinned = manifest.get("members") or {}
        if (
            manifest.get("archive_sha256")
            and file_digest(archive, "sha256") != manifest["archive_sha256"]
        ):
            raise CorruptFileError(
                f"{archive} does not match the sha256 pinned in {manifest_path}: rebuild it "
                "(build_embedded) - it is never unpickled"
            )

        def check(name: str, data: bytes) -> None:
            if pinned.get(name) != sha256_hex(data):
                raise UntrustedPickleError(
                    f"{archive}:{name} is not pinned in {manifest_path} (or its sha256 differs)"
                )

        return f"embedded manifest {manifest_path.name} (per-member sha256)", check
    md5 = cfg.get("rdkit_folder_md5")
    origin = "config pin rdkit_folder_md5"
    source_json = raw_dir / ARCHIVE_SOURCE_JSON
    if not md5 and source_json.is_file():
        md5 = json.loads(source_json.read_text()).get("md5")
        origin = f"md5 published by the Dataverse API (recorded in {source_json.name})"
    if md5:
        _check_digest(archive, "md5", md5, f"the {origin} is")
        return f"archive md5 matches the {origin}", None
    refusal = (
        f"{archive} has no published or pinned checksum to verify (no {MANIFEST}, no "
        f"{ARCHIVE_SOURCE_JSON}, no rdkit_folder_md5): refusing to unpickle it. Download it "
        "with the 'geom-rdkit' source, pin rdkit_folder_md5, or set allow_unverified_pickles: true"
    )
    return _unverified(archive, cfg, refusal), None


def verify_midi_file(path: Path, split: str, cfg: dict) -> str:
    """How a MiDi pickle is trusted (its sha256 against ``midi_sha256``), checked BEFORE reading."""
    pin = (cfg["midi_sha256"] or {}).get(split)
    if pin:
        _check_digest(path, "sha256", pin, f"midi_sha256[{split!r}] pins")
        return "sha256 matches the config pin"
    refusal = (
        f"{path}: the MiDi mirror publishes no checksum, so this pickle cannot be verified and is "
        "refused. Pin its sha256 in midi_sha256, or opt in with allow_unverified_pickles: true "
        "(it is then read with the restricted unpickler: RDKit molecules and plain data only)"
    )
    return _unverified(path, cfg, refusal)


def _check_digest(path: Path, algo: str, want: str, pinned: str) -> None:
    """CorruptFileError unless ``path``'s ``algo`` digest is ``want`` (``pinned`` says by whom)."""
    actual = file_digest(path, algo)
    if actual != str(want).lower():
        raise CorruptFileError(
            f"{path} has {algo} {actual}, {pinned} {want}: truncated or tampered - delete it "
            "and download it again (it is never unpickled)"
        )


def _unverified(path: Path, cfg: dict, refusal: str) -> str:
    """The opt-in for a pickle with nothing to verify against: refused (``refusal``) without
    ``allow_unverified_pickles``, else a warning and the description the store records."""
    if not cfg["allow_unverified_pickles"]:
        raise UntrustedPickleError(refusal)
    log.warning(
        "%s: no published or pinned checksum; unpickling it anyway (allow_unverified_pickles: "
        "true; restricted unpickler: RDKit molecules and plain data only)",
        path,
    )
    return "UNVERIFIED (allow_unverified_pickles: true; restricted unpickler)"
