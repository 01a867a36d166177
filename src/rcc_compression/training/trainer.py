"""The recovery trainer: epochs of distillation steps, validation, callbacks, exact resume.

``CompressionTrainer`` trains the parameters it is given (by default those requiring gradients)
to minimise an *objective* ``(model, batch, index) -> (loss, {term: value})``, usually a
:class:`DistillationObjective` (student outputs against a frozen :class:`~.teacher.Teacher`).
It handles gradient accumulation, clipping, mixed precision, activation checkpointing, DDP and
the learning-rate schedule, and keeps the pruning masks of compressed layers.

By default the student runs in *recovery mode*: the whole model in eval mode (no dropout, so it
computes the same deterministic function as the teacher) except the compressed layers, which run
in training mode so that pruned entries get no gradient (``dropout: true`` trains everything in
training mode instead).

A checkpoint is a directory (written to a temporary name, then renamed) of safetensors files
for the model, the loss's own parameters, the optimiser state and the RNG states, and one JSON
file with the step, epoch, running sums, schedule, scaler, callback and Python/NumPy RNG states
and the sha256 of every file. Data order is a function of (seed, epoch), so a run resumed from
any checkpoint repeats the uninterrupted run exactly (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..compression.calibration import flatten_outputs, to_device
from ..compression.layers import CompressedLinear
from ..errors import CheckpointError, ConfigError
from ..utils.io import atomic_save_safetensors, atomic_write_json, load_safetensors, sha256_file, split_aliases
from ..utils.logging import get_logger
from ..utils.seeding import get_rng_state, set_rng_state
from .callbacks import Callback, CallbackHandler
from .distributed import DistInfo, all_reduce_grads, all_reduce_mean, barrier, current, wrap_model
from .losses import DistillationLoss, LossWeights
from .optim import Precision, build_optimizer, build_scheduler, checkpointing_modules, enable_activation_checkpointing
from .privacy import PrivateTraining, validate_objective
from .settings import TrainingSection
from .teacher import Teacher, model_extras

log = get_logger("training")

Batch = Mapping[str, Any]
Objective = Callable[[nn.Module, Batch, "int | None"], "tuple[torch.Tensor, dict[str, float]]"]

CHECKPOINT_FORMAT = "rcc-trainer-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "trainer_state.json"


class DistillationObjective(nn.Module):
    """Student forward, teacher outputs, :class:`~.losses.DistillationLoss` on both.

    ``index`` is the batch's position among batches the teacher has precomputed outputs for
    (``None``: the teacher computes or reads its cache). Being a module, the loss's learned
    projections train and checkpoint with the student.
    """

    def __init__(self, loss: DistillationLoss, teacher: Teacher, forward_kwargs: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__()
        self.loss = loss
        self.teacher = teacher
        self.forward_kwargs = dict(forward_kwargs or {})

    def forward(self, model: nn.Module, batch: Batch, index: int | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**batch, **self.forward_kwargs)
        student = flatten_outputs(out)
        student.update(model_extras(getattr(model, "module", model)))
        teacher = self.teacher(batch, index)
        return self.loss(student, teacher, batch, task_loss=getattr(out, "loss", None))


class TaskObjective(nn.Module):
    """The model's own loss, no teacher (training from scratch or plain fine-tuning).

    CLIP: symmetric contrastive cross-entropy (across ranks with ``gather``); BLIP captioning:
    next-token cross-entropy; any other model: the ``loss`` its forward returns.
    """

    def __init__(self, family: str, label_smoothing: float = 0.0,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.loss = DistillationLoss(family, LossWeights(kd=0.0, feature=0.0, task=1.0), gather=gather,
                                     label_smoothing=label_smoothing)

    def forward(self, model: nn.Module, batch: Batch, index: int | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**batch)
        flat = flatten_outputs(out)
        flat.update(model_extras(getattr(model, "module", model)))
        return self.loss(flat, {}, batch, task_loss=getattr(out, "loss", None))


@dataclass
class TrainingState:
    """Where training stands; everything here is saved in a checkpoint.

    ``epoch``: epochs completed; ``step``: optimiser steps taken; ``batch_in_epoch``: micro-batches
    of the current epoch consumed; ``epoch_sums``/``epoch_steps``: running sums of the current
    epoch's step logs; ``steps``: every step's log; ``history``: one record per finished epoch.
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    should_stop: bool = False
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_steps: int = 0
    steps: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def default_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=g).tolist()


