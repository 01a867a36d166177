"""Metric names, numbers from nested results, system metrics, and ``metrics.jsonl`` read back."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.memory import peak_resident_bytes

METRICS_FILE = "metrics.jsonl"

_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


def metric_key(*parts: str) -> str:
    """``metric_key("eval", "zero_shot world:shape", "i2t_R@1")`` -> ``"eval/zero_shot_world_shape/i2t_R_1"``.

    Each part keeps letters, digits, ``_``, ``.`` and ``-``; anything else becomes ``_``. The same
    name then reads back unchanged from every backend.
    """
    out = []
    for p in parts:
        for piece in str(p).split("/"):
            clean = _BAD.sub("_", piece).strip("_")
            if clean:
                out.append(clean)
    return "/".join(out)


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested mapping -> ``{"a/b": float}`` for every finite-or-not number in it (bools as 0/1; others dropped)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = metric_key(prefix, str(key)) if prefix else metric_key(str(key))
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, name))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def system_metrics(started: float) -> dict[str, float]:
    """Elapsed seconds since ``started``, peak and current resident memory (MB), CUDA peak (MB) if any."""
    out = {"elapsed_s": time.perf_counter() - started, "peak_rss_mb": peak_resident_bytes() / 2**20}
    try:
        import psutil

        out["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except (ImportError, OSError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite real number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` (a file or a run directory); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def series_points(lines: list[dict[str, Any]], series: str) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of one series from :func:`read_metrics_file` lines (later lines win)."""
    out: dict[int, dict[str, float]] = {}
    for line in lines:
        if line.get("kind") == "metrics" and line.get("series") == series:
            out.setdefault(int(line["step"]), {}).update(line.get("values", {}))
    return dict(sorted(out.items()))
