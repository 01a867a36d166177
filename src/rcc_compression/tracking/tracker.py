"""The tracker a job holds: it sends metrics, config, system metrics and artifacts to every started backend."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.logging import get_logger
from .backends import Backend, ConsoleBackend, FileBackend, TensorBoardBackend, WandbBackend
from .metrics import flatten_numbers, metric_key, system_metrics
from .settings import TrackingConfig

log = get_logger("tracking")


class ExperimentTracker:
    """Send metrics, the resolved config, system metrics and artifacts to the configured backends.

    >>> with ExperimentTracker(TrackingConfig(backends=["file"]), run_dir) as t:  # doctest: +SKIP
    ...     t.log_metrics({"retention": 0.98}, step=0, series="cascade")

    ``ExperimentTracker()`` (no config) logs nothing, so code can always be handed a tracker.
    Backends that need a directory (``file``, ``tensorboard``, ``wandb``) are skipped, with a
    warning, when there is none.
    """

    def __init__(self, config: TrackingConfig | Mapping[str, Any] | None = None,
                 run_dir: str | os.PathLike[str] | None = None, *, run_config: Mapping[str, Any] | None = None,
                 run_name: str | None = None) -> None:
        if config is None:
            cfg = TrackingConfig(backends=[])
        elif isinstance(config, TrackingConfig):
            cfg = config
        else:
            cfg = TrackingConfig.model_validate(dict(config))
        self.config = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_name = run_name or cfg.run_name or (self.run_dir.name if self.run_dir is not None else "run")
        self.started = time.perf_counter()
        self._steps: dict[str, int] = {}
        self._closed = False
        self.backends: list[Backend] = []
        for name in cfg.backends:
            backend = self._start(name, run_config)
            if backend is not None:
                self.backends.append(backend)
        if run_config is not None:
            self._call("log_config", dict(run_config), skip=("wandb",))

    def _start(self, name: str, run_config: Mapping[str, Any] | None) -> Backend | None:
        if name == "console":
            return ConsoleBackend()
        if self.run_dir is None:
            log.warning("tracking backend %s needs a run directory; skipped", name)
            return None
        try:
            if name == "file":
                return FileBackend(self.run_dir)
            if name == "tensorboard":
                return TensorBoardBackend(self.run_dir, self.run_name)
            return WandbBackend(self.run_dir, self.config, self.run_name, run_config)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
            log.warning("tracking backend %s could not start (%s: %s); continuing without it", name,
                        type(exc).__name__, str(exc)[:300])
            return None

    @property
    def enabled(self) -> bool:
        """Whether any backend is active."""
        return bool(self.backends)

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    def _call(self, method: str, *args: Any, skip: tuple[str, ...] = (), **kwargs: Any) -> None:
        for backend in list(self.backends):
            if backend.name in skip:
                continue
            try:
                getattr(backend, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
                log.warning("tracking backend %s failed in %s (%s: %s); switched off", backend.name, method,
                            type(exc).__name__, str(exc)[:300])
                self.backends.remove(backend)
                try:
                    backend.close("failed")
                except Exception:  # noqa: BLE001, S110 - already reported
                    pass

    # ------------------------------------------------------------------ logging
    def next_step(self, series: str) -> int:
        """The step the next point of ``series`` gets when none is given (0, 1, 2, ...)."""
        return self._steps.get(series, 0)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, series: str = "metrics") -> None:
        """Log numbers (nested mappings are flattened to ``a/b``; non-numbers dropped) as one point of ``series``."""
        if not self.backends:
            return
        values = flatten_numbers(metrics)
        if not values:
            return
        series = metric_key(series)
        step = self._steps.get(series, 0) if step is None else int(step)
        self._steps[series] = max(self._steps.get(series, 0), step + 1)
        self._call("log", series, step, values)

    def log_system(self, step: int | None = None) -> dict[str, float]:
        """Log (and return) elapsed time and peak memory as a point of the ``system`` series."""
        values = system_metrics(self.started)
        self.log_metrics(values, step, "system")
        return values

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the resolved configuration (W&B config, TensorBoard text)."""
        self._call("log_config", dict(config))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Final figures of the run (W&B summary, TensorBoard ``summary/*`` scalars, a ``summary`` line)."""
        flat = flatten_numbers(values)
        if flat:
            self._call("log_summary", flat)

    def log_artifact(self, path: str | os.PathLike[str], name: str, kind: str = "model",
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Log a file or directory (e.g. the compressed model) as an artifact."""
        path = Path(path)
        if not path.exists():
            log.warning("artifact %s: %s does not exist; not logged", name, path)
            return
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        meta = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), **dict(metadata or {})}
        self._call("log_artifact", path, name, kind, meta)

    def log_event(self, event: str, **fields: Any) -> None:
        """A marker in the file log (e.g. the phase a job enters), for live views of a running job."""
        self._call("log_event", event, **fields)

    def finish(self, status: str = "ok") -> None:
        """Close every backend (idempotent). ``status`` other than ``ok`` marks the run failed (W&B exit code 1)."""
        if self._closed:
            return
        self._closed = True
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
                log.warning("tracking backend %s failed to close (%s: %s)", backend.name, type(exc).__name__, exc)
        self.backends = []

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("ok" if exc_type is None else "failed")
