"""Layer sensitivity: each layer compressed alone at the target setting, its effect on the metric, ranked.

For every layer, a fresh copy of the dense model goes through the same cascade (stages, planned
targets, rounds) with every stage's ``targets`` narrowed to that one layer and the gate opened
(threshold 0, so nothing is rolled back: the effect is measured, not hidden). The effect is the
drop of the gate metric (output agreement with the dense model on held-out calibration batches)
and, with ``metric_fn``, of a task metric; layers are ranked by the drop. Layers whose loss is
small are where a planner can spend fewer bytes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..compression.cascade import CascadePipeline, compression_summary
from ..compression.records import step_records
from ..compression.registry import STAGES

#: stages that change stored bytes; recovery stages are left out of sensitivity unless asked for
SHRINKING_STAGES = ("dare", "nullu")


def single_layer_section(section: Any, layer: str, stages: Sequence[str] | None = None) -> Any:
    """A copy of a compression section whose stages act on ``layer`` only and whose gate never rolls back."""
    sec = section.model_copy(deep=True)
    if stages is not None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; allowed: {', '.join(STAGES)}")
        sec.cascade.stages = [s for s in sec.cascade.stages if s in stages] or list(stages)
    pattern = f"^{re.escape(layer)}$"
    for name in sec.cascade.stages:
        cfg = getattr(sec, name)
        cfg.targets, cfg.ignore = [pattern], []
    sec.cascade.validation_threshold = 0.0
    sec.cascade.target_rate = None  # the targets are already planned: the run's own per-stage settings apply
    return sec


def layer_sensitivity(
    model: nn.Module,
    section: Any,
    layers: Iterable[str],
    calibration_data: Sequence[Mapping[str, Any]],
    holdout_data: Sequence[Mapping[str, Any]],
    stages: Sequence[str] | None = SHRINKING_STAGES,
    metric_fn: Callable[[nn.Module], float] | None = None,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    pipeline: Callable[..., CascadePipeline] = CascadePipeline,
    **pipeline_kwargs: Any,
) -> dict[str, Any]:
    """Compress each of ``layers`` alone with ``section``'s settings; rank them by the metric they cost.

    ``model`` is the dense model (a wrapper or module; it is copied, never changed). ``stages``
    (default: the shrinking ones) narrows the cascade; ``None`` keeps every configured stage.
    Returns ``{"dense_metric", "layers": [ranked rows]}``; each row has the layer, its gate
    retention and drop, the task metric and drop (with ``metric_fn``), the layer's stored and
    dense bytes and the stages that ran. ``pipeline`` builds the cascade (a subclass that wires in
    distillation, for stages that train); ``pipeline_kwargs`` go to it.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layer_sensitivity needs at least one layer")
    dense_metric = float(metric_fn(model)) if metric_fn is not None else None
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(layers):
        sec = single_layer_section(section, name, stages)
        work = copy.deepcopy(model)
        pipe = pipeline(sec, calibration_data=calibration_data, holdout_data=holdout_data, seed=seed,
                        **pipeline_kwargs)
        pipe.compress(work)
        steps = step_records(pipe.records)
        retention = float(steps[-1].retention) if steps else 1.0
        inner = getattr(work, "model", work)
        summary = compression_summary(inner)
        row: dict[str, Any] = {
            "layer": name, "stages": list(sec.cascade.stages), "gate_retention": retention,
            "gate_drop": 1.0 - retention, "stored_bytes": summary["stored_bytes"],
            "dense_bytes": summary["dense_bytes"], "compression_rate": summary["compression_rate"],
            "error": next((r.get("error") for r in pipe.records if r.get("error")), None),
        }
        if metric_fn is not None:
            value = float(metric_fn(work))
            row["metric"] = value
            row["metric_drop"] = dense_metric - value
        rows.append(row)
        del work, pipe
        if progress is not None:
            progress("layer sensitivity", i + 1, len(layers))
    key = "metric_drop" if metric_fn is not None else "gate_drop"
    rows.sort(key=lambda r: (-r[key], r["layer"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return {"dense_metric": dense_metric, "ranked_by": key, "stages": list(rows[0]["stages"]), "layers": rows}
