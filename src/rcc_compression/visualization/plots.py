"""Plots (matplotlib, headless): what compression costs along the cascade."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..compression.records import step_records
from ..utils.io import atomic_path


def plot_rate_curve(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    dense_points: Mapping[str, float] | None = None,
    final_points: Mapping[str, float] | None = None,
    title: str = "quality vs compression rate",
) -> Path:
    """Gate metric (retention) against the layers' compression rate after every cascade step.

    ``dense_points``/``final_points`` (metric name -> value) add the dense and final task metrics,
    e.g. zero-shot accuracy, at rate 0 and at the final rate. Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in step_records(records) if r.retention is not None]  # unmeasured: no point
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for stage in dict.fromkeys(r.stage for r in steps):
        pts = [(r.achieved.compression_rate, r.retention) for r in steps if r.stage == stage]
        ax.plot(*zip(*pts, strict=True), marker="o", linestyle="-", label=f"gate retention after {stage}")
    failed = [r for r in steps if not r.passed]
    if failed:
        ax.scatter([r.achieved.compression_rate for r in failed], [r.retention for r in failed],
                   marker="x", color="red", s=60, zorder=5, label="failed gate (rolled back)")
    if dense_points and final_points and steps:
        final_rate = max((r.achieved.compression_rate for r in steps if r.passed), default=0.0)
        for name, dense in dense_points.items():
            if name in final_points and dense:
                ax.plot([0.0, final_rate], [1.0, final_points[name] / dense], linestyle="--", marker="s",
                        label=f"{name} retention (final)")
    threshold = steps[0].threshold if steps else None
    if threshold is not None:
        ax.axhline(threshold, color="gray", linewidth=0.8, linestyle=":", label="validation threshold")
    ax.set_xlabel("compression rate of the compressed layers (1 - stored/dense bytes)")
    ax.set_ylabel("retention (compressed / dense)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
