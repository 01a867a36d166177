"""Planned runs: stages declare what the planner may set, accounting of tied and ignored layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rcc_compression import compress_model
from rcc_compression.compression import registry
from rcc_compression.compression.layers import CompressedLinear, compressed_layers
from rcc_compression.compression.rate import plan_roles
from rcc_compression.compression.registry import CompressionSection
from rcc_compression.compression.stage import Stage, StageConfig
from rcc_compression.compression.storage import save_compressed
from rcc_compression.errors import CompressionError

from .conftest import MLP, batches_for

NO_GATE = {"validation_threshold": 0.0}


def _files_rate(model: nn.Module, tmp_path, scope: str) -> float:
    """The rate the saved files hold: stored / dense bytes of the layers (and the rest, once each, at model scope)."""
    sb = save_compressed(model, tmp_path / "ckpt")["stored_bytes"]
    rest = sb["rest"] if scope == "model" else 0
    return 1.0 - (sb["layers"] + rest) / (sb["layers_dense"] + rest)


def _mlp():
    torch.manual_seed(0)
    return MLP(n=64, hidden=128, out=16), batches_for(64, 6, scale=torch.logspace(0, -1, 64))


class TiedMLP(MLP):
    """The MLP with an embedding tied to the head (as a language model ties its output layer)."""

    def __init__(self) -> None:
        super().__init__(n=64, hidden=128, out=16)
        self.emb = nn.Embedding(16, 64)
        self.unembed = nn.Linear(64, 16, bias=False)
        self.unembed.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.unembed(x) * 0.1


def test_tied_weights_count_once_on_both_sides(tmp_path):
    torch.manual_seed(0)
    model, batches = TiedMLP(), batches_for(64, 6)
    cfg = {"compression": {"cascade": NO_GATE, "quant": {"ignore": ["head", "unembed"]}}}
    out = compress_model(model, 0.2, "quant", calibration_data=batches, config=cfg, scope="model")
    reported = out.compression_stats["achieved_rate"]
    assert reported >= 0.2 - 1e-9
    assert abs(reported - _files_rate(out, tmp_path, "model")) < 0.005 * (1 - reported)


def test_tied_weights_of_tiny_blip_count_once(tmp_path):
    from rcc_compression.models.registry import get_model

    out = compress_model(get_model("tiny-blip"), 0.3, "quant", scope="model", progress=False,
                         config={"compression": {"cascade": NO_GATE}})
    reported = out.compression_stats["achieved_rate"]
    files = _files_rate(out, tmp_path, "model")
    assert abs(reported - files) < 0.005 * (1 - files), (reported, files)  # was 0.3075 against 0.3208


@pytest.mark.parametrize("scope", ["layers", "model"])
def test_layers_a_stage_ignores_get_nothing_from_it(tmp_path, scope):
    model, batches = _mlp()
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu"], **NO_GATE},
                           "quant": {"ignore": ["fc2", "head"]}}}
    out = compress_model(model, 0.9, "cascade", calibration_data=batches, config=cfg, scope=scope)
    stats = out.compression_stats
    plan = stats["plan"]["layers"]
    assert plan["fc2"]["bits"] is None and plan["fc2"]["factor_bits"] is None  # quant ignores fc2
    layers = compressed_layers(out)
    assert isinstance(layers["fc2"], CompressedLinear) and not layers["fc2"].quant
    assert set(plan) == set(layers) == {"fc1", "fc2"}  # the head is ignored by every stage: not planned
    assert isinstance(out.head, nn.Linear)
    files = _files_rate(out, tmp_path, scope)
    assert stats["achieved_rate"] >= 0.9 - 1e-9
    assert abs(stats["achieved_rate"] - files) < 0.005 * (1 - files)


def test_a_layer_no_planning_stage_targets_is_not_planned():
    model, batches = _mlp()
    cfg = {"compression": {"cascade": NO_GATE, "quant": {"targets": ["fc1"]}}}
    out = compress_model(model, 0.5, "quant", calibration_data=batches, config=cfg)
    assert set(out.compression_stats["plan"]["layers"]) == {"fc1"}
    assert isinstance(out.fc2, nn.Linear)


class _OddConfig(StageConfig):
    pass


class _OddStage(Stage):
    """A stage the planner knows nothing about: no plan dimension and no recovery."""

    name = "odd"
    config_class = _OddConfig

    def compress(self, model, ctx):
        return model


def test_a_stage_the_planner_cannot_plan_is_an_error(monkeypatch):
    monkeypatch.setitem(registry.STAGES, "odd", (_OddConfig, _OddStage))
    section = CompressionSection.model_validate({})
    with pytest.raises(CompressionError, match="stage 'odd' cannot be planned"):
        plan_roles(section.model_copy(update={"odd": _OddConfig()}), ["dare", "odd", "nullu"])


def test_nm_sparsity_in_a_planned_run_is_an_error_not_a_dropped_stage():
    model, batches = _mlp()
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu"], **NO_GATE}, "dare": {"nm": "2:4"}}}
    with pytest.raises(CompressionError, match=r"stage 'dare' cannot be planned.*N:M"):
        compress_model(model, 0.8, "cascade", calibration_data=batches, config=cfg)


def test_stages_declare_dimensions_and_recovery_is_kept():
    section = CompressionSection.model_validate({"cascade": {"stages": ["dare", "nullu", "alphaedit"]}})
    providers, recovery = plan_roles(section, section.cascade.stages)
    assert {d: st.name for d, st in providers.items()} == {"sparsity": "dare", "rank": "nullu", "bits": "quant"}
    assert [st.name for st in recovery] == ["alphaedit"]
    assert recovery[0].reserved_bytes(8, 4, 4) == (8 + 4) * 4  # its channel scales are kept out of the budget
    model, batches = _mlp()
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu", "alphaedit"], **NO_GATE},
                           "alphaedit": {"num_epochs": 0}}}
    out = compress_model(model, 0.8, "cascade", calibration_data=batches, config=cfg)
    assert out.compression_stats["plan"]["stages"][-1] == "alphaedit"


# ------------------------------------------------------------------------------ the end-to-end choice and the gate
def _shifted_data():
    """Calibration inputs in a 4-dimensional subspace, holdout inputs in all 64: on the calibration data a
    rank-4 factorisation looks exact, so the per-layer proxy prefers low rank; the holdout shows otherwise."""
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(4, 64, generator=g)
    fit = [{"x": torch.randn(32, 4, generator=g) @ basis + 0.01 * torch.randn(32, 64, generator=g)} for _ in range(6)]
    return fit, [{"x": torch.randn(32, 64, generator=g)} for _ in range(2)]


def _holdout_agreement(model, dense, holdout):
    from rcc_compression.compression.calibration import output_agreement, run_outputs

    return output_agreement(run_outputs(model, holdout), run_outputs(dense, holdout))


def test_the_returned_model_is_never_worse_than_a_single_stage_plan():
    import copy

    torch.manual_seed(0)
    model = MLP(n=64, hidden=128, out=16)
    dense = copy.deepcopy(model)
    fit, holdout = _shifted_data()
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu"], **NO_GATE}}}
    out = compress_model(model, 0.9, "cascade", calibration_data=fit, holdout_data=holdout, config=cfg)
    choice = out.compression_stats["plan_choice"]
    cands = choice["candidates"]
    assert {"per-layer plan", "quant only", "low rank only"} <= set(cands)
    # the case is built so that the calibration proxy picks the worse plan ...
    assert cands["per-layer plan"]["retention"] < cands["quant only"]["retention"]
    # ... and the returned model is the best measured one, at no more bytes than the plan
    kept = _holdout_agreement(out, dense, holdout)
    assert all(kept >= c["retention"] - 1e-6 for c in cands.values() if c.get("passed", True))
    assert choice["chosen"] == max(cands, key=lambda k: cands[k]["retention"])
    plan_bytes = cands["per-layer plan"]["stored_bytes"]
    assert all(c["stored_bytes"] <= plan_bytes * 1.01 for c in cands.values())
    assert out.compression_stats["achieved_rate"] >= 0.9 - 0.01


def test_plan_steps_are_gated_whole_and_recovery_is_skipped_with_margin():
    model, batches = _mlp()
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu", "alphaedit"], "validation_threshold": 0.9,
                                       "recovery_skip_error": 0.05}, "alphaedit": {"num_epochs": 1}}}
    out = compress_model(model, 0.5, "cascade", calibration_data=batches, config=cfg)
    records = out.compression_stats["records"]
    plan_steps = [r for r in records if r["stage"] != "alphaedit"]
    assert all(r.get("deferred") for r in plan_steps[:-1]) and not plan_steps[-1].get("deferred")
    last = plan_steps[-1]
    lo, hi = last["output_error_ci"]
    assert 0 <= lo <= last["output_error"] <= hi < 0.05  # the continuous metric, with its interval
    alpha = records[-1]
    assert alpha["stage"] == "alphaedit" and "passes with margin" in alpha["skipped"]
    assert all(m.a_in is None for m in compressed_layers(out).values())  # no scales trained, none stored


def test_a_recovery_step_is_judged_by_the_continuous_metric():
    from rcc_compression.compression.cascade import CascadePipeline

    last = {"output_error": 2.0e-5, "retention": 1.0}
    same_cosine = {"output_error": 1.0e-5, "retention": 1.0, "passed": True}
    assert CascadePipeline._lowered(same_cosine, 1.0, last) == ""  # an error that fell: kept, at equal cosine
    assert "raised" in CascadePipeline._lowered({**same_cosine, "output_error": 3e-5}, 1.0, last)
