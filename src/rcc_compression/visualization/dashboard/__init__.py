"""The Streamlit dashboard over a directory of runs (``rcc dashboard --runs runs/``); it only reads.

:func:`launch` starts ``streamlit run`` on :mod:`.app`; the page itself is :func:`.views.render`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ...errors import ConfigError

APP = Path(__file__).with_name("app.py")
RUNS_ENV = "RCC_DASHBOARD_RUNS"


def streamlit_command(runs: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8501,
                      refresh: float = 2.0) -> list[str]:
    """The ``streamlit run`` command line that serves the dashboard over ``runs``."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--global.developmentMode", "false", "--client.toolbarMode", "viewer",
            "--", "--runs", str(Path(runs).resolve()), "--refresh", str(refresh)]


def launch(runs: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8501, refresh: float = 2.0) -> int:
    """Serve the dashboard until interrupted; returns streamlit's exit status."""
    try:
        import streamlit  # noqa: F401
    except ImportError as exc:
        raise ConfigError("the dashboard needs streamlit: pip install 'rcc-compression[observe]'") from exc
    return run_child(streamlit_command(runs, host, port, refresh))


def run_child(command: list[str], grace_s: float = 10.0) -> int:
    """Run ``command`` until it exits; if this process is stopped first (SIGTERM raised as ``Terminated``,
    Ctrl-C), the child is sent SIGTERM, given ``grace_s`` to exit, then killed: it never outlives us."""
    proc = subprocess.Popen(command)
    try:
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
