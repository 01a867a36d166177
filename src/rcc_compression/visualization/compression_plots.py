"""What compression did to the model: quality against rate, the cascade's steps, per-layer maps, spectra, weights.

Pure functions from run records to ``matplotlib.figure.Figure`` (``None`` when the run lacks the data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..compression.records import last_passed, step_records
from .records import RunRecords, layer_position

_NAMES = {"top1": "top-1", "i2t_R@1": "R@1 image->text", "t2i_R@1": "R@1 text->image"}
_SHORT_NAMES = {"top1": "top-1", "i2t_R@1": "R@1 i->t", "t2i_R@1": "R@1 t->i"}


def metric_label(key: str, short: bool = True) -> str:
    """``"zero_shot world:colour_shape top1"`` -> ``"zero-shot top-1 (colour_shape)"`` (a plot legend), or with
    ``short=False`` ``"zero-shot top-1 (world:colour_shape)"`` (a table row)."""
    parts = key.split(" ")
    if len(parts) != 3:
        return key
    bench, dataset, metric = parts
    if short:
        return f"{bench.replace('_', '-')} {_SHORT_NAMES.get(metric, metric)} ({dataset.split(':')[-1]})"
    return f"{bench.replace('_', '-')} {_NAMES.get(metric, metric)} ({dataset})"


def run_rate(run: RunRecords) -> float | None:
    """The compressed layers' rate (1 - stored/dense bytes) the run reached, or ``None``."""
    storage = run.storage("compressed")
    if "compression_rate_layers" in storage:
        return float(storage["compression_rate_layers"])
    last = last_passed((run.results or {}).get("records", []))
    return float(last.achieved.compression_rate) if last is not None else None


