"""Plots of a hyper-parameter search (matplotlib, headless): the trials and their Pareto front."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..utils.io import atomic_path


def plot_pareto_front(
    points: Sequence[Sequence[float]],
    on_front: Sequence[bool],
    axes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "search: trials and Pareto front",
    highlight: Mapping[str, int | None] | None = None,
) -> Path:
    """Every feasible trial as a dot (x = ``axes[1]``, y = ``axes[0]``), the front joined, named trials marked.

    ``highlight`` maps a label (``best``, ``base config``) to an index into ``points``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    front = np.asarray(on_front, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
