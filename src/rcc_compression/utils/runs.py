"""Run directories and their records.

Every run writes ``config.yaml`` (the fully resolved configuration) and ``run.json`` (seed,
package versions, git commit, command line, start and end time, host) into its directory, so a
result can always be traced to exactly what produced it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata as _md
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from .io import atomic_write_json, atomic_write_text

_PACKAGES = (
    "rcc-compression", "torch", "transformers", "safetensors", "tokenizers", "numpy",
    "pydantic", "typer", "pycocoevalcap", "torchmetrics", "optuna",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (``None`` when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The git commit (and whether the tree is dirty) of the source checkout, if there is one."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where, capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()
        )
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def host_info() -> dict[str, Any]:
    """Host name, OS, CPU count, and the accelerator if there is one."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


class RunRecord:
    """A run directory: resolved config, ``run.json``, and the outputs the run writes.

    Use as a context manager; the end time and status are written on exit, also on failure.
    """

    def __init__(self, run_dir: str | os.PathLike[str], config: dict[str, Any], seed: int, command: str = "") -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record: dict[str, Any] = {
            "seed": seed,
            "command": command or " ".join(sys.argv),
            "start_time": _now(),
            "end_time": None,
            "status": "running",
            "packages": package_versions(),
            "git": git_commit(),
            "host": host_info(),
            "config": config,
        }
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self.save()

    def save(self) -> None:
        """Write ``run.json`` atomically."""
        atomic_write_json(self.dir / "run.json", self.record)

    def update(self, **fields: Any) -> None:
        """Add fields to ``run.json`` (e.g. results) and write it."""
        self.record.update(fields)
        self.save()

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.record["end_time"] = _now()
        if exc_type is None:
            self.record["status"] = "ok"
        elif issubclass(exc_type, Terminated):
            self.record["status"] = f"terminated: {exc}"
        elif issubclass(exc_type, KeyboardInterrupt):
            self.record["status"] = "interrupted: KeyboardInterrupt"
        else:
            self.record["status"] = f"failed: {exc_type.__name__}: {exc}"
        self.save()


def new_run_dir(output_dir: str | os.PathLike[str], name: str) -> Path:
    """A fresh directory ``output_dir/name-YYYYmmdd-HHMMSS[-n]``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{n}")
        n += 1
    path.mkdir(parents=True)
    return path


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: raised in the main thread so that every ``finally`` and context manager
    runs (run records say how the run ended, children are stopped, temporary directories go)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


@contextlib.contextmanager
def terminate_gracefully() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def remove_orphan_dirs(root: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove this user's directories ``root/<prefix><pid>-*`` whose process is gone (it was killed: no
    clean-up ran); returns what was removed."""
    removed = []
    for path in Path(root).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        try:
            if not path.is_dir() or not pid.isdigit() or path.stat().st_uid != os.getuid() or pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def process_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary directory ``<tmp>/<prefix><pid>-XXXX``, removed on exit; those left by killed processes
    with the same prefix are removed first (the pid in the name tells)."""
    root = tempfile.gettempdir()
    remove_orphan_dirs(root, prefix)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=root) as tmp:
        yield Path(tmp)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
