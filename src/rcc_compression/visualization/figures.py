"""The figure registry: every plot a run directory can show, by name, and how figures are saved.

Each entry of :data:`FIGURES` is a pure function from run records
(:class:`~.records.RunRecords`, or a list of them for ``scope="runs"``) to a matplotlib
``Figure``, or ``None`` when the run holds nothing to draw (a run without a low-rank stage has no
spectra to cut). The dashboard shows, and :func:`write_run_figures` saves, every entry that draws.
Adding a figure is one function plus one :class:`FigureSpec` line here.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so drawing is safe in
any thread and needs no display.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from ..utils.io import atomic_path
from .compression_plots import (
    cascade_trace_figure,
    layer_heatmap_figure,
    rate_quality_figure,
    spectra_figure,
    weight_distribution_figure,
)
from .model_plots import attention_figure
from .records import RunRecords
from .search import search_pareto_figure
from .training_plots import training_curves_figure

FORMATS = ("png", "svg")


@dataclass(frozen=True)
class FigureSpec:
    """A named figure: ``draw(run)`` (``scope="run"``) or ``draw([runs])`` (``scope="runs"``)."""

    name: str
    title: str
    draw: Callable[[Any], Figure | None]
    scope: Literal["run", "runs"] = "run"
    description: str = ""


FIGURES: dict[str, FigureSpec] = {spec.name: spec for spec in (
    FigureSpec("rate_quality", "Quality against compression rate", lambda run: rate_quality_figure([run]),
               description="task metrics of the dense and compressed model with 95 % CIs, at their compression rate"),
    FigureSpec("cascade_trace", "Cascade steps", cascade_trace_figure,
               description="gate retention after every cascade step against the rate reached"),
    FigureSpec("layer_heatmap", "Per-layer compression", layer_heatmap_figure,
               description="sparsity of S, rank kept, bit width and stored/dense bytes of every compressed layer"),
    FigureSpec("spectra", "Singular value spectra", spectra_figure,
               description="singular values of the dense weights, the rank kept marked"),
    FigureSpec("weights", "Weight distributions", weight_distribution_figure,
               description="histograms of dense and compressed weights"),
    FigureSpec("attention", "Attention maps", attention_figure,
               description="CLS attention of the dense and compressed vision encoders on one image"),
    FigureSpec("training", "Training curves", training_curves_figure,
               description="distillation loss and learning rate per optimiser step, validation per epoch"),
    FigureSpec("pareto", "Search: Pareto front", search_pareto_figure,
               description="every feasible trial of a search, its Pareto front, the best and the base config"),
    FigureSpec("rate_quality_runs", "Quality against compression rate, across runs", rate_quality_figure,
               scope="runs", description="one point per run with its CI"),
)}


def save_figure(fig: Figure, stem: str | os.PathLike[str], formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.svg`` (atomically); returns the paths."""
    out = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120 if fmt == "png" else None)
        out.append(path)
    return out


def draw_run_figures(run: RunRecords, names: Sequence[str] | None = None) -> dict[str, Figure]:
    """Every run-scoped figure (or those in ``names``) that this run has data for."""
    out: dict[str, Figure] = {}
    for name, spec in FIGURES.items():
        if spec.scope != "run" or (names is not None and name not in names):
            continue
        fig = spec.draw(run)
        if fig is not None:
            out[name] = fig
    return out


def write_run_figures(run: RunRecords, out_dir: str | os.PathLike[str] | None = None,
                      names: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Save every figure the run can draw into ``out_dir`` (default ``<run>/figures``) as PNG and SVG."""
    target = Path(out_dir) if out_dir is not None else run.path / "figures"
    return {name: save_figure(fig, target / name) for name, fig in draw_run_figures(run, names).items()}
