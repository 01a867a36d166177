"""Run directories and their records.

Every run writes ``config.yaml`` (the fully resolved configuration) and ``run.json`` (seed,
package versions, git commit, command line, start and end time, host) into its directory, so a
result can always be traced to exactly what produced it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import socket
import subprocess
import sys
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
        self.record["status"] = "ok" if exc_type is None else f"failed: {exc_type.__name__}: {exc}"
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
