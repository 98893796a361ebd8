"""PDB C-alpha chains for flow matching: sources, download, embedded set, reader, preprocessing.

Sources (``SOURCES``): ``remote``, the wwPDB metadata filtered first, then the selected mmCIF
files from RCSB or a local mirror (:mod:`.fetch`, :mod:`.metadata`); ``embedded``, real chains
of the ``mdanalysistests`` sdist (:mod:`.build`). Both write the raw layout of :mod:`.manifest`;
:mod:`.read` extracts C-alpha chains (one selection rule, two backends) and :mod:`.preprocess`
writes the store. Options and their defaults: :mod:`.config` and the schema.
"""

from equipipe.data.pdb.build import build_embedded
from equipipe.data.pdb.config import BACKENDS, DEFAULTS, METHODS, SOURCES, resolve_config
from equipipe.data.pdb.fetch import divided_path, download, structure_url
from equipipe.data.pdb.manifest import MANIFEST, MANIFEST_COLUMNS, read_manifest
from equipipe.data.pdb.metadata import select_chains
from equipipe.data.pdb.preprocess import preprocess
from equipipe.data.pdb.read import (
    ONE_LETTER,
    CAChain,
    StructureError,
    chain_arrays,
    read_bytes,
    read_ca_chains,
    select_residues,
)

__all__ = [
    "BACKENDS",
    "DEFAULTS",
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "METHODS",
    "ONE_LETTER",
    "SOURCES",
    "CAChain",
    "StructureError",
    "build_embedded",
    "chain_arrays",
    "divided_path",
    "download",
    "preprocess",
    "read_bytes",
    "read_ca_chains",
    "read_manifest",
    "resolve_config",
    "select_chains",
    "select_residues",
    "structure_url",
]
