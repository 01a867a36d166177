"""Plots of a hyper-parameter search (matplotlib, headless): the trials and their Pareto front."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..utils.io import atomic_path
from .records import RunRecords


def pareto_front_figure(
    points: Sequence[Sequence[float]],
    on_front: Sequence[bool],
    axes: Sequence[str],
    title: str = "search: trials and Pareto front",
    highlight: Mapping[str, int | None] | None = None,
) -> Figure:
    """Every feasible trial as a dot (x = ``axes[1]``, y = ``axes[0]``), the front joined, named trials marked.

    ``highlight`` maps a label (``best``, ``base config``) to an index into ``points``.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    front = np.asarray(on_front, dtype=bool)
    fig = Figure(figsize=(6, 4.2), dpi=120)
    ax = fig.subplots()
    ax.scatter(pts[~front, 1], pts[~front, 0], s=18, color="tab:gray", alpha=0.7, label="trial")
    f = pts[front]
    f = f[np.argsort(f[:, 1])]
    ax.plot(f[:, 1], f[:, 0], marker="o", color="tab:blue", label="Pareto front")
    markers = {"best": ("*", "tab:red"), "base config": ("s", "tab:orange")}
    for label, idx in (highlight or {}).items():
        if idx is None:
            continue
        m, c = markers.get(label, ("D", "tab:green"))
        ax.scatter([pts[idx, 1]], [pts[idx, 0]], marker=m, s=140, color=c, edgecolors="black", zorder=5, label=label)
    ax.set_xlabel(axes[1])
    ax.set_ylabel(axes[0])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_pareto_front(
    points: Sequence[Sequence[float]],
    on_front: Sequence[bool],
    axes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "search: trials and Pareto front",
    highlight: Mapping[str, int | None] | None = None,
) -> Path:
    """:func:`pareto_front_figure` written atomically as PNG to ``path``."""
    fig = pareto_front_figure(points, on_front, axes, title, highlight)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _metric(metrics: Mapping[str, Any], name: str) -> float:
    """A trial's value of an objective (as the search reports it); NaN when it was not measured."""
    if name in metrics and not isinstance(metrics[name], dict):
        return float(metrics[name])
    if name.startswith("retention:"):
        return float(metrics.get("retention_by_metric", {}).get(name.split(":", 1)[1], math.nan))
    return float(metrics.get("task", {}).get(name, math.nan))


def search_pareto_figure(run: RunRecords) -> Figure | None:
    """The Pareto front of a search's output directory (``trials.json``, ``search_results.json``)."""
    report, trials = run.search, run.trials
    if not report or not trials or not report.get("pareto"):
        return None
    axes = report["pareto"]["objectives"][:2]
    done = [r for r in trials if r.get("state") == "COMPLETE" and r.get("feasible")]
    if len(axes) < 2 or not done:
        return None
    front = {t["number"] for t in report["pareto"].get("trials", [])}
    numbers = [r["number"] for r in done]

    def index(entry: Any) -> int | None:
        return numbers.index(entry["number"]) if isinstance(entry, dict) and entry.get("number") in numbers else None

    return pareto_front_figure([[_metric(r["metrics"], a) for a in axes] for r in done],
                               [r["number"] in front for r in done], axes,
                               title=f"{report.get('study', run.name)}: {len(done)} feasible trials",
                               highlight={"best": index(report.get("best")), "base config": index(report.get("base"))})
