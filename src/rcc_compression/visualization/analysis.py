"""Plots of the analysis reports (matplotlib, headless): subspaces, embeddings, sensitivity, comparisons.

Each function takes the plain data an analysis report holds (dicts and arrays, as written to
JSON) and writes one PNG atomically; none of them computes anything beyond layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import atomic_path


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _plt().close(fig)
    return path


def short_layer_name(name: str) -> str:
    """``vision_model.encoder.layers.3.mlp.fc1`` -> ``v3.fc1`` (text_model -> ``t``); other names unchanged."""
    parts = name.split(".")
    tower = {"vision_model": "v", "text_model": "t", "text_decoder": "d", "text_encoder": "te"}.get(parts[0])
    if tower is None or "layers" not in parts and "layer" not in parts:
        return name
    idx = parts.index("layers") if "layers" in parts else parts.index("layer")
    if idx + 1 >= len(parts):
        return name
    return f"{tower}{parts[idx + 1]}.{parts[-1]}"


def plot_grassmann_distances(
    layers: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Grassmann distance, dense vs compressed",
    key: str = "geodesic_normalised",
) -> Path:
    """Per-layer bars of the row-space and column-space distance (``layers`` as in ``compare_models``)."""
    plt = _plt()
    names = list(layers)
    rows = [layers[n]["rows"][key] for n in names]
    cols = [layers[n]["columns"][key] for n in names]
    ks = [layers[n]["k"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.2), dpi=120)
    ax.bar(x - 0.2, rows, 0.4, label="row space (inputs)")
    ax.bar(x + 0.2, cols, 0.4, label="column space (outputs)")
    ax.set_xticks(x, [f"{short_layer_name(n)} k={k}" for n, k in zip(names, ks, strict=True)], rotation=90,
                  fontsize=7)
    label = {"geodesic_normalised": "geodesic distance / (sqrt(k) pi/2)", "geodesic": "geodesic distance (rad)"}
    ax.set_ylabel(label.get(key, key))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_overlap_matrix(names: Sequence[str], matrix: Sequence[Sequence[float]], path: str | os.PathLike[str],
                        title: str = "subspace overlap across layers") -> Path:
    """Heat map of the pairwise subspace overlap of layers (1: same subspace)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.25 * len(names) + 2),) * 2, dpi=120)
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [short_layer_name(n) for n in names]
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), labels, fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_embeddings(
    projection: Mapping[str, np.ndarray],
    image_labels: np.ndarray,
    text_labels: np.ndarray,
    classnames: Sequence[str],
    path: str | os.PathLike[str],
    method: str = "t-SNE",
    title: str = "",
) -> Path:
    """Dense (left) next to compressed (right): images as dots, class prompts as triangles, coloured by class.

    ``projection`` holds ``dense_images``, ``dense_texts``, ``compressed_images`` and
    ``compressed_texts`` (N x 2, one joint map). With up to 20 classes a legend names them.
    """
    plt = _plt()
    n_cls = len(classnames)
    cmap = plt.get_cmap("tab20" if n_cls <= 20 else "hsv", max(n_cls, 1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), dpi=120, sharex=True, sharey=True)
    for ax, which in zip(axes, ("dense", "compressed"), strict=True):
        img, txt = np.asarray(projection[f"{which}_images"]), np.asarray(projection[f"{which}_texts"])
        ax.scatter(img[:, 0], img[:, 1], c=np.asarray(image_labels) % max(n_cls, 1), cmap=cmap, vmin=0,
                   vmax=max(n_cls - 1, 1), s=6, alpha=0.7, linewidths=0)
        ax.scatter(txt[:, 0], txt[:, 1], c=np.asarray(text_labels) % max(n_cls, 1), cmap=cmap, vmin=0,
                   vmax=max(n_cls - 1, 1), s=28, marker="^", edgecolors="black", linewidths=0.4)
        ax.set_title(f"{which}: {method} of image (dots) and class-prompt (triangles) embeddings", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if 0 < n_cls <= 20:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(i), label=c)
                   for i, c in enumerate(classnames)]
        axes[1].legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        fig.text(0.5, 0.01, f"{n_cls} classes, coloured on a cyclic map", ha="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_sensitivity(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], key: str = "gate_drop",
                     title: str = "layer sensitivity (each layer compressed alone)") -> Path:
    """Horizontal bars of each layer's metric drop, most sensitive on top."""
    plt = _plt()
    rows = sorted(rows, key=lambda r: r[key])
    fig, ax = plt.subplots(figsize=(6.5, max(3.0, 0.22 * len(rows) + 1.2)), dpi=120)
    ax.barh([short_layer_name(r["layer"]) for r in rows], [r[key] for r in rows], color="tab:red")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel({"gate_drop": "drop of output agreement with the dense model",
                   "metric_drop": "drop of the task metric"}.get(key, key))
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(rows: Sequence[Mapping[str, Any]], metric: str, path: str | os.PathLike[str],
                    title: str = "", reference: str | None = None, ylabel: str | None = None) -> Path:
    """Mean and CI over seeds of ``metric`` per variant (``rows[i]["metrics"][metric]`` = a seed aggregate)."""
    plt = _plt()
    rows = [r for r in rows if metric in r.get("metrics", {})]
    names = [r["variant"] for r in rows]
    mean = np.array([r["metrics"][metric]["mean"] for r in rows])
    lo = np.array([r["metrics"][metric]["ci_low"] for r in rows])
    hi = np.array([r["metrics"][metric]["ci_high"] for r in rows])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 4.0), dpi=120)
    colors = ["tab:orange" if n == reference else "tab:blue" for n in names]
    ax.bar(range(len(names)), mean, color=colors, yerr=[mean - lo, hi - mean], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel or metric, fontsize=8)
    ax.set_title(title or metric, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