def rate_quality_figure(runs: Sequence[RunRecords], metrics: Sequence[str] | None = None) -> Figure | None:
    """Task metrics against compression rate: each run's dense (rate 0) and compressed points, with CIs.

    Points of one metric are joined in order of rate; error bars are the runs' bootstrap 95 % CIs
    where they measured them (none is drawn where they did not).
    """
    points: dict[str, list[tuple[float, float, float | None, float | None, str]]] = {}
    for run in runs:
        rate = run_rate(run)
        if rate is None:
            continue
        for which, x in (("dense", 0.0), ("compressed", rate)):
            ci = run.quality_ci(which)
            for key, value in run.quality(which).items():
                if metrics is not None and key not in metrics:
                    continue
                lo, hi = (ci.get(key) or [None, None])[:2]
                points.setdefault(key, []).append((x, float(value), lo, hi, run.name))
    if not points:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for key, pts in sorted(points.items()):
        pts = sorted(set(pts), key=lambda p: p[0])
        xs = np.array([p[0] for p in pts])
        ys = np.array([p[1] for p in pts])
        line, = ax.plot(xs, ys, marker="o", label=metric_label(key))
        with_ci = [p for p in pts if p[2] is not None and p[3] is not None]
        if with_ci:
            ax.errorbar([p[0] for p in with_ci], [p[1] for p in with_ci],
                        yerr=[[p[1] - p[2] for p in with_ci], [p[3] - p[1] for p in with_ci]],
                        fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.8)
    ax.set_xlabel("compression rate of the compressed layers (1 - stored/dense bytes)")
    ax.set_ylabel("metric value")
    any_ci = any(p[2] is not None for pts in points.values() for p in pts)
    title = "quality against compression rate" + (" (bars: bootstrap 95 % CI)" if any_ci else " (no CIs measured)")
    ax.set_title(title if len(runs) > 1 else f"{runs[0].model}: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def cascade_trace_figure(run: RunRecords) -> Figure | None:
    """Gate retention after every cascade step against the rate reached, by stage; failed steps marked."""
    records = step_records((run.results or run.progress or {}).get("records", []), where=f"{run.name}: records")
    if not records:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for stage in dict.fromkeys(r.stage for r in records):
        pts = [(r.achieved.compression_rate, r.retention) for r in records if r.stage == stage]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"after {stage}")
    failed = [r for r in records if not r.passed]
    if failed:
        ax.scatter([r.achieved.compression_rate for r in failed], [r.retention for r in failed],
                   marker="x", color="red", s=60, zorder=5, label="failed gate (rolled back)")
    threshold = records[0].threshold
    if threshold is not None:
        ax.axhline(threshold, color="gray", linewidth=0.8, linestyle=":", label="validation threshold")
    ax.set_xlabel("compression rate of the compressed layers (1 - stored/dense bytes)")
    ax.set_ylabel("gate retention (output agreement with dense)")
    ax.set_title(f"{run.model}: cascade steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _short_prefix(prefix: str) -> str:
    head = prefix.split(".")[0]
    return head.removesuffix("_model") or prefix


def layer_grid(rows: Sequence[dict[str, Any]], value: str) -> tuple[list[str], list[str], np.ndarray]:
    """Per-layer values as a (block x layer kind) matrix: row labels, column labels, values (NaN: absent)."""
    row_keys: list[tuple[str, int]] = []
    col_keys: list[str] = []
    cells: dict[tuple[tuple[str, int], str], float] = {}
    for r in rows:
        prefix, index, suffix = layer_position(r["layer"])
        rk = (_short_prefix(prefix), -1 if index is None else index)
        if rk not in row_keys:
            row_keys.append(rk)
        if suffix not in col_keys:
            col_keys.append(suffix)
        v = r.get(value)
        cells[(rk, suffix)] = float(v) if v is not None else math.nan
    grid = np.full((len(row_keys), len(col_keys)), np.nan)
    for (rk, ck), v in cells.items():
        grid[row_keys.index(rk), col_keys.index(ck)] = v
    labels = [f"{p} {i}" if i >= 0 else p for p, i in row_keys]
    return labels, col_keys, grid


def layer_heatmap_figure(run: RunRecords) -> Figure | None:
    """Per-layer heatmaps: sparsity of S, rank kept (of full rank), bit width (when quantized), stored/dense bytes."""
    rows = run.layer_table()
    if not rows:
        return None
    for r in rows:
        r["rank_share"] = r["rank"] / r["full_rank"] if r["full_rank"] else None
        r["byte_share"] = (r["stored_bytes"] / r["dense_bytes"]) if r.get("dense_bytes") else None
    panels = [("sparsity", "sparsity of S", "{:.2f}", (0, 1)), ("rank_share", "rank kept / full rank", None, (0, 1))]
    if any(r["bits"] is not None for r in rows):
        panels.append(("bits", "bit width", "{:.0f}", None))
    panels.append(("byte_share", "stored / dense bytes", "{:.2f}", (0, 1)))
    labels, cols, _ = layer_grid(rows, "sparsity")
    fig = Figure(figsize=(2.2 + 2.0 * len(panels) * max(1, len(cols)) / 4, 1.2 + 0.28 * len(labels)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title, fmt, lims) in zip(axes, panels, strict=True):
        _, _, grid = layer_grid(rows, key)
        if key == "rank_share":
            _, _, ranks = layer_grid(rows, "rank")
        masked = np.ma.masked_invalid(grid)
        im = ax.imshow(masked, aspect="auto", cmap=colormaps["viridis"].with_extremes(bad="#dddddd"),
                       vmin=None if lims is None else lims[0], vmax=None if lims is None else lims[1])
        ax.set_xticks(range(len(cols)), [c.replace("self_attn.", "").replace("mlp.", "") for c in cols],
                      rotation=60, fontsize=7)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.set_title(title, fontsize=9)
        if grid.size <= 240:
            for (i, j), v in np.ndenumerate(grid):
                if math.isnan(v):
                    continue
                text = f"{int(ranks[i, j])}" if key == "rank_share" else (fmt or "{:.2f}").format(v)
                ax.text(j, i, text, ha="center", va="center", fontsize=6,
                        color="white" if (lims is not None and v < (lims[0] + lims[1]) / 2) else "black")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    note = "" if any(r["bits"] is not None for r in rows) else " (no quantized layers: bit width not shown)"
    fig.suptitle(f"{run.model}: per-layer compression{note}", fontsize=10)
    fig.tight_layout()
    return fig


def _pick(names: Sequence[str], n: int) -> list[str]:
    if len(names) <= n:
        return list(names)
    idx = np.linspace(0, len(names) - 1, n).round().astype(int)
    return [names[i] for i in dict.fromkeys(idx.tolist())]


def _views(run: RunRecords) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    views = run.views
    if views is None:
        return None
    return views["meta"], views["tensors"]


def spectra_figure(run: RunRecords, layers: Sequence[str] | None = None, max_layers: int = 12) -> Figure | None:
    """Singular values of the dense weight of each layer (normalised to the largest), the rank kept marked.

    The cut is the rank the compressed layer stores; the caption gives the share of the weight's
    energy (sum of squared singular values) above it. With ``activation_aware`` low rank the cut
    was chosen on the whitened spectrum, so it need not sit where this one drops.
    """
    got = _views(run)
    if got is None:
        return None
    meta, tensors = got
    names = [n for n in (layers or meta.get("layers", [])) if f"spectrum/{n}" in tensors]
    if not names:
        return None
    if layers is None:
        ranked = [n for n in names if int(meta.get("ranks", {}).get(n, 0)) > 0]
        names = _pick(ranked or names, max_layers)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 2.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        s = np.asarray(tensors[f"spectrum/{name}"], dtype=np.float64)
        rank = int(meta.get("ranks", {}).get(name, 0))
        ax.semilogy(np.arange(1, len(s) + 1), s / max(s[0], 1e-30), linewidth=1.2)
        energy = s ** 2
        if rank > 0:
            kept = energy[:rank].sum() / max(energy.sum(), 1e-30)
            ax.axvline(rank, color="red", linestyle="--", linewidth=1)
            ax.axvspan(0.5, rank, color="red", alpha=0.07)
            ax.set_title(f"{_short_layer(name)}\nr={rank} of {len(s)}, energy {kept:.1%}", fontsize=7)
        else:
            ax.set_title(f"{_short_layer(name)}\nno low-rank part", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.model}: singular values of the dense weights (dashed: rank kept)", fontsize=10)
    fig.tight_layout()
    return fig


def _short_layer(name: str) -> str:
    prefix, index, suffix = layer_position(name)
    return f"{_short_prefix(prefix)} {index} {suffix}" if index is not None else name


def weight_distribution_figure(run: RunRecords, layers: Sequence[str] | None = None, max_layers: int = 6
                               ) -> Figure | None:
    """Histograms of each layer's dense and compressed (effective) weights on shared bins, log counts."""
    got = _views(run)
    if got is None:
        return None
    meta, tensors = got
    names = [n for n in (layers or meta.get("layers", [])) if f"hist/dense/{n}" in tensors]
    if not names:
        return None
    names = _pick(names, max_layers) if layers is None else names
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.5 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        edges = np.asarray(tensors[f"hist/edges/{name}"])
        for which, colour in (("dense", "C0"), ("compressed", "C3")):
            counts = np.asarray(tensors[f"hist/{which}/{name}"])
            ax.stairs(np.maximum(counts, 0.5), edges, label=which, color=colour, linewidth=1.1)
        ax.set_yscale("log")
        ax.set_title(_short_layer(name), fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.model}: weight distributions before and after compression", fontsize=10)
    fig.tight_layout()
    return fig
