"""Observability of a compress run: its tracker, what it logs, its figure records and figures.

The compress job calls these: :func:`start_tracker` at the start, :func:`cascade_logger` as the
cascade's step callback, :func:`finish_compress_tracking` once ``results.json`` is written. The
metrics logged are :func:`results_metrics` of ``results.json``, so what the tracking backends hold
equals the results file (the tests read W&B's and TensorBoard's files back to check it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.snapshots import record_model_views
from ..compression.records import StepRecord
from ..config import RCCConfig
from ..models.base import ModelWrapper
from ..tracking import ExperimentTracker, metric_key
from ..utils.logging import get_logger
from ..visualization.figures import write_run_figures
from ..visualization.records import load_run

log = get_logger("jobs")

CASCADE_VALUES = ("retention", "metric", "seconds", "round")
ACHIEVED_VALUES = ("compression_rate", "sparsity", "mean_rank", "stored_bytes", "dense_bytes")


def start_tracker(cfg: RCCConfig, run_dir: Path, resolved: dict[str, Any]) -> ExperimentTracker:
    """The run's tracker, as ``cfg.tracking`` says, with the resolved config logged."""
    return ExperimentTracker(cfg.tracking, run_dir, run_config=resolved)


def step_metrics(record: StepRecord | Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one cascade step record that the ``cascade`` series logs."""
    step = record if isinstance(record, StepRecord) else StepRecord.model_validate(dict(record))
    out = {k: float(v) for k in CASCADE_VALUES if isinstance(v := getattr(step, k), (int, float))}
    # a value may be None (sparsity where no layer holds an S)
    out.update({k: float(v) for k in ACHIEVED_VALUES if (v := getattr(step.achieved, k)) is not None})
    out["passed"] = float(step.passed)
    return out


def cascade_logger(tracker: ExperimentTracker) -> Callable[[dict[str, Any]], None]:
    """A step callback logging each cascade step (series ``cascade``; ``stage/<name>`` by round) and system metrics."""

    def on_step(record: dict[str, Any]) -> None:
        values = step_metrics(record)
        tracker.log_metrics(values, record["step"], "cascade")
        tracker.log_metrics(values, record["round"], f"stage/{record['stage']}")
        tracker.log_system(record["step"])
        tracker.log_event("cascade_step", step=record["step"], stage=record["stage"], round=record["round"],
                          train_step=tracker.next_step("train"))

    return on_step


def chain(*callbacks: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """One callback calling each given one in turn."""
    live = [c for c in callbacks if c is not None]

    def call(record: dict[str, Any]) -> None:
        for c in live:
            c(record)

    return call


def results_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{series: {name: value}}`` of a compress run's ``results.json``: quality (with CIs), gate, storage, latency.

    Series ``eval/dense`` and ``eval/compressed`` (step 0); names are :func:`metric_key` of the
    results' keys, so each value can be found back in ``results.json``.
    """
    out: dict[str, dict[str, float]] = {}
    for variant in ("dense", "compressed"):
        vals: dict[str, float] = {}
        for key, value in results.get("quality", {}).get(variant, {}).items():
            vals[metric_key(key)] = float(value)
        for key, (lo, hi) in results.get("quality_ci", {}).get(variant, {}).items():
            vals[metric_key(key, "ci_low")] = float(lo)
            vals[metric_key(key, "ci_high")] = float(hi)
        eff = results.get("efficiency", {}).get(variant) or {}
        for key, value in eff.get("storage", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                vals[metric_key("storage", key)] = float(value)
        for bs, entry in eff.get("per_batch_size", {}).items():
            lat = entry.get("latency", {})
            if "median_ms" in lat:
                vals[metric_key(f"latency_bs{bs}", "median_ms")] = float(lat["median_ms"])
        if variant == "compressed" and results.get("gate", {}).get("retention") is not None:
            vals["gate_retention"] = float(results["gate"]["retention"])
        if vals:
            out[f"eval/{variant}"] = vals
    return out


def evaluation_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{series: {name: value}}`` of an ``rcc evaluate`` ``results.json``: one series per benchmark and dataset.

    Series ``eval/<benchmark>/<dataset>`` (step 0); each metric with its interval bounds where a
    bootstrap ran (none is logged where none ran), and latency medians of the efficiency benchmark.
    """
    out: dict[str, dict[str, float]] = {}
    for bench, per_ds in results.get("results", {}).items():
        for ds, res in per_ds.items():
            vals: dict[str, float] = {}
            if bench == "efficiency":
                for bs, entry in res.get("profile", {}).get("per_batch_size", {}).items():
                    if "median_ms" in entry.get("latency", {}):
                        vals[metric_key(f"latency_bs{bs}", "median_ms")] = float(entry["latency"]["median_ms"])
            groups = [("", res.get("metrics", {}))]
            groups += [(f"_{k.split('_', 1)[1]}", v) for k, v in res.items() if k.startswith("metrics_")]
            for suffix, metrics in groups:
                for name, m in metrics.items():
                    if isinstance(m, dict) and "value" in m:
                        vals[metric_key(f"{name}{suffix}")] = float(m["value"])
                        if m.get("samples", 1) and "ci_low" in m and "ci_high" in m:
                            vals[metric_key(f"{name}{suffix}", "ci_low")] = float(m["ci_low"])
                            vals[metric_key(f"{name}{suffix}", "ci_high")] = float(m["ci_high"])
                    elif isinstance(m, (int, float)) and not isinstance(m, bool):
                        vals[metric_key(f"{name}{suffix}")] = float(m)
            if vals:
                out[metric_key("eval", bench, ds)] = vals
    return out


def log_evaluation(tracker: ExperimentTracker, results: dict[str, Any]) -> None:
    """Log an ``rcc evaluate`` run's results (:func:`evaluation_metrics`) and a summary of them."""
    metrics = evaluation_metrics(results)
    for series, values in metrics.items():
        tracker.log_metrics(values, 0, series)
    summary = {f"{series}/{k}": v for series, values in metrics.items() for k, v in values.items()}
    summary.update({f"system/{k}": v for k, v in tracker.log_system(tracker.next_step("system")).items()})
    tracker.log_summary(summary)


def finish_compress_tracking(tracker: ExperimentTracker, cfg: RCCConfig, run_dir: Path, results: dict[str, Any],
                             pipe: Any = None, wrapper: nn.Module | None = None,
                             image_batch: dict[str, Any] | None = None) -> None:
    """Log the results, the compressed model as an artifact, record figure data and write the figures."""
    for series, values in results_metrics(results).items():
        tracker.log_metrics(values, 0, series)
    summary = {f"{series}/{k}": v for series, values in results_metrics(results).items() for k, v in values.items()}
    system = tracker.log_system(tracker.next_step("system"))
    summary.update({f"system/{k}": v for k, v in system.items()})
    tracker.log_summary(summary)
    if cfg.tracking.log_model and (run_dir / "compressed").is_dir():
        tracker.log_artifact(run_dir / "compressed", f"{run_dir.name}-compressed", "model",
                             {"model": cfg.model.name, "stages": results.get("stages"),
                              "stored_bytes": results.get("stored_bytes_reported")})
    if not cfg.tracking.figures:
        return
    tracker.log_event("phase", phase="figures")
    try:
        if pipe is not None and wrapper is not None and pipe.dense_model is not None:
            inner = wrapper.model if isinstance(wrapper, ModelWrapper) else wrapper
            pixels = image_batch.get("pixel_values") if image_batch else None
            proc = getattr(wrapper, "image_processor", None)
            record_model_views(run_dir, pipe.dense_model, inner, pixels, getattr(proc, "image_mean", None),
                               getattr(proc, "image_std", None))
        written = write_run_figures(load_run(run_dir))
        log.info("figures: %s", ", ".join(sorted(written)) or "none")
    except (RuntimeError, ValueError, OSError) as exc:  # figures must never fail a finished run
        log.warning("figures not written: %s: %s", type(exc).__name__, exc)
