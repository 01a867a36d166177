"""Small models whose forward takes keyword batches, for stage tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class MLP(nn.Module):
    """Two Linear layers and a head: ``forward(x)`` returns the head's output."""

    def __init__(self, n: int = 24, hidden: int = 48, out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, hidden)
        self.fc2 = nn.Linear(hidden, n)
        self.head = nn.Linear(n, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.tanh(self.fc1(x))) + x)


def batches_for(n_features: int, count: int, rows: int = 32, seed: int = 0, scale: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(rows, n_features, generator=g)
        out.append({"x": x * scale if scale is not None else x})
    return out


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def mlp_batches():
    return batches_for(24, 6)
