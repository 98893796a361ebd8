"""Errors a person can act on: the ``equipipe`` command shows them as one line, no traceback.

Raise a subclass of :class:`ActionableError` when the message names the file (or address)
concerned and says what to do about it; :func:`equipipe.cli.main` prints
``equipipe <command>: error: <message>`` and exits with status 2. ``equipipe --debug ...`` or
``EQUIPIPE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os

DEBUG_ENV = "EQUIPIPE_DEBUG"


class ActionableError(RuntimeError):
    """Base class of errors whose message names the file concerned and what to do.

    ``advice`` (a class attribute) is what to do in general; :func:`one_line` appends it to a
    message that does not already say it (does not contain the advice's first word).
    """

    advice = ""


def debug_requested(flag: bool = False) -> bool:
    """True when ``--debug`` was given or ``EQUIPIPE_DEBUG`` is set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a KeyError's quotes removed), with its advice."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    message = " ".join(str(text).split())
    advice = getattr(exc, "advice", "")
    if advice and advice.split()[0].lower() not in message.lower():
        message = f"{message.rstrip('.')}; {advice}"
    return message
