"""Optimisers, learning-rate schedules, mixed precision and activation checkpointing, from config.

Schedules are torch's own (``LinearLR``, ``CosineAnnealingLR``, ``ConstantLR`` chained by
``SequentialLR``) and step once per optimiser step. Warm-up is linear: at step ``k < warmup`` the
rate is ``lr * (k + 1) / (warmup + 1)``. Mixed precision is bf16 autocast (CPU and CUDA, no loss
scaling needed) or fp16 autocast with a gradient scaler (CUDA only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def build_optimizer(params: Iterable[nn.Parameter], name: str = "adamw", lr: float = 1e-4,
                    weight_decay: float = 0.0, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``adamw`` (decoupled weight decay, ``betas``) or ``sgd`` (with momentum)."""
    params = list(params)
    if not params:
        raise ConfigError("training: no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"training.optimizer: got {name!r}; allowed: adamw, sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str = "cosine", total_steps: int = 1,
                    warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """``cosine`` (to ``min_lr_ratio * lr``), ``linear`` (to ``min_lr_ratio * lr``) or ``constant``, after warm-up."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    warmup = max(0, min(warmup_steps, total_steps))
    decay = max(1, total_steps - warmup)
    if name == "cosine":
        base_lr = optimizer.param_groups[0]["lr"]
        main = CosineAnnealingLR(optimizer, T_max=decay, eta_min=base_lr * min_lr_ratio)
    elif name == "linear":
        main = LinearLR(optimizer, start_factor=1.0, end_factor=max(min_lr_ratio, 1e-8), total_iters=decay)
    elif name == "constant":
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ConfigError(f"training.scheduler: got {name!r}; allowed: cosine, linear, constant")
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class Precision:
    """Autocast and (for fp16) gradient scaling for one device: ``fp32``, ``bf16`` or ``fp16``."""

    def __init__(self, precision: str = "fp32", device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"training.precision: got {precision!r}; allowed: fp32, bf16, fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("training.precision: fp16 needs a CUDA device (loss scaling); use bf16 on the CPU")
        self.name = precision
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16") if device.type == "cuda" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of a forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaling else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale (before clipping)."""
        if self.scaling:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Optimiser step; with fp16 skipped on inf/nan gradients. Returns whether it stepped."""
        if not self.scaling:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaling else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaling and state:
            self.scaler.load_state_dict(state)


def enable_activation_checkpointing(model: nn.Module) -> bool:
    """Turn on Hugging Face activation (gradient) checkpointing, non-reentrant; returns whether it could."""
    kwargs = {"use_reentrant": False}
    if getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return True
    return False


def checkpointing_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Modules whose ``gradient_checkpointing`` flag is on."""
    return (m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True)
