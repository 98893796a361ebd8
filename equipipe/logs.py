"""Logging of the ``equipipe`` command, configured once at its entry (``equipipe.cli.main``).

Every module logs through ``logging.getLogger(__name__)``; this module gives the ``equipipe``
logger one handler on standard error, so a rule's ``2> {log}`` puts the messages in the job's
log (``logs/train/{experiment}/seed{seed}.log`` for a training run). One line per message:
``2026-12-02 00:40:01 INFO equipipe.train: step 100/500 ...``.

The level comes from ``equipipe --log-level LEVEL``, else the environment variable
``EQUIPIPE_LOG_LEVEL``, else INFO. Other libraries' loggers are left alone (Python's default:
their warnings and errors only).
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "EQUIPIPE_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_level(flag: str | None = None) -> str:
    """The level name from the flag, else ``EQUIPIPE_LOG_LEVEL``, else INFO (upper case)."""
    name = (flag or os.environ.get(LEVEL_ENV) or "INFO").strip().upper()
    if name not in LEVELS:
        source = "--log-level" if flag else LEVEL_ENV
        raise SystemExit(f"equipipe: {source}={name!r}; allowed: {', '.join(LEVELS)}")
    return name


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs (and replaces when called again)."""


def configure_logging(flag: str | None = None) -> logging.Logger:
    """Give the ``equipipe`` logger its one stderr handler at the chosen level.

    Calling it again replaces the handler (the current ``sys.stderr`` is used), so one
    process that runs the command twice (tests) does not print every line twice.
    """
    logger = logging.getLogger("equipipe")
    for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(h)
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(log_level(flag))
    return logger
