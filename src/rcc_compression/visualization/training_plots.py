"""Training curves: the distillation of a run, per optimiser step and per validation.

Read from the tracked ``train`` and ``val`` series (``metrics.jsonl``); for a recovery run written
before tracking existed, from ``train_results.json``'s epoch history.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .records import RunRecords


def training_curves_figure(run: RunRecords) -> Figure | None:
    """Loss terms (log scale) and learning rate per step; validation metrics per epoch; stage segments marked."""
    lines = run.metric_lines()
    train = run.series("train")
    val = run.series("val")
    history = (run.train_results or {}).get("history", [])
    if not train and not history:
        return None
    has_val = bool(val) or bool(history and any(k.startswith("val_") for k in history[0]))
    fig = Figure(figsize=(8, 3.6) if has_val else (6, 3.6))
    if has_val:
        ax, ax_val = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    else:
        ax, ax_val = fig.subplots(), None
    if train:
        steps = np.array(list(train))
        keys = [k for k in dict.fromkeys(k for v in train.values() for k in v) if k not in ("lr", "grad_norm", "epoch")]
        for key in keys[:6]:
            ys = np.array([train[s].get(key, np.nan) for s in steps], dtype=float)
            ax.plot(steps, ys, linewidth=1.0, label=key)
        ax.set_yscale("log")
        if any("lr" in v for v in train.values()):
            lr_ax = ax.twinx()
            lr_ax.plot(steps, [train[s].get("lr", np.nan) for s in steps], color="gray", linewidth=0.8,
                       linestyle=":", label="lr")
            lr_ax.set_ylabel("learning rate", fontsize=7)
            lr_ax.tick_params(labelsize=6)
        # a compress run marks where each cascade step's distillation ended
        start = 0
        for line in lines:
            if line.get("kind") == "event" and line.get("event") == "cascade_step" and "train_step" in line:
                end = int(line["train_step"])
                if end > start:
                    ax.axvline(end - 0.5, color="k", linewidth=0.5, alpha=0.3)
                    ax.text((start + end - 1) / 2, 1.0, f"{line.get('stage', '')} r{line.get('round', '')}",
                            transform=ax.get_xaxis_transform(), fontsize=6, ha="center", va="bottom", alpha=0.7)
                start = end
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6, loc="upper right")
    else:
        epochs = [h["epoch"] for h in history]
        for key in [k for k in history[0] if k.startswith("train_")]:
            ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (epoch mean)")
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    ax.tick_params(which="both", labelsize=7)
    if ax_val is not None and val:
        vsteps = list(val)
        for key in [k for k in dict.fromkeys(k for v in val.values() for k in v)][:5]:
            ax_val.plot(vsteps, [val[s].get(key, np.nan) for s in vsteps], marker="o", linewidth=1, label=key)
        ax_val.set_xlabel("validation")
        ax_val.legend(fontsize=6)
    elif ax_val is not None:
        epochs = [h["epoch"] for h in history]
        for key in [k for k in history[0] if k.startswith("val_")]:
            ax_val.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
        ax_val.set_xlabel("epoch")
        ax_val.legend(fontsize=6)
    if ax_val is not None:
        ax_val.grid(alpha=0.3)
        ax_val.tick_params(labelsize=6)
    fig.suptitle(f"{run.model or run.name}: training", fontsize=10)
    fig.tight_layout()
    return fig
