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

from ..compression.calibration import flatten_outputs, to_device
from ..compression.layers import compressed_layers, to_working
from ..errors import ConfigError
from ..utils.logging import get_logger
from .callbacks import Callback
from .distributed import DistInfo
from .losses import DistillationLoss, LossWeights, model_family
from .optim import build_optimizer
from .privacy import PrivateTraining, poisson_draws, validate_objective
from .settings import TrainingSection
from .teacher import Teacher, model_extras
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
    ledger: list[tuple[float, float, int]] | None = None,
) -> dict[str, Any]:
    """Distil ``params`` of ``model`` towards precomputed teacher outputs of ``batches``.

    Batches are visited in permutations drawn from ``generator`` (one per epoch, drawn up front),
    so the same generator state gives the same run. The default schedule is constant: these runs
    are short, repeated between pruning rounds, and a decay would waste their last steps.
    Returns the first and last epoch's mean loss.

    With ``config.privacy`` it trains by DP-SGD instead (:func:`private_finetune_on_batches`);
    ``ledger`` is the accountant history that every private distillation of one run shares.
    """
    cfg = config or TrainingSection(scheduler="constant")
    cfg = cfg.model_copy(update={"learning_rate": lr, "num_epochs": epochs})
    if cfg.privacy is not None:
        return private_finetune_on_batches(model, params, batches, teacher_outputs, cfg, device,
                                           ledger if ledger is not None else [])
    orders = [torch.randperm(len(batches), generator=generator).tolist() for _ in range(epochs)]
    loss = DistillationLoss(model_family(model), LossWeights.from_config(cfg), cfg.temperature)
    objective = DistillationObjective(loss, Teacher(precomputed=teacher_outputs, device=device))
    with CompressionTrainer(model, objective, cfg, train_data=list(batches), params=params, order=orders.__getitem__,
                            device=device, dist=DistInfo(), callbacks=callbacks) as trainer:
        state = trainer.fit()
    first, last = state.history[0], state.history[-1]
    return {"kd_loss_first_epoch": first["train_loss"], "kd_loss_last_epoch": last["train_loss"]}


def _rows(values: Mapping[str, Any], rows: torch.Tensor, size: int) -> dict[str, Any]:
    """The entries of a batch (or of its teacher outputs) that are per item, restricted to ``rows``."""
    return {k: v[rows] for k, v in values.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size}


def private_finetune_on_batches(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Mapping[str, Any]],
    teacher_outputs: Sequence[Mapping[str, torch.Tensor]],
    cfg: TrainingSection,
    device: torch.device | str,
    ledger: list[tuple[float, float, int]],
) -> dict[str, Any]:
    """Stage distillation by DP-SGD: ``cfg.num_epochs`` expected passes of Poisson samples of the batches' items.

    Each step draws every item of every batch with probability ``batch size / items``; the items
    drawn from one batch run as one forward (keeping that batch's padding and its teacher
    outputs), and the optimiser clips each item's gradient and adds the noise once per step.
    ``ledger`` (the accountant history of earlier private distillations of the same run) is
    extended, so the whole run spends one budget. The learning rate is constant.
    """
    sizes = [int(next(v for v in b.values() if isinstance(v, torch.Tensor)).shape[0]) for b in batches]
    items = sum(sizes)
    steps = cfg.num_epochs * len(batches)
    private = PrivateTraining(cfg.privacy, items, max(1, round(items / len(batches))), steps, spent=ledger)
    loss_fn = DistillationLoss(model_family(model), LossWeights.from_config(cfg), cfg.temperature)
    validate_objective(DistillationObjective(loss_fn, Teacher(precomputed=teacher_outputs)), loss_fn.family)
    was = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    masked = [m for m in compressed_layers(model).values()
              if m.mask is not None and m.weight is not None and id(m.weight) in chosen]
    optimizer = private.attach(model, build_optimizer(list(params), cfg.optimizer, cfg.learning_rate,
                                                      cfg.weight_decay, cfg.momentum, tuple(cfg.betas)), params)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    training = model.training
    model.eval()
    for m in compressed_layers(model).values():
        m.train(True)
    losses: list[float] = []
    try:
        for draw in poisson_draws(items, private.sample_rate, steps, private.generator):
            if not private.may_step():
                break
            chosen_rows = torch.tensor(draw, dtype=torch.long)
            step_loss, done = 0.0, 0
            for b, batch in enumerate(batches):
                rows = chosen_rows[(chosen_rows >= offsets[b]) & (chosen_rows < offsets[b + 1])] - offsets[b]
                if rows.numel() == 0:
                    continue
                sub = to_device(_rows(batch, rows, sizes[b]), device)
                teacher = to_device(_rows(teacher_outputs[b], rows, sizes[b]), device)
                student = flatten_outputs(model(**sub))
                student.update(model_extras(model))
                loss, _ = loss_fn(student, teacher, sub)
                loss.backward()
                step_loss += float(loss.detach()) * rows.numel()
                done += rows.numel()
            if done == 0:
                private.empty_batch()
            optimizer.step()
            private.after_step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for m in masked:
                    m.weight.mul_(m.mask)
            losses.append(step_loss / max(done, 1))
    finally:
        private.close()
        for p, flag in was.items():
            p.requires_grad_(flag)
        model.train(training)
    ledger[:] = private.history
    per_epoch = max(1, len(batches))
    first, last = losses[:per_epoch] or [float("nan")], losses[-per_epoch:] or [float("nan")]
    return {"kd_loss_first_epoch": sum(first) / len(first), "kd_loss_last_epoch": sum(last) / len(last),
            "privacy": private.record()}


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """``compressed``: every parameter of the compressed layers; ``all``: every parameter.

    Compressed layers in their inference form get their float parameters first (they are what an
    optimizer holds); :func:`~rcc_compression.compression.layers.to_inference` gives them back.
    """
    to_working(model)
    if which == "all":
        return list(model.parameters())
    params = [p for m in compressed_layers(model).values() for p in m.parameters()]
    if not params:
        raise ConfigError("training.trainable=compressed, but the model has no compressed layers")
    return params
