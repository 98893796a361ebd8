"""Rule parameters as short content-addressed files, so plans and dry runs stay readable.

A rule's JSON slice of the config (a training spec, a dataset block, the whole config for the
archive) is written once to ``.snakemake/equipipe_params/<sha256>.json`` and the rule's param is
``@<that path>``. Snakemake records and compares the param as usual, so changing a setting
changes the hash and reruns exactly what depends on it, while a dry run's "reason: Params have
changed" line shows two short paths instead of two copies of the JSON. ``equipipe`` reads
``--cfg``/``--spec`` values that start with ``@`` from the file. The files are written while
Snakemake plans (every invocation, jobs included), by atomic rename, so they are always whole.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PARAMS_DIR = Path(".snakemake") / "equipipe_params"


def param_file(text: str, folder: Path = PARAMS_DIR) -> str:
    """``@<folder>/<sha256 of text>.json`` (relative to the working directory), written if new."""
    path = Path(folder) / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return f"@{path}"


def read_param(value: str) -> str:
    """The text of a param: read from the file for ``@path``, else the value itself."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"parameter file {path} is missing: Snakemake writes it when it plans the job; "
            "rerun snakemake from the workflow's working directory"
        ) from None
