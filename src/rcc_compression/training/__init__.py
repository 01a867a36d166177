"""Training and distillation for recovery after compression.

``losses`` (pure loss functions and the weighted :class:`DistillationLoss`), ``teacher`` (the
frozen teacher and its output cache), ``optim`` (optimisers, schedules, precision),
``callbacks``, ``trainer`` (:class:`CompressionTrainer`), ``settings`` (the ``training:`` section),
``distributed`` (torchrun/DDP) and ``recovery`` (the distiller the engine is handed, and what
``rcc train`` fine-tunes; the job itself is :mod:`rcc_compression.jobs.train`). Imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CompressionTrainer": "trainer", "TrainingState": "trainer", "DistillationObjective": "trainer",
    "TaskObjective": "trainer",
    "DistillationLoss": "losses", "LossWeights": "losses", "Teacher": "teacher",
    "CallbackHandler": "callbacks", "EarlyStopping": "callbacks", "ModelCheckpoint": "callbacks",
    "LoggingCallback": "callbacks", "LearningRateMonitor": "callbacks", "TrainingSection": "settings",
    "finetune_on_batches": "recovery",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
