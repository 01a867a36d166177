"""Progress bars on the terminal (rich), fed by ``report(what, done, total)`` callbacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .logging import console


def interactive() -> bool:
    """Whether standard error is a terminal (progress is shown there by default)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def progress_bar(enabled: bool = True, by_first_word: bool = False, transient: bool = True
                 ) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on standard error; ``report(what, done, total)`` updates the bar named ``what``.

    ``by_first_word`` keeps one bar per first word (``"quant fc1"`` and ``"quant fc2"`` share the
    ``quant`` bar, which shows the latest ``what``). Disabled, ``report`` does nothing.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(stderr=True, quiet=not enabled), transient=transient) as bar:
        tasks: dict[str, Any] = {}

        def report(what: str, done: int, total: int) -> None:
            key = what.split(" ", 1)[0] if by_first_word else what
            if key not in tasks:
                tasks[key] = bar.add_task(what, total=total)
            bar.update(tasks[key], completed=done, total=total, description=what)

        yield report
