"""Optimisers, schedules, mixed precision and activation checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rcc_compression.config import TrainingSection
from rcc_compression.errors import ConfigError
from rcc_compression.training.losses import DistillationLoss
from rcc_compression.training.optim import Precision, build_optimizer, build_scheduler
from rcc_compression.training.teacher import Teacher
from rcc_compression.training.trainer import CompressionTrainer, DistillationObjective


def _lrs(name: str, total: int, warmup: int, min_ratio: float = 0.0) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, name, total, warmup, min_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_follows_the_formula() -> None:
    got = _lrs("cosine", 10, 3)
    want = [(k + 1) / 4 for k in range(3)] + [0.5 * (1 + math.cos(math.pi * (k - 3) / 7)) for k in range(3, 10)]
    assert got == pytest.approx(want, abs=1e-9)
    got = _lrs("cosine", 6, 0, min_ratio=0.1)
    assert got == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi * k / 6)) for k in range(6)], abs=1e-9)


def test_linear_and_constant_schedules() -> None:
    assert _lrs("linear", 6, 2) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25], abs=1e-7)
    assert _lrs("constant", 4, 0) == pytest.approx([1.0] * 4)
    assert _lrs("constant", 4, 1) == pytest.approx([0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ConfigError):
        _lrs("step", 4, 0)


def test_optimisers_step_as_defined() -> None:
    p = nn.Parameter(torch.tensor([2.0]))
    opt = build_optimizer([p], "adamw", lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(1)
    opt.step()  # decoupled decay only: p <- p (1 - lr wd)
    assert p.item() == pytest.approx(2.0 * (1 - 0.05), abs=1e-7)
    q = nn.Parameter(torch.tensor([1.0]))
    sgd = build_optimizer([q], "sgd", lr=0.1, momentum=0.9)
    for _ in range(2):
        q.grad = torch.ones(1)
        sgd.step()
    assert q.item() == pytest.approx(1.0 - 0.1 - 0.1 * 1.9, abs=1e-7)  # buffers 1, then 0.9 + 1
    with pytest.raises(ConfigError):
        build_optimizer([], "adamw")


def test_precision_modes_on_the_cpu() -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        Precision("fp16", "cpu")
    bf16 = Precision("bf16", "cpu")
    lin = nn.Linear(4, 4)
    with bf16.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with Precision("fp32", "cpu").autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    assert not bf16.scaling and bf16.state_dict() == {}


def _recovery_run(wrapper, batches, **cfg):
    teacher = copy.deepcopy(wrapper.model)
    student = wrapper.model
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.9)
    objective = DistillationObjective(DistillationLoss("clip"), Teacher(teacher))
    trainer = CompressionTrainer(student, objective, TrainingSection(**cfg), train_data=batches, num_epochs=1)
    return trainer


def test_bf16_training_runs_and_learns(tiny_clip, make_batches) -> None:
    data = make_batches(tiny_clip, 4, 8, 0)
    trainer = _recovery_run(tiny_clip, data, precision="bf16", learning_rate=3e-3, scheduler="constant")
    state = trainer.fit(3)
    losses = [h["train_loss"] for h in state.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(make_batches) -> None:
    from rcc_compression.models import get_model

    data = make_batches(get_model("tiny-clip"), 2, 4, 0)
    results = []
    for ckpt in (False, True):
        wrapper = get_model("tiny-clip")
        trainer = _recovery_run(wrapper, data, gradient_checkpointing=ckpt, scheduler="constant")
        calls = []
        fc1 = trainer.model.vision_model.encoder.layers[0].mlp.fc1
        forward = fc1.forward
        fc1.forward = lambda x, f=forward, c=calls: (c.append(1), f(x))[1]  # hooks do not see the recomputation
        trainer.fit(1)
        results.append((len(calls), [p.detach().clone() for p in trainer.model.parameters()]))
    (plain_calls, plain_w), (ckpt_calls, ckpt_w) = results
    assert plain_calls == 2 and ckpt_calls == 4  # recomputed in the backward pass
    for a, b in zip(plain_w, ckpt_w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_with_grad_scaler_on_cuda(make_batches) -> None:
    from rcc_compression.models import get_model

    wrapper = get_model("tiny-clip").to("cuda")
    data = make_batches(wrapper, 4, 8, 0)
    trainer = _recovery_run(wrapper, data, precision="fp16", learning_rate=3e-3, scheduler="constant")
    state = trainer.fit(3)
    assert trainer.precision.scaling and trainer.precision.state_dict()["scale"] > 0
    losses = [h["train_loss"] for h in state.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
