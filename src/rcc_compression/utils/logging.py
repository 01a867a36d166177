"""Logging set-up: a rich console handler and, when a run directory is given, a file handler."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

LOGGER_NAME = "rcc_compression"


def console(**kwargs: Any) -> Any:
    """A rich ``Console`` that writes plain text wherever its stream is not a terminal.

    A notebook kernel sets ``FORCE_COLOR``, and rich would then fill a cell's output (and its
    ``text/plain`` copy) with ANSI colour codes; a pipe or a log file should not get them either.
    Colours and live redraws are for a stream that ``isatty()``.
    """
    import sys

    from rich.console import Console

    stream = kwargs.get("file") or (sys.stderr if kwargs.get("stderr") else sys.stdout)
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(force_jupyter=False, force_terminal=tty, **kwargs)


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger, or a child of it."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name.removeprefix(LOGGER_NAME + '.')}")


def setup_logging(verbosity: int = 0, run_dir: str | os.PathLike[str] | None = None,
                  default: int = logging.INFO) -> logging.Logger:
    """Configure the package logger: the console shows -1 warnings, 0 ``default``, 1 info, 2+ debug.

    ``run_dir/run.log`` gets everything (debug). A job that draws progress bars and a result table
    passes ``default=logging.WARNING``: its step log goes to ``run.log``, ``-v`` shows it.

    Re-running replaces the handlers this function installed before, so it is safe to call
    once per CLI command in the same process (tests call ``main`` many times).
    """
    from rich.logging import RichHandler

    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_rcc", False):
            logger.removeHandler(h)
            h.close()
    level = (logging.WARNING if verbosity < 0 else default if verbosity == 0 else logging.INFO if verbosity == 1
             else logging.DEBUG)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    shown = RichHandler(console=console(stderr=True), show_path=False, rich_tracebacks=False, markup=False)
    shown.setLevel(level)
    shown._rcc = True  # type: ignore[attr-defined]
    logger.addHandler(shown)
    if run_dir is not None:
        path = Path(run_dir) / "run.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._rcc = True  # type: ignore[attr-defined]
        logger.addHandler(fh)
    return logger
