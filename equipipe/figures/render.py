"""Draw a figure spec with its kind and write it as PNG, PDF and SVG.

Entry point::

    make_figure(spec, metrics, runs, out_prefix, extra=None) -> matplotlib.figure.Figure

``spec``, ``metrics``, ``runs``, ``extra``: see ``equipipe.figures.data``; ``out_prefix``:
writes ``<out_prefix>.png``, ``.pdf`` and ``.svg``. Figures use matplotlib's object API
(``Figure``, no pyplot state) under ``style.RC``; PNG is rendered by Agg.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import polars as pl
from matplotlib.figure import Figure

from equipipe.figures.data import FigureContext
from equipipe.figures.registry import KINDS
from equipipe.figures.style import RC

FORMATS = ("png", "pdf", "svg")


def build_figure(
    spec: dict,
    metrics: pl.DataFrame,
    runs: dict[str, dict],
    extra: dict[str, Path] | None = None,
) -> Figure:
    """Draw ``spec`` and return the Figure without writing files (under ``style.RC``)."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; known kinds: {sorted(KINDS)}")
    ctx = FigureContext(spec=spec, metrics=metrics, runs=runs or {}, extra=dict(extra or {}))
    with matplotlib.rc_context(RC):
        return KINDS[kind](ctx)


def make_figure(
    spec: dict,
    metrics: pl.DataFrame,
    runs: dict[str, dict],
    out_prefix: Path,
    extra: dict[str, Path] | None = None,
) -> Figure:
    """Render ``spec`` to ``<out_prefix>.png/.pdf/.svg``; returns the Figure."""
    fig = build_figure(spec, metrics, runs, extra)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(RC):
        for i, fmt in enumerate(FORMATS):
            fig.savefig(out_prefix.with_name(f"{out_prefix.name}.{fmt}"), format=fmt)
            if i == 0:
                # Constrained layout has placed everything; keep those positions for the
                # other formats instead of solving the layout again (the costly part).
                fig.set_layout_engine("none")
    return fig
