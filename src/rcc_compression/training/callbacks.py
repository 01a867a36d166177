"""Training callbacks and the handler that calls them.

A callback overrides any of the ``on_*`` hooks; the trainer calls them through a
:class:`CallbackHandler`. Callbacks that write or print (checkpointing, logging, progress) act on
the main rank only; the others see identical all-reduced metrics on every rank, so decisions
such as early stopping agree everywhere. A callback's ``state_dict`` is saved with the trainer's
checkpoint and restored on resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tracking import ExperimentTracker
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger

if TYPE_CHECKING:
    from .trainer import CompressionTrainer

log = get_logger("training")


class Callback:
    """Base class: every hook does nothing. ``main_only`` callbacks run on rank 0 only."""

    main_only = False

    def on_train_begin(self, trainer: CompressionTrainer) -> None: ...
    def on_epoch_begin(self, trainer: CompressionTrainer) -> None: ...
    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None: ...
    def on_validation_end(self, trainer: CompressionTrainer, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: CompressionTrainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackHandler:
    """Calls a hook on every callback (main-only callbacks only on the main rank)."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def add(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def fire(self, hook: str, trainer: CompressionTrainer, *args: Any) -> None:
        for cb in self.callbacks:
            if cb.main_only and not trainer.dist.is_main:
                continue
            getattr(cb, hook)(trainer, *args)

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in state:
                cb.load_state_dict(state[key])


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` validations."""

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.best: float | None = None
        self.wait = 0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def on_validation_end(self, trainer: CompressionTrainer, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics or math.isnan(metrics[self.monitor]):
            return
        value = metrics[self.monitor]
        if self.improved(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.state.should_stop = True
            log.info("early stopping at epoch %d: %s did not improve on %.6g for %d validations",
                     trainer.state.epoch, self.monitor, self.best, self.wait)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


class ModelCheckpoint(Callback):
    """Save ``directory/last`` every ``every_steps`` optimiser steps and at each epoch end.

    With ``monitor``, also ``directory/best`` when the monitored validation metric improves.
    Saving is collective (every rank calls it; rank 0 writes), so this is not ``main_only``.
    """

    def __init__(self, directory: str | Path, every_steps: int = 0, every_epochs: int = 1,
                 monitor: str | None = None, mode: str = "min") -> None:
        self.directory = Path(directory)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None

    @property
    def last(self) -> Path:
        return self.directory / "last"

    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        if self.every_steps and trainer.state.step % self.every_steps == 0:
            trainer.save_checkpoint(self.last)

    def on_validation_end(self, trainer: CompressionTrainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None or math.isnan(value):
            return
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best = value
            trainer.save_checkpoint(self.directory / "best")

    def on_epoch_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        if self.every_epochs and trainer.state.epoch % self.every_epochs == 0:
            trainer.save_checkpoint(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")


class LoggingCallback(Callback):
    """Log the loss every ``every_steps`` steps and a summary line per epoch (main rank)."""

    main_only = True

    def __init__(self, every_steps: int = 50) -> None:
        self.every_steps = every_steps

    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        if self.every_steps and trainer.state.step % self.every_steps == 0:
            log.info("step %d  %s", trainer.state.step, _fmt(logs))

    def on_epoch_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        log.info("epoch %d/%d  %s", trainer.state.epoch, trainer.num_epochs, _fmt(logs))


class LearningRateMonitor(Callback):
    """Record the learning rate of each parameter group after every optimiser step."""

    def __init__(self) -> None:
        self.history: list[list[float]] = []

    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        lrs = [float(g["lr"]) for g in trainer.optimizer.param_groups]
        self.history.append(lrs)
        logs["lr"] = lrs[0]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [list(x) for x in state.get("history", [])]


class ProgressBar(Callback):
    """A rich progress bar over all optimiser steps (main rank)."""

    main_only = True

    def __init__(self, description: str = "training") -> None:
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def on_train_begin(self, trainer: CompressionTrainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=trainer.total_steps,
                                             completed=trainer.state.step, loss="")

    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.state.step, loss=f"loss {logs.get('loss', 0):.4g}")

    def on_train_end(self, trainer: CompressionTrainer) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TrackingCallback(Callback):
    """Send every optimiser step's logs (series ``train``) and every validation (``val``) to a tracker (main rank).

    Steps continue across trainers that share a tracker (a cascade distils once per round), so
    the ``train`` series of a run is one axis of optimiser steps.
    """

    main_only = True

    def __init__(self, tracker: ExperimentTracker, series: str = "train", val_series: str = "val") -> None:
        self.tracker, self.series, self.val_series = tracker, series, val_series
        self._offset = 0
        self._lr = 0.0

    def on_train_begin(self, trainer: CompressionTrainer) -> None:
        # a fresh trainer continues after the points already logged; a resumed one keeps its step numbers
        self._offset = max(0, self.tracker.next_step(self.series) - trainer.state.step)
        self._lr = float(trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        # the schedule has already moved on: log the learning rate this step was taken with
        values = {**logs, "epoch": trainer.state.epoch, "lr": self._lr}
        self._lr = float(trainer.optimizer.param_groups[0]["lr"])
        self.tracker.log_metrics(values, self._offset + trainer.state.step - 1, self.series)

    def on_validation_end(self, trainer: CompressionTrainer, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({**metrics, "step": self._offset + trainer.state.step}, series=self.val_series)


class ProgressFile(Callback):
    """Keep ``progress.json`` (format ``rcc-train-progress``) current for live views: step of total, epoch, loss.

    Written atomically at most every ``every_s`` seconds, at each epoch's end and when training ends.
    """

    main_only = True
    FORMAT = "rcc-train-progress"

    def __init__(self, path: str | Path, every_s: float = 1.0) -> None:
        self.path, self.every_s = Path(path), every_s
        self._last = 0.0
        self._loss: float | None = None

    def _write(self, trainer: CompressionTrainer, done: bool = False) -> None:
        self._last = time.monotonic()
        atomic_write_json(self.path, {"format": self.FORMAT, "format_version": 1, "step": trainer.state.step,
                                      "total_steps": trainer.total_steps, "epoch": trainer.state.epoch,
                                      "num_epochs": trainer.num_epochs, "loss": self._loss, "done": done})

    def on_train_begin(self, trainer: CompressionTrainer) -> None:
        self._write(trainer)

    def on_step_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        self._loss = logs.get("loss", self._loss)
        if time.monotonic() - self._last >= self.every_s:
            self._write(trainer)

    def on_epoch_end(self, trainer: CompressionTrainer, logs: dict[str, float]) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: CompressionTrainer) -> None:
        self._write(trainer, done=True)


def _fmt(logs: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.5g}" for k, v in logs.items() if isinstance(v, (int, float)))
