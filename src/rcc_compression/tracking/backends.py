"""The places a run's metrics go: the console (through the log), ``metrics.jsonl``, TensorBoard and W&B.

Every method of a backend may raise; :class:`~rcc_compression.tracking.tracker.ExperimentTracker`
switches a failing backend off. Only public APIs of TensorBoard and W&B are used.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.logging import get_logger
from .metrics import METRICS_FILE, metric_key
from .settings import TrackingConfig

log = get_logger("tracking")

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
#: seconds ``wandb.init`` may take (``WANDB_INIT_TIMEOUT`` overrides)
WANDB_INIT_TIMEOUT = 60.0
#: seconds ``run.finish()`` may take (an unreachable server must not hold the run; ``WANDB_FINISH_TIMEOUT``
#: overrides)
WANDB_CLOSE_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------- backends
class Backend:
    """One place metrics go. Every method may raise; the tracker turns a failing backend off."""

    name = "backend"

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None: ...
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_summary(self, values: Mapping[str, float]) -> None: ...
    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None: ...
    def log_event(self, event: str, **fields: Any) -> None: ...
    def close(self, status: str) -> None: ...


class ConsoleBackend(Backend):
    """Log lines through the package logger, at debug level: the run's ``run.log`` holds every point, the
    console shows them with ``-v`` (it shows progress bars and the result table otherwise)."""

    name = "console"

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.5g}" for k, v in list(values.items())[:12])
        more = f" (+{len(values) - 12} more)" if len(values) > 12 else ""
        log.debug("%s %d: %s%s", series, step, shown, more)

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        log.info("artifact %s (%s): %s", name, kind, path)


class FileBackend(Backend):
    """``metrics.jsonl``: one JSON object per line, appended and flushed (a resumed run appends)."""

    name = "file"

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        self._t0 = time.time()

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, allow_nan=True, separators=(",", ":")) + "\n")
        self._fh.flush()

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        self._write({"kind": "metrics", "series": series, "step": step, "time": time.time(), "values": dict(values)})

    def log_summary(self, values: Mapping[str, float]) -> None:
        self._write({"kind": "summary", "time": time.time(), "values": dict(values)})

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        self._write({"kind": "artifact", "time": time.time(), "name": name, "type": kind, "path": str(path),
                     "metadata": dict(metadata)})

    def log_event(self, event: str, **fields: Any) -> None:
        self._write({"kind": "event", "event": event, "time": time.time(), **fields})

    def close(self, status: str) -> None:
        self._write({"kind": "event", "event": "end", "status": status, "time": time.time()})
        self._fh.close()


class TensorBoardBackend(Backend):
    """TensorBoard event files (scalars per series tag, the config and artifacts as text)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=10)
        self.run_name = run_name

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{series}/{key}", value, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        import yaml

        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log_summary(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"summary/{key}", value, 0)

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        self.writer.add_text(f"artifacts/{metric_key(name)}", f"{kind}: `{path}` {json.dumps(dict(metadata))}", 0)

    def close(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; otherwise ``online`` with an API key in the environment, else ``offline``."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbBackend(Backend):
    """A W&B run in ``<run_dir>/wandb``; offline without an API key. Each series has its own step metric."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: TrackingConfig, run_name: str, config: Mapping[str, Any] | None) -> None:
        import wandb

        self.wandb = wandb
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT))
        bounded = {"finish_timeout": float(os.environ.get("WANDB_FINISH_TIMEOUT", WANDB_CLOSE_TIMEOUT))}
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, init_timeout=timeout,
                                  disable_git=True, disable_code=True,
                                  **{k: v for k, v in bounded.items() if k in wandb.Settings.model_fields})
        self.run = wandb.init(project=cfg.project, name=run_name, tags=list(cfg.tags), dir=str(run_dir),
                              config=dict(config or {}), mode=self.mode, reinit="create_new", settings=settings)
        self._series: set[str] = set()

    def log(self, series: str, step: int, values: Mapping[str, float]) -> None:
        if series not in self._series:
            self.run.define_metric(f"{series}/step", hidden=True)
            self.run.define_metric(f"{series}/*", step_metric=f"{series}/step")
            self._series.add(series)
        self.run.log({f"{series}/step": step, **{f"{series}/{k}": v for k, v in values.items()}})

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_summary(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_artifact(self, path: Path, name: str, kind: str, metadata: Mapping[str, Any]) -> None:
        art = self.wandb.Artifact(metric_key(name).replace("/", "-"), type=kind, metadata=dict(metadata))
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str) -> None:
        """``run.finish()`` within W&B's own ``finish_timeout``, and never longer than that here either.

        An unreachable server must not hold the run: past the timeout the run's local files stay in
        ``<run_dir>/wandb`` for ``wandb sync``.
        """
        timeout = float(os.environ.get("WANDB_FINISH_TIMEOUT", WANDB_CLOSE_TIMEOUT))
        finished = threading.Event()

        def _finish() -> None:
            try:
                self.run.finish(exit_code=0 if status == "ok" else 1)
            finally:
                finished.set()

        threading.Thread(target=_finish, name="wandb-finish", daemon=True).start()
        if not finished.wait(timeout + 5.0):
            log.warning("W&B did not close within %.0f s; the run's local files are kept (wandb sync uploads them)",
                        timeout)
