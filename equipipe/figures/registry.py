"""The figure kinds by name: ``KINDS`` and the ``register_kind`` decorator that fills it.

A kind is a function ``fn(ctx: FigureContext) -> matplotlib.figure.Figure``. The kind modules
of this package register theirs when ``equipipe.figures`` imports them (explicitly, in its
``__init__``); a test or an outside module may register one more the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from equipipe.figures.data import FigureContext

KindFn = Callable[["FigureContext"], "Figure"]
KINDS: dict[str, KindFn] = {}


def register_kind(name: str) -> Callable[[KindFn], KindFn]:
    """Decorator: register ``fn(ctx: FigureContext) -> Figure`` as figure kind ``name``."""

    def deco(fn: KindFn) -> KindFn:
        if name in KINDS and KINDS[name] is not fn:
            raise ValueError(f"figure kind {name!r} is already registered ({KINDS[name]})")
        KINDS[name] = fn
        return fn

    return deco
