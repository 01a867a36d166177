"""Fixtures for the training tests: one torch thread (the CPU is shared), compressed tiny students."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rcc_compression.compression.layers import CompressedLinear, replace_module


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models run fastest on one thread, and results do not depend on how many are free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prune_copy(model: nn.Module, rate: float = 0.6, pattern: str = "encoder.layers") -> nn.Module:
    """A copy of ``model`` whose Linear layers under ``pattern`` keep the largest (1 - rate) weights."""
    student = copy.deepcopy(model)
    for name, mod in list(student.named_modules()):
        if isinstance(mod, nn.Linear) and pattern in name:
            layer = CompressedLinear.from_linear(mod)
            w = layer.weight.detach()
            k = int(rate * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values
            layer.set_sparse(w, w.abs() > threshold)
            replace_module(student, name, layer)
    return student


def synthetic_batches(wrapper, n: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` seeded synthetic batches of ``size`` samples."""
    g = torch.Generator().manual_seed(seed)
    return [wrapper.synthetic_batch(size, g) for _ in range(n)]


@pytest.fixture
def prune():
    return prune_copy


@pytest.fixture
def make_batches():
    return synthetic_batches
