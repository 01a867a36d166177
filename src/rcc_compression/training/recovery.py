"""Recovery by distillation: the compression engine's distiller and what recovery training moves.

:func:`finetune_on_batches` is the distiller the ``dare`` (between pruning rounds) and
``alphaedit`` (``scaling``) stages call, handed to the engine by the orchestration layer
(``rcc_compression.CompressionPipeline``, ``compress_model``, ``rcc compress``);
:func:`trainable_parameters` is what ``rcc train`` (:mod:`rcc_compression.jobs.train`) fine-tunes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..compression.layers import compressed_layers
from ..errors import ConfigError
from ..utils.logging import get_logger
from .callbacks import Callback
from .distributed import DistInfo
from .losses import DistillationLoss, LossWeights, model_family
from .settings import TrainingSection
from .teacher import Teacher
from .trainer import CompressionTrainer, DistillationObjective

log = get_logger("training")


def finetune_on_batches(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Mapping[str, Any]],
    teacher_outputs: Sequence[Mapping[str, torch.Tensor]],
    epochs: int,
    lr: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    config: TrainingSection | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, float]:
    """Distil ``params`` of ``model`` towards precomputed teacher outputs of ``batches``.

    Batches are visited in permutations drawn from ``generator`` (one per epoch, drawn up front),
    so the same generator state gives the same run. The default schedule is constant: these runs
    are short, repeated between pruning rounds, and a decay would waste their last steps.
    Returns the first and last epoch's mean loss.
    """
    cfg = config or TrainingSection(scheduler="constant")
    cfg = cfg.model_copy(update={"learning_rate": lr, "num_epochs": epochs})
    orders = [torch.randperm(len(batches), generator=generator).tolist() for _ in range(epochs)]
    loss = DistillationLoss(model_family(model), LossWeights.from_config(cfg), cfg.temperature)
    objective = DistillationObjective(loss, Teacher(precomputed=teacher_outputs, device=device))
    with CompressionTrainer(model, objective, cfg, train_data=list(batches), params=params, order=orders.__getitem__,
                            device=device, dist=DistInfo(), callbacks=callbacks) as trainer:
        state = trainer.fit()
    first, last = state.history[0], state.history[-1]
    return {"kd_loss_first_epoch": first["train_loss"], "kd_loss_last_epoch": last["train_loss"]}


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """``compressed``: every parameter of the compressed layers; ``all``: every parameter."""
    if which == "all":
        return list(model.parameters())
    params = [p for m in compressed_layers(model).values() for p in m.parameters()]
    if not params:
        raise ConfigError("training.trainable=compressed, but the model has no compressed layers")
    return params
