"""A restricted unpickler for molecule pickles: RDKit molecules and plain data only.

Unpickling runs whatever callables a pickle names, so an untrusted pickle can run arbitrary
code (``os.system`` through ``__reduce__``). :class:`RestrictedUnpickler` resolves only the
globals listed below; any other global, persistent id or extension code raises
:class:`RefusedPickle` *before* anything is called.

Admitted:

- ``rdkit.Chem.rdchem.Mol`` — called only with RDKit's binary molecule string (bytes/str);
- ``_codecs.encode(str, "latin1")`` — how protocol-2 pickles spell bytes;
- ``builtins`` set, frozenset, bytearray, complex; ``collections.OrderedDict``;
- NumPy scalars and arrays (``numpy[._core].multiarray.scalar`` / ``_reconstruct``,
  ``numpy.dtype``, ``numpy.ndarray``, protocol-5 ``_frombuffer``) — plain numeric data some pickles carry.

Dicts, lists, tuples, str, bytes, numbers, bool and None need no globals at all.

This is the second line of defence: DESIGN.md's contract is to unpickle only files whose
checksum matches a published or pinned one, and to use this loader for files with none (the
MiDi mirror) only when the user opts in.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list; nothing was executed."""


def _rdkit_mol(*args: Any):
    """``rdkit.Chem.rdchem.Mol`` restricted to its pickle form: one binary string."""
    if len(args) != 1 or not isinstance(args[0], bytes | bytearray | str):
        raise RefusedPickle(
            "rdkit.Chem.rdchem.Mol may only be rebuilt from its binary string, got "
            f"{[type(a).__name__ for a in args]}"
        )
    from rdkit.Chem import rdchem

    data = args[0]
    if isinstance(data, str):
        data = data.encode("latin1")
    return rdchem.Mol(bytes(data))


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to the latin-1 str -> bytes step of protocol-2 pickles."""
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "") not in ("latin1", "utf8"):
        raise RefusedPickle(f"_codecs.encode only admits str with latin-1, got {encoding!r}")
    return obj.encode(encoding, errors)


def _numpy_global(name: str):
    import numpy as np

    if name == "dtype":
        return np.dtype
    if name == "ndarray":
        return np.ndarray
    try:  # NumPy 2 moved numpy.core to numpy._core; both names appear in old pickles
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric
    return getattr(numeric if name == "_frombuffer" else multiarray, name)


_BUILTINS = {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex}
_NUMPY = {
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
}

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("rdkit.Chem.rdchem", "Mol"), ("_codecs", "encode"), ("collections", "OrderedDict")}
    | {("builtins", n) for n in _BUILTINS}
    | {("__builtin__", n) for n in _BUILTINS}
    | _NUMPY
)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickle(
                f"refused global {module}.{name}: this loader admits only RDKit molecules and "
                "plain data (see equipipe/data/safe_pickle.py)"
            )
        if module == "rdkit.Chem.rdchem":
            return _rdkit_mol
        if module == "_codecs":
            return _codecs_encode
        if module == "collections":
            from collections import OrderedDict

            return OrderedDict
        if module in ("builtins", "__builtin__"):
            return _BUILTINS[name]
        return _numpy_global(name)

    def persistent_load(self, pid):
        del pid  # every persistent id is refused
        raise RefusedPickle("refused persistent id: this loader admits only plain data")


def loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (raises :class:`RefusedPickle`)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load(file: IO[bytes]) -> Any:
    """Unpickle from a binary file object with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(file).load()
