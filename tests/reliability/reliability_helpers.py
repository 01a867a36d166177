"""Shared helpers of the reliability tests: a small MLP, its batches, state comparison."""

from __future__ import annotations

import torch
from torch import nn

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.config import load_config


class MLP(nn.Module):
    """Two hidden Linear layers and a head; ``forward(x)`` returns the head's output."""

    def __init__(self, n: int = 24, hidden: int = 48, out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, hidden)
        self.fc2 = nn.Linear(hidden, n)
        self.head = nn.Linear(n, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.tanh(self.fc1(x))) + x)


def make_batches(count: int = 6, rows: int = 32, n: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, n, generator=g)} for _ in range(count)]


def mlp_section(rounds: int = 2, threshold: float = 0.0):
    """dare then nullu on the MLP's Linear layers, ``rounds`` rounds (2 x rounds steps)."""
    return load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.6, "iterations": rounds, "fine_tune_epochs": 0, "targets": ["^fc", "^head"]},
        "nullu": {"param_budget": 0.3, "rank_reduction": None, "energy_threshold": None, "targets": ["^fc"]},
        "cascade": {"stages": ["dare", "nullu"], "validation_threshold": threshold}}}).compression


def fresh_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def compressed_mlp() -> MLP:
    model = fresh_mlp()
    CascadePipeline(mlp_section(rounds=1), calibration_data=make_batches(), seed=1).compress(model)
    return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
