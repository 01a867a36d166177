"""Logging set-up: a rich console handler and, when a run directory is given, a file handler."""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOGGER_NAME = "rcc_compression"


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger, or a child of it."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name.removeprefix(LOGGER_NAME + '.')}")


def setup_logging(verbosity: int = 0, run_dir: str | os.PathLike[str] | None = None) -> logging.Logger:
    """Configure the package logger: -1 quiet (warnings), 0 info, 1+ debug.

    Re-running replaces the handlers this function installed before, so it is safe to call
    once per CLI command in the same process (tests call ``main`` many times).
    """
    from rich.console import Console
    from rich.logging import RichHandler

    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_rcc", False):
            logger.removeHandler(h)
            h.close()
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False)
    console.setLevel(level)
    console._rcc = True  # type: ignore[attr-defined]
    logger.addHandler(console)
    if run_dir is not None:
        path = Path(run_dir) / "run.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._rcc = True  # type: ignore[attr-defined]
        logger.addHandler(fh)
    return logger
