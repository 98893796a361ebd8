"""The dataset block a data step receives, and the flat option dict a dataset module reads.

Wiring contract (``rules/common.smk``, ``equipipe download|preprocess|build-embedded``): a step
receives the validated dataset block ``config["datasets"][<dataset>]`` as JSON, never a
hand-picked part of it, minus ``split`` and ``subsets`` (their own steps) and minus the sections
the step does not read (so that changing them does not rerun it, see :data:`STEP_SECTIONS`)::

    {"source": "maceoff23", "download_dir": "/data/maceoff",
     "download": {...}, "embedded": {...}, "preprocess": {...}}

A dataset module turns it into one flat dict of options with :func:`options`: the top-level
keys (``source``, ``download_dir``, ...) followed by the named sections, later ones winning, so
the step's own section is named last. ``source`` therefore always comes from the config: a
module's default source never applies to a configured dataset.

A flat dict (no section key holding a dict) is returned unchanged: unit tests and Python
callers may pass options directly.
"""

from __future__ import annotations

from typing import Any

SECTIONS = ("download", "embedded", "preprocess")

# Which sections each step's command receives (the rest of the block is dropped by the rule).
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "build_embedded": ("embedded",),
    "download": ("download",),
    "preprocess": SECTIONS,
}
# Datasets whose step also reads another section: the PDB download filters chains by the
# preprocess filters (length, resolution, method) before fetching any structure.
EXTRA_SECTIONS: dict[tuple[str, str], tuple[str, ...]] = {("pdb", "download"): ("preprocess",)}


def step_block(block: dict[str, Any], step: str, dataset: str = "") -> dict[str, Any]:
    """The part of a validated dataset block that ``step``'s command receives.

    ``block``: ``config["datasets"][dataset]``; ``step``: a key of :data:`STEP_SECTIONS`.
    """
    keep = {*STEP_SECTIONS[step], *EXTRA_SECTIONS.get((dataset, step), ())}
    return {
        k: v
        for k, v in block.items()
        if k not in ("split", "subsets") and (k not in SECTIONS or k in keep)
    }


def is_block(cfg: dict[str, Any] | None) -> bool:
    """True when ``cfg`` is a dataset block (has a section holding a dict), not flat options."""
    return any(isinstance((cfg or {}).get(s), dict) for s in SECTIONS)


def options(cfg: dict[str, Any] | None, *sections: str) -> dict[str, Any]:
    """Flat options of a dataset block: top-level keys, then ``sections`` in order.

    A key set in a later section overrides the same key of an earlier one (name the step's own
    section last). Sections not named are ignored. Flat options are returned as a copy.
    """
    cfg = dict(cfg or {})
    if not is_block(cfg):
        return cfg
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown dataset block section(s) {unknown}; allowed: {SECTIONS}")
    out = {k: v for k, v in cfg.items() if k not in SECTIONS}
    for s in sections:
        out.update(cfg.get(s) or {})
    return out
