"""Read-only views of run directories: what plots, reports and the dashboard draw from.

:func:`load_run` reads what a run wrote (``run.json``, ``config.yaml``, ``results.json``,
``progress.json``, ``metrics.jsonl``, ``compressed/manifest.json``, ``figures/views.*``,
``train_results.json``, a search's ``search_results.json`` and ``trials.json``) into a
:class:`RunRecords`; nothing here ever writes. Files that are missing, half-written or malformed
read as absent, so a running or crashed run can always be shown.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..tracking import METRICS_FILE, read_metrics_file, series_points
from ..utils.runs import pid_alive

#: files whose presence makes a directory a run directory
RUN_MARKERS = ("run.json", "results.json", "progress.json", "search_results.json")
VIEWS_DIR = "figures"


def read_json(path: Path) -> Any:
    """A JSON file's content, or ``None`` when it is missing or malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class RunRecords:
    """Everything one run directory holds, read lazily; ``name`` is the directory's name."""

    path: Path
    name: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.name = self.name or self.path.name

    # ------------------------------------------------------------------ files
    @cached_property
    def run(self) -> dict[str, Any]:
        """``run.json`` (seed, packages, git, host, status, times, config)."""
        data = read_json(self.path / "run.json")
        return data if isinstance(data, dict) else {}

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config (``config.yaml``, else the one in ``run.json``)."""
        try:
            data = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            data = None
        return data if isinstance(data, dict) else dict(self.run.get("config") or {})

    @cached_property
    def results(self) -> dict[str, Any] | None:
        data = read_json(self.path / "results.json")
        return data if isinstance(data, dict) else None

    @property
    def progress(self) -> dict[str, Any] | None:
        """``progress.json``, read afresh each time (it changes while a job runs)."""
        data = read_json(self.path / "progress.json")
        return data if isinstance(data, dict) else None

    @cached_property
    def train_results(self) -> dict[str, Any] | None:
        data = read_json(self.path / "train_results.json")
        return data if isinstance(data, dict) else None

    @cached_property
    def manifest(self) -> dict[str, Any] | None:
        data = read_json(self.path / "compressed" / "manifest.json")
        return data if isinstance(data, dict) else None

    @cached_property
    def search(self) -> dict[str, Any] | None:
        """A search's report (``search_results.json``: objectives, counts, best, Pareto front), when this is one."""
        data = read_json(self.path / "search_results.json")
        return data if isinstance(data, dict) else None

    @cached_property
    def trials(self) -> list[dict[str, Any]] | None:
        """A search's trials (``trials.json``)."""
        data = read_json(self.path / "trials.json")
        return data if isinstance(data, list) else None

    def metric_lines(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` (read afresh: a running job appends to it)."""
        return read_metrics_file(self.path / METRICS_FILE)

    def series(self, name: str) -> dict[int, dict[str, float]]:
        """``{step: {metric: value}}`` of one tracked series (``train``, ``cascade``, ...)."""
        return series_points(self.metric_lines(), name)

    @cached_property
    def views(self) -> dict[str, Any] | None:
        """The figure records of ``figures/views.*``: ``{"meta": {...}, "tensors": {name: numpy array}}``."""
        meta = read_json(self.path / VIEWS_DIR / "views.json")
        tfile = self.path / VIEWS_DIR / "views.safetensors"
        if not isinstance(meta, dict) or not tfile.is_file():
            return None
        try:
            from safetensors.numpy import load_file

            tensors = load_file(str(tfile))
        except (OSError, ValueError, RuntimeError):
            return None
        return {"meta": meta, "tensors": tensors}

    # ------------------------------------------------------------------ summaries
    @property
    def kind(self) -> str:
        """``compress``, ``train``, ``evaluate``, ``study`` or ``run``."""
        if self.search is not None:
            return "study"
        if self.train_results is not None or (self.progress or {}).get("format") == "rcc-train-progress":
            return "train"
        res = self.results or {}
        if "records" in res or (self.path / "progress.json").is_file():
            return "compress"
        if "results" in res:
            return "evaluate"
        return "run"

    @property
    def model(self) -> str:
        res = self.results or {}
        return str(res.get("model") or (self.config.get("model") or {}).get("name") or "")

    @property
    def status(self) -> str:
        """``ok``, ``failed: ...``, ``running``, or ``interrupted`` (marked running, but its process is gone)."""
        st = str(self.run.get("status") or ("ok" if self.results is not None else "unknown"))
        if st != "running":
            return st
        try:
            pid = int((self.path / ".lock").read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        same_host = self.run.get("host", {}).get("hostname") in (None, socket.gethostname())
        if pid and same_host and not pid_alive(pid):
            return "interrupted"
        return "running"

    @property
    def last_update(self) -> float | None:
        """Seconds since the run last wrote its progress or metrics."""
        times = []
        for name in ("progress.json", METRICS_FILE, "run.json"):
            try:
                times.append((self.path / name).stat().st_mtime)
            except OSError:
                continue
        return time.time() - max(times) if times else None

    def storage(self, which: str = "compressed") -> dict[str, Any]:
        res = self.results or {}
        return dict(res.get("efficiency", {}).get(which, {}).get("storage", {}) or {})

    def quality(self, which: str = "compressed") -> dict[str, float]:
        """Headline quality of a compress run (``dense`` or ``compressed``), ``{metric key: value}``."""
        return dict((self.results or {}).get("quality", {}).get(which, {}) or {})

    def quality_ci(self, which: str = "compressed") -> dict[str, list[float]]:
        """``{metric key: [low, high]}`` where the run measured confidence intervals."""
        return dict((self.results or {}).get("quality_ci", {}).get(which, {}) or {})

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per compressed layer: shape, sparsity, rank, bits, stored/dense bytes (from the manifest)."""
        rows = []
        for name, info in (self.manifest or {}).get("layers", {}).items():
            m, n = int(info.get("out_features", 0)), int(info.get("in_features", 0))
            numel = m * n
            nnz = info.get("nnz")
            quant = info.get("quant") or {}
            bits = None
            if isinstance(quant, dict) and quant:
                spec = quant.get("weight") or next(iter(quant.values()))
                bits = spec.get("bits") if isinstance(spec, dict) else None
            rows.append({
                "layer": name, "out_features": m, "in_features": n,
                # as the cascade counts it: entries of S not stored (S absent: all of them)
                "sparsity": (1.0 - int(nnz) / numel) if (numel and nnz is not None) else None,
                "rank": int(info.get("rank") or 0), "full_rank": min(m, n),
                "bits": bits, "dtype": info.get("dtype"), "encoding": info.get("encoding"),
                "stored_bytes": info.get("stored_bytes"), "dense_bytes": info.get("dense_bytes"),
            })
        return rows


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds any of the files a run writes."""
    return any((path / m).is_file() for m in RUN_MARKERS)


def find_runs(root: str | os.PathLike[str], max_depth: int = 3) -> list[Path]:
    """Run directories under ``root`` (itself included), newest first; checkpoints and models are not descended."""
    root = Path(root)
    found: list[Path] = []

    def walk(p: Path, depth: int) -> None:
        if is_run_dir(p):
            found.append(p)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return
        for c in children:
            if c.name not in ("checkpoints", "compressed", "wandb", "tensorboard", VIEWS_DIR):
                walk(c, depth + 1)

    if root.is_dir():
        walk(root, 0)

    def started(p: Path) -> float:
        try:
            return (p / "run.json").stat().st_mtime if (p / "run.json").exists() else p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=started, reverse=True)


def load_run(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> RunRecords:
    """A :class:`RunRecords` for one run directory; named relative to ``root`` when given."""
    path = Path(path)
    name = path.name
    if root is not None:
        try:
            name = path.resolve().relative_to(Path(root).resolve()).as_posix() or path.name
        except ValueError:
            pass
    return RunRecords(path, name)


_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<suffix>.+)$")


def layer_position(name: str) -> tuple[str, int | None, str]:
    """``vision_model.encoder.layers.3.mlp.fc1`` -> ``("vision_model.encoder.layers", 3, "mlp.fc1")``."""
    m = _LAYER.match(name)
    if m is None:
        prefix, _, last = name.rpartition(".")
        return prefix, None, last
    return m["prefix"], int(m["index"]), m["suffix"]


def iter_numbers(d: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted key, value)`` of every number in a nested structure (for flat tables)."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from iter_numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield prefix, float(d)
