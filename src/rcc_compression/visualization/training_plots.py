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
    fig = Figure(figsize=(8, 3.6))
    ax, ax_val = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    if train:
        steps = np.array(list(train))
        keys = [k for k in dict.fromkeys(k for v in train.values() for k in v) if k not in ("lr", "grad_norm")]
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
        for line in lines:
            if line.get("kind") == "event" and line.get("event") == "train_begin" and "step" in line:
                ax.axvline(line["step"], color="k", linewidth=0.5, alpha=0.3)
                label = " ".join(str(line[k]) for k in ("stage", "round") if k in line)
                if label:
                    ax.text(line["step"], 1.0, label, transform=ax.get_xaxis_transform(), fontsize=5, rotation=90,
                            va="top", ha="right", alpha=0.6)
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
    if val:
        vsteps = list(val)
        for key in [k for k in dict.fromkeys(k for v in val.values() for k in v)][:5]:
            ax_val.plot(vsteps, [val[s].get(key, np.nan) for s in vsteps], marker="o", linewidth=1, label=key)
        ax_val.set_xlabel("validation")
        ax_val.legend(fontsize=6)
    elif history and any(k.startswith("val_") for k in history[0]):
        epochs = [h["epoch"] for h in history]
        for key in [k for k in history[0] if k.startswith("val_")]:
            ax_val.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
        ax_val.set_xlabel("epoch")
        ax_val.legend(fontsize=6)
    else:
        ax_val.text(0.5, 0.5, "no validation recorded", ha="center", va="center", fontsize=8,
                    transform=ax_val.transAxes)
    ax_val.grid(alpha=0.3)
    ax_val.tick_params(labelsize=6)
    fig.suptitle(f"{run.model or run.name}: training", fontsize=10)
    fig.tight_layout()
    return fig
