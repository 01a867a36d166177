"""Calibration statistics: exact sums whether or not a forward is cut short after the last layer read."""

import torch
from torch import nn

from rcc_compression.compression.calibration import calls_per_forward, collect_layer_stats


class Twice(nn.Module):
    """``fc`` runs twice per forward (a shared module): no forward may stop after its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(x))))


class Keyword(nn.Module):
    """Calls ``inner`` with the batch's ``input`` (batches are keyword batches)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.m = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the batch's key
        return self.m(input)


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(5, 8, generator=g)} for _ in range(n)]


def _three_layers() -> tuple[nn.Sequential, list[int]]:
    """Three Linear layers and the list the last one appends to each time it runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    runs: list[int] = []
    model[4].register_forward_hook(lambda *_: runs.append(1))
    return model, runs


def test_stats_stop_after_the_last_layer_read_and_match_the_full_pass():
    model, runs = _three_layers()
    batches = _batches()
    stats = collect_layer_stats(Keyword(model), ["m.2"], batches, gram=True)
    assert len(runs) == 1  # the first batch ran whole; the later ones stopped once layer 2 had read its input
    xs = torch.cat([torch.relu(model[0](b["input"])) for b in batches]).double()
    st = stats["m.2"]
    assert st.count == 15
    torch.testing.assert_close(st.sum_sq, (xs * xs).sum(0))
    torch.testing.assert_close(st.gram, (xs.t() @ xs).float(), rtol=1e-5, atol=1e-5)


def test_known_single_calls_stop_the_first_forward_too():
    model, runs = _three_layers()
    batches = _batches()
    calls = calls_per_forward(Keyword(model), ["m.0", "m.2", "m.4"], batches[0])
    assert calls == {"m.0": 1, "m.2": 1, "m.4": 1} and len(runs) == 1
    whole = collect_layer_stats(Keyword(model), ["m.2"], batches, gram=True)
    stats = collect_layer_stats(Keyword(model), ["m.2"], batches, gram=True, once=True)
    assert len(runs) == 2  # the counting pass and the first pass of ``whole``; ``once`` ran no head at all
    assert stats["m.2"].count == whole["m.2"].count
    assert torch.equal(stats["m.2"].gram, whole["m.2"].gram)
    assert calls_per_forward(Keyword(Twice()), ["m.fc", "m.out"], batches[0]) == {"m.fc": 2, "m.out": 1}


def test_a_layer_that_runs_twice_per_forward_is_read_whole():
    torch.manual_seed(0)
    model = Twice()
    runs = []
    model.out.register_forward_hook(lambda *_: runs.append(1))
    batches = _batches()
    stats = collect_layer_stats(Keyword(model), ["m.fc"], batches, gram=True)
    assert len(runs) == 3  # never cut short
    first = torch.cat([b["input"] for b in batches])
    second = torch.cat([torch.relu(model.fc(b["input"])) for b in batches])
    xs = torch.cat([first, second]).double()
    assert stats["m.fc"].count == 30
    torch.testing.assert_close(stats["m.fc"].sum_sq, (xs * xs).sum(0))
