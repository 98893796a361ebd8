"""SPICE force-field data: sources, download, embedded GFN2 build, one reader, preprocessing.

One module per concern: :mod:`.config` (sources, release pins, options), :mod:`.fetch` (the
download step), :mod:`.build` (the embedded GFN2-xTB file), :mod:`.read` (HDF5 and extended-XYZ
records), :mod:`.preprocess` (records -> store). The pipeline's steps call :func:`download`,
:func:`build_embedded` and :func:`preprocess` (``equipipe download|build-embedded|preprocess``).
"""

from equipipe.data.spice.build import build_embedded
from equipipe.data.spice.config import DEFAULTS, EMBEDDED_FILE, SOURCES, pins
from equipipe.data.spice.fetch import download
from equipipe.data.spice.preprocess import preprocess
from equipipe.data.spice.read import (
    FORCE_UNIT,
    CorruptFileError,
    check_record,
    count_extxyz_frames,
    parse_extxyz_comment,
    read_records,
)

__all__ = [
    "DEFAULTS",
    "EMBEDDED_FILE",
    "FORCE_UNIT",
    "SOURCES",
    "CorruptFileError",
    "build_embedded",
    "check_record",
    "count_extxyz_frames",
    "download",
    "parse_extxyz_comment",
    "pins",
    "preprocess",
    "read_records",
]
