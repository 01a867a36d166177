"""What the models compute: attention of the dense and the compressed vision encoder on one image.

Pure functions from run records (``figures/views.*``, written by
:func:`rcc_compression.analysis.snapshots.record_model_views`) to figures.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .records import RunRecords


def rollout(attn: np.ndarray) -> np.ndarray:
    """Attention rollout of head-averaged maps ``[layers, T, T]``: residual-mixed maps multiplied in order."""
    eye = np.eye(attn.shape[-1])
    out = eye
    for a in attn.astype(np.float64):
        a = 0.5 * a + 0.5 * eye
        out = (a / a.sum(-1, keepdims=True)) @ out
    return out


def cls_maps(attn: np.ndarray, grid: int, cls_index: int = 0) -> dict[str, np.ndarray]:
    """The CLS token's attention to the patches, ``grid x grid``: last layer and rollout over all layers."""
    keep = [i for i in range(attn.shape[-1]) if i != cls_index]
    last = attn[-1, cls_index, keep].reshape(grid, grid)
    roll = rollout(attn)[cls_index, keep].reshape(grid, grid)
    return {"last layer": last / last.sum(), "rollout": roll / roll.sum()}


def attention_figure(run: RunRecords) -> Figure | None:
    """The image, and CLS attention (last layer; rollout) of the dense and compressed encoders on it.

    The title gives the total-variation distance between the dense and compressed maps (0: the
    same map, 1: disjoint).
    """
    views = run.views
    if views is None or not views["meta"].get("attention"):
        return None
    info, t = views["meta"]["attention"], views["tensors"]
    grid = info.get("grid")
    if not grid or "attention/dense" not in t:
        return None
    dense = cls_maps(np.asarray(t["attention/dense"]), grid, info.get("cls_index", 0))
    comp = cls_maps(np.asarray(t["attention/compressed"]), grid, info.get("cls_index", 0))
    fig = Figure(figsize=(11, 2.9))
    axes = fig.subplots(1, 5)
    axes[0].imshow(np.asarray(t["image"]))
    axes[0].set_title("image", fontsize=8)
    panels = [("dense", "last layer"), ("compressed", "last layer"), ("dense", "rollout"), ("compressed", "rollout")]
    for ax, (which, kind) in zip(axes[1:], panels, strict=True):
        m = (dense if which == "dense" else comp)[kind]
        vmax = max(float(dense[kind].max()), float(comp[kind].max()))  # one scale for the pair
        ax.imshow(m, cmap="magma", interpolation="nearest", vmin=0.0, vmax=vmax)
        other = (comp if which == "dense" else dense)[kind]
        tv = 0.5 * float(np.abs(m - other).sum())
        ax.set_title(f"{which}: {kind}" + (f"\nTV distance {tv:.3f}" if which == "compressed" else ""), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{run.model}: CLS attention of the vision encoder (mean over heads)", fontsize=10)
    fig.tight_layout()
    return fig
