"""Experiment tracking: one :class:`ExperimentTracker`, several backends, chosen by the ``tracking`` config.

A run logs *series* of metrics: ``cascade`` (one point per cascade step), ``stage/<name>`` (one per
round of a stage), ``train`` (one per optimiser step of any distillation), ``val`` (one per
validation), ``eval`` (the evaluation after the run) and ``system`` (wall time and peak memory).
Each point is ``(series, step, {name: value})``; every backend keeps the series' own step axis.

Backends (:mod:`.backends`):

- ``console``: one log line per point, at debug level (the run's log file ``run.log`` keeps them;
  the console shows progress bars);
- ``file``: ``metrics.jsonl`` in the run directory, one JSON object per line, flushed as written,
  so a dashboard can follow a running job (read back by :func:`read_metrics_file`);
- ``tensorboard``: event files in ``<run_dir>/tensorboard`` (``torch.utils.tensorboard``);
- ``wandb``: a Weights & Biases run in ``<run_dir>/wandb``. Without an API key (and without an
  explicit ``WANDB_MODE``) it runs offline; ``wandb sync`` uploads it later.

Tracking never fails or stalls a run: a backend that cannot start, or raises, is switched off with
one warning, and W&B's ``run.finish()`` is given a bounded time. Metric names are sanitised to
``[A-Za-z0-9_.-]`` parts joined by ``/`` (:func:`metric_key`), which every backend keeps unchanged.

The package sits above ``utils`` and below everything that logs (training, visualization, jobs);
it imports nothing of the package but ``utils``.
"""

from __future__ import annotations

from .backends import (
    Backend,
    ConsoleBackend,
    FileBackend,
    TensorBoardBackend,
    WandbBackend,
    wandb_mode,
)
from .metrics import (
    METRICS_FILE,
    finite,
    flatten_numbers,
    metric_key,
    read_metrics_file,
    series_points,
    system_metrics,
)
from .settings import BACKENDS, TrackingConfig
from .tracker import ExperimentTracker

__all__ = [
    "BACKENDS", "METRICS_FILE", "Backend", "ConsoleBackend", "ExperimentTracker", "FileBackend",
    "TensorBoardBackend", "TrackingConfig", "WandbBackend", "finite", "flatten_numbers", "metric_key",
    "read_metrics_file", "series_points", "system_metrics", "wandb_mode",
]
