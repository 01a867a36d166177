"""Run the ``rcc`` command line, optionally SIGKILLing the process at a chosen write.

The crash tests use it two ways: as a script started with ``subprocess`` (``python crash_worker.py
compress ...``), and through :func:`run_cli` in a child forked from the test process (which has
torch and transformers imported already, so a child starts in a fraction of a second). Either way
the child is a separate process running the real ``rcc compress``, and SIGKILL ends it at once.

``kill_at="REGEX:N"`` (or the ``RCC_TEST_KILL_AT`` environment variable) makes the process send
itself SIGKILL just before the N-th ``os.replace`` whose destination path matches REGEX: an exact
point of the run's write sequence (a checkpoint half-written, a checkpoint whole but not yet in
``progress.json``, the final save half-done).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence


def install_kill_switch(spec: str) -> None:
    """SIGKILL this process before the N-th ``os.replace`` onto a path matching REGEX (``spec="REGEX:N"``)."""
    pattern, count = spec.rsplit(":", 1)
    regex, left = re.compile(pattern), [int(count)]
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN202 - same signature as os.replace
        if regex.search(os.fspath(dst)):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def run_cli(argv: Sequence[str], kill_at: str | None = None, log_path: str | None = None) -> None:
    """Child body: send output to ``log_path``, arm the kill switch, run ``rcc``, exit with its status."""
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process ends with os._exit
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    if kill_at:
        install_kill_switch(kill_at)
    from rcc_compression.cli import main

    status = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run_cli(sys.argv[1:], os.environ.get("RCC_TEST_KILL_AT"))