class CompressionTrainer:
    """Train a (compressed) student on an objective; see the module docstring.

    ``train_data`` is a sequence of batch dicts (visited in ``order(epoch)``, default a seeded
    permutation), a ``DataLoader`` (its sampler's ``set_epoch`` is called) or a loader with
    ``set_epoch(epoch, start)`` (a :class:`~rcc_compression.data.loaders.SafeLoader`: a resumed
    epoch skips its first batches without loading them). ``val_data`` the same, for
    :meth:`validate`; ``metric_fn(model) -> {name: value}`` adds metrics there. The config's
    ``max_steps`` ends training after that many optimiser steps (the schedule spans them), and
    ``eval_every_steps`` validates every that many steps instead of at epoch ends.
    ``scheduler(optimizer)`` replaces the config's learning-rate schedule (the reference recipes
    use one that fits a wall-clock budget). A callback that sets ``state.should_stop`` in
    ``on_step_end`` ends the run after that step.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainingSection | None = None,
        *,
        train_data: Sequence[Batch] | DataLoader,
        val_data: Sequence[Batch] | DataLoader | None = None,
        params: Sequence[nn.Parameter] | None = None,
        order: Callable[[int], Sequence[int]] | None = None,
        callbacks: Sequence[Callback] = (),
        num_epochs: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dist: DistInfo | None = None,
        metric_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
        privacy: PrivateTraining | None = None,
    ) -> None:
        self.config = cfg = config or TrainingSection()
        self.dist = dist or current()
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.objective = objective
        self.train_data, self.val_data = train_data, val_data
        self.order, self.seed, self.metric_fn = order, seed, metric_fn
        self.num_epochs = cfg.num_epochs if num_epochs is None else num_epochs
        self.max_steps = getattr(cfg, "max_steps", None)
        self.eval_every = int(getattr(cfg, "eval_every_steps", 0) or 0)
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self._flags = {p: p.requires_grad for p in model.parameters()}
        self._was_training = model.training
        chosen = {id(p) for p in self.params}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.extra_params = ([p for p in objective.parameters() if p.requires_grad]
                             if isinstance(objective, nn.Module) else [])
        if isinstance(objective, nn.Module):
            objective.to(self.device)
        self._masked = [m for m in model.modules() if isinstance(m, CompressedLinear)
                        and m.mask is not None and m.weight is not None and id(m.weight) in chosen]
        if cfg.gradient_checkpointing and not enable_activation_checkpointing(model):
            log.warning("gradient checkpointing asked for, but %s does not support it", type(model).__name__)
        self.net = wrap_model(model, self.dist, self.device)
        self.precision = Precision(cfg.precision, self.device)
        self.optimizer = build_optimizer(self.params + self.extra_params, cfg.optimizer, cfg.learning_rate,
                                         cfg.weight_decay, cfg.momentum, tuple(cfg.betas))
        if self.max_steps is not None:
            self.num_epochs = math.ceil(self.max_steps / max(self.steps_per_epoch, 1))
            self.total_steps = self.max_steps
        else:
            self.total_steps = self.num_epochs * self.steps_per_epoch
        self.scheduler = (scheduler(self.optimizer) if scheduler is not None else
                          build_scheduler(self.optimizer, cfg.scheduler, self.total_steps, cfg.warmup_steps,
                                          cfg.min_lr_ratio))
        self.privacy = privacy
        if privacy is not None:  # DP-SGD: per-sample gradients clipped and noised by the wrapped optimiser
            if self.dist.enabled:
                raise ConfigError("training.privacy: private training runs in one process (not under torchrun)")
            validate_objective(objective, getattr(getattr(objective, "loss", None), "family", "generic"))
            self.optimizer = privacy.attach(model, self.optimizer, self.params)
        self.state = TrainingState()
        self.callbacks = CallbackHandler(callbacks)
        self._pending_rng: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ sizes and data
    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_data)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.config.grad_accumulation)

    def _epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int | None, Batch]]:
        """The batches of ``epoch`` from batch ``start`` on; a loader is pointed at the epoch now."""
        data = self.train_data
        if isinstance(data, Sequence):
            order = self.order(epoch) if self.order is not None else default_order(len(data), self.seed, epoch)
            return ((i, data[i]) for i in list(order)[start:])
        skipped = 0
        if isinstance(data, DataLoader):
            if hasattr(data.sampler, "set_epoch"):
                data.sampler.set_epoch(epoch)
        elif hasattr(data, "set_epoch"):  # a SafeLoader: skips the first batches without loading them
            skipped = int(data.set_epoch(epoch, start) or 0)
        return islice(((None, b) for b in data), start - skipped, None)

    # ------------------------------------------------------------------ modes
    def _train_mode(self) -> None:
        if self.config.dropout:
            self.model.train()
            return
        self.model.eval()
        for m in self.model.modules():
            if isinstance(m, CompressedLinear):
                m.train(True)
        # activation checkpointing runs only in training mode: flip the flag of those modules alone
        for m in checkpointing_modules(self.model):
            m.training = True

    @torch.no_grad()
    def _reapply_masks(self) -> None:
        for m in self._masked:
            m.weight.mul_(m.mask)

    # ------------------------------------------------------------------ training
    def train_epoch(self) -> dict[str, float]:
        """Train one epoch (from where the state says it stands); returns the epoch's mean step logs."""
        st, cfg = self.state, self.config
        batches = self._epoch_batches(st.epoch, st.batch_in_epoch)
        accum, n = cfg.grad_accumulation, self.batches_per_epoch  # after the loader knows the epoch
        self.callbacks.fire("on_epoch_begin", self)
        self._train_mode()
        if self._pending_rng is not None:  # after the iterator is made: a loader draws a seed from torch's RNG
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        micro = 0
        trainable = self.params + self.extra_params
        for i, (index, batch) in enumerate(batches, start=st.batch_in_epoch):
            start = (i // accum) * accum
            size = min(accum, n - start)
            last = i == start + size - 1
            if self.privacy is not None and not self.privacy.may_step():
                st.should_stop = True  # the next step would spend more than the privacy budget
                break
            batch = to_device(batch, self.device)
            if self.privacy is not None and _empty(batch):
                self.privacy.empty_batch()  # an empty Poisson sample: the step adds noise only
                loss, terms = torch.zeros(()), {}
            else:
                sync = self.net.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
                with sync:
                    with self.precision.autocast():
                        loss, terms = self.objective(self.net, batch, index)
                    self.precision.backward(loss / size)
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v
            micro += 1
            st.batch_in_epoch = i + 1
            if not last:
                continue
            all_reduce_grads(self.extra_params, self.dist)
            self.precision.unscale(self.optimizer)
            logs = {k: v / micro for k, v in sums.items()}
            if cfg.grad_clip is not None and self.privacy is None:  # private: each sample's gradient is clipped
                logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
            self.precision.step(self.optimizer)
            if self.privacy is not None:
                logs.update(self.privacy.after_step())
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self._reapply_masks()
            st.step += 1
            logs = all_reduce_mean(logs, self.dist)
            sums, micro = {}, 0
            st.steps.append({"step": st.step, **logs})
            for k, v in logs.items():
                st.epoch_sums[k] = st.epoch_sums.get(k, 0.0) + v
            st.epoch_steps += 1
            self.callbacks.fire("on_step_end", self, logs)
            if self.max_steps is not None and st.step >= self.max_steps:
                st.should_stop = True
            if self.eval_every and (st.step % self.eval_every == 0 or st.should_stop):
                self._validate_now(logs)
            if st.should_stop:  # a callback ended the run mid-epoch (a time budget, a target reached)
                break
        means = {k: v / max(st.epoch_steps, 1) for k, v in st.epoch_sums.items()}
        st.epoch += 1
        st.batch_in_epoch, st.epoch_sums, st.epoch_steps = 0, {}, 0
        return means

    @torch.no_grad()
    def validate(self, data: Sequence[Batch] | DataLoader | None = None) -> dict[str, float]:
        """Mean objective terms (``val_loss``, ``val_<term>``) on validation data, plus ``metric_fn``'s."""
        data = self.val_data if data is None else data
        metrics: dict[str, float] = {}
        was = self.model.training
        self.model.eval()
        try:
            if data is not None:
                sums: dict[str, float] = {}
                count = 0
                for batch in data:
                    with self.precision.autocast():
                        loss, terms = self.objective(self.model, to_device(batch, self.device), None)
                    for k, v in {"loss": float(loss), **terms}.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                metrics = {f"val_{k}": v / max(count, 1) for k, v in sums.items()}
            if self.metric_fn is not None:
                metrics.update({k: float(v) for k, v in self.metric_fn(self.model).items()})
        finally:
            self.model.train(was)
        return all_reduce_mean(metrics, self.dist)

    def _validate_now(self, logs: Mapping[str, float]) -> None:
        """A validation in the middle of an epoch (``eval_every_steps``): record it, tell the callbacks."""
        st = self.state
        if self.val_data is None and self.metric_fn is None:
            return
        metrics = self.validate()
        self._train_mode()
        record = {"step": st.step, "epoch": st.epoch + st.batch_in_epoch / max(self.batches_per_epoch, 1),
                  **{f"train_{k}": v for k, v in logs.items()}, **metrics}
        st.history.append(record)
        self.callbacks.fire("on_validation_end", self, metrics)

    def fit(self, num_epochs: int | None = None) -> TrainingState:
        """Train until ``num_epochs`` epochs are complete (or a callback stops it); returns the state."""
        epochs = self.num_epochs if num_epochs is None else num_epochs
        st = self.state
        if self.max_steps is not None and st.step >= self.max_steps:
            st.should_stop = True  # resumed with its steps already done: train no further
        self.callbacks.fire("on_train_begin", self)
        try:
            while st.epoch < epochs and not st.should_stop:
                record: dict[str, float] = {f"train_{k}": v for k, v in self.train_epoch().items()}
                record = {"epoch": st.epoch, **record}
                if not self.eval_every and (self.val_data is not None or self.metric_fn is not None):
                    metrics = self.validate()
                    record.update(metrics)
                    self.callbacks.fire("on_validation_end", self, metrics)
                if not self.eval_every:
                    st.history.append(record)
                self.callbacks.fire("on_epoch_end", self, record)
        finally:
            self.callbacks.fire("on_train_end", self)
        return st

    def close(self) -> None:
        """Give the model back as it came: requires_grad flags and train/eval mode (and no privacy hooks)."""
        if self.privacy is not None:
            self.privacy.close()
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
        self.model.train(self._was_training)
        self._reapply_masks()

    def __enter__(self) -> CompressionTrainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint directory (rank 0; every rank must call it). Replaces ``path`` atomically."""
        path = Path(path)
        if self.dist.is_main:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model_tensors, aliases = split_aliases(self.model.state_dict())
            opt_tensors, opt_meta = _split_optimizer(self.optimizer.state_dict())
            tensors = {
                "model.safetensors": model_tensors,
                "objective.safetensors": (self.objective.state_dict()
                                          if isinstance(self.objective, nn.Module) else {}),
                "optimizer.safetensors": opt_tensors,
                "rng.safetensors": get_rng_state(),
            }
            for name, ts in tensors.items():
                atomic_save_safetensors(ts, tmp / name)
            np_state = np.random.get_state()
            meta = {
                "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "state": self.state.to_dict(),
                "optimizer": opt_meta,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.state_dict(),
                "callbacks": self.callbacks.state_dict(),
                "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                "numpy_rng": [np_state[0], np_state[1].tolist(), *[_plain(x) for x in np_state[2:]]],
                "aliases": aliases,
                "config": self.config.model_dump(mode="json"),
                "privacy": self.privacy.state_dict() if self.privacy is not None else None,
                "files": {name: sha256_file(tmp / name) for name in tensors},
            }
            atomic_write_json(tmp / STATE_FILE, meta)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        barrier(self.dist)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> TrainingState:
        """Restore everything :meth:`save_checkpoint` wrote; training then continues where it stopped."""
        path = Path(path)
        sfile = path / STATE_FILE
        if not sfile.is_file():
            raise CheckpointError(f"{path}: no {STATE_FILE}; not a trainer checkpoint (or the save did not finish)")
        try:
            meta = json.loads(sfile.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{sfile}: malformed: {exc}") from None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{sfile}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
        for name, digest in meta["files"].items():
            if not (path / name).is_file() or sha256_file(path / name) != digest:
                raise CheckpointError(f"{path}: {name} is missing or corrupt (sha256 mismatch)")
        model_tensors = load_safetensors(path / "model.safetensors", self.device)
        for alias, original in meta["aliases"].items():
            model_tensors[alias] = model_tensors[original]
        try:
            self.model.load_state_dict(model_tensors, strict=True)
            if isinstance(self.objective, nn.Module):
                self.objective.load_state_dict(load_safetensors(path / "objective.safetensors", self.device))
            self.optimizer.load_state_dict(
                _join_optimizer(load_safetensors(path / "optimizer.safetensors"), meta["optimizer"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this model/optimiser: {exc}") from None
        self.scheduler.load_state_dict(meta["scheduler"])
        self.precision.load_state_dict(meta["scaler"])
        self.callbacks.load_state_dict(meta["callbacks"])
        if self.privacy is not None and meta.get("privacy"):
            self.privacy.load_state_dict(meta["privacy"])
        self.state = TrainingState.from_dict(meta["state"])
        py = meta["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npr = meta["numpy_rng"]
        np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
        self._pending_rng = load_safetensors(path / "rng.safetensors")
        set_rng_state(self._pending_rng)
        self._reapply_masks()
        return self.state


# ---------------------------------------------------------------------------------- helpers
def _empty(batch: Batch) -> bool:
    """Whether a batch holds no item (an empty Poisson sample)."""
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return not batch or (first is not None and first.shape[0] == 0)


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _split_optimizer(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                plain.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = t
    for pid, entry in meta["plain_state"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}
