"""Figures: one function per figure KIND, driven by a spec from the config.

Entry point: ``make_figure(spec, metrics, runs, out_prefix, extra=None)`` (``render``), called by
``equipipe figure`` (rules/figures.smk). The package, one job per module:

* ``registry``: ``KINDS`` (name -> kind function) and ``register_kind``;
* ``data``: ``FigureContext``, what a kind reads (spec, metrics, run facts, analysis folders)
  and the selection of rows (one split, never another: a missing split is an error);
* ``style``: rc, palette, labels and the axes helpers shared by the kinds; ``bands``: the
  ±1 standard-error bands of the pct curves;
* ``render``: ``build_figure`` / ``make_figure``;
* the kinds, grouped by what they show: ``curves`` (pct and loss-decomposition curves),
  ``mechanism`` (gradient-norm ratio, force-head deviation), ``spectrum`` (error per irrep,
  hidden-layer ℓ content), ``analyses`` (loss landscape, test-time twirling, decay rates, Hessian spectral densities), ``md`` (rotated-start
  MD deviation), ``efficiency`` (the efficiency gap).

The kind modules are imported here, explicitly; importing them registers their kinds.
"""

from equipipe.figures import analyses, curves, efficiency, md, mechanism, spectrum
from equipipe.figures.data import FigureContext, MissingSplitError
from equipipe.figures.registry import KINDS, register_kind
from equipipe.figures.render import FORMATS, build_figure, make_figure

__all__ = [
    "FORMATS",
    "KINDS",
    "FigureContext",
    "MissingSplitError",
    "analyses",
    "build_figure",
    "curves",
    "efficiency",
    "make_figure",
    "md",
    "mechanism",
    "register_kind",
    "spectrum",
]
