"""GEOM-drugs for voxel denoising: sources, download, embedded GFN2 build, trust, reader, preprocessing.

One module per concern: :mod:`.config` (sources, trust pins, options), :mod:`.fetch` (the
download step), :mod:`.build` (the embedded archive), :mod:`.trust` (no pickle is unpickled
before its checksum verifies, or an explicit opt-in), :mod:`.read` (streamed, sandboxed
records), :mod:`.preprocess` (records -> store).
"""

from equipipe.data.geom.build import build_embedded
from equipipe.data.geom.config import (
    ARCHIVE,
    ARCHIVE_SOURCE_JSON,
    DEFAULTS,
    MANIFEST,
    MIDI_SPLITS,
    RDKIT_FOLDER_ID,
    SOURCES,
    max_radius_allowed,
    resolve_config,
    smiles_hash,
)
from equipipe.data.geom.fetch import download
from equipipe.data.geom.preprocess import preprocess
from equipipe.data.geom.read import conformer_record, iter_rdkit_folder
from equipipe.data.geom.trust import CorruptFileError, UntrustedPickleError, member_verifier

__all__ = [
    "ARCHIVE",
    "ARCHIVE_SOURCE_JSON",
    "DEFAULTS",
    "MANIFEST",
    "MIDI_SPLITS",
    "RDKIT_FOLDER_ID",
    "SOURCES",
    "CorruptFileError",
    "UntrustedPickleError",
    "build_embedded",
    "conformer_record",
    "download",
    "iter_rdkit_folder",
    "max_radius_allowed",
    "member_verifier",
    "preprocess",
    "resolve_config",
    "smiles_hash",
]
