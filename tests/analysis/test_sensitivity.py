"""Layer sensitivity on a tiny CLIP: one layer at a time, ranked, the dense model untouched."""

from __future__ import annotations

import pytest
import torch

from rcc_compression.analysis.sensitivity import layer_sensitivity, single_layer_section
from rcc_compression.compression.stage import select_layers
from rcc_compression.config import load_config


@pytest.mark.e2e
def test_each_layer_alone_ranked(tiny_clip) -> None:
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.7, "iterations": 1, "fine_tune_epochs": 0},
        "nullu": {"rank_reduction": 0.75, "energy_threshold": None},
        "cascade": {"stages": ["dare", "nullu", "alphaedit"]}}})
    g = torch.Generator().manual_seed(0)
    batches = [tiny_clip.synthetic_batch(4, g) for _ in range(3)]
    layers = select_layers(tiny_clip.model)[:3]
    before = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    calls = []
    rep = layer_sensitivity(tiny_clip, cfg.compression, layers, batches[:2], batches[2:],
                            metric_fn=lambda m: float(sum(p.detach().abs().sum() for p in m.parameters())),
                            progress=lambda *a: calls.append(a))
    assert [r["rank"] for r in rep["layers"]] == [1, 2, 3]
    assert {r["layer"] for r in rep["layers"]} == set(layers)
    drops = [r["metric_drop"] for r in rep["layers"]]
    assert drops == sorted(drops, reverse=True) and rep["ranked_by"] == "metric_drop"
    for r in rep["layers"]:
        assert r["stages"] == ["dare", "nullu"]  # recovery left out by default
        assert 0 < r["stored_bytes"] < r["dense_bytes"]  # exactly one layer, compressed
        assert 0.0 <= r["gate_retention"] <= 1.0 + 1e-6 and r["error"] is None
    assert calls[-1] == ("layer sensitivity", 3, 3)
    after = tiny_clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the dense model is copied, never changed


def test_single_layer_section_narrows_every_stage() -> None:
    sec = load_config(None).compression
    one = single_layer_section(sec, "text_model.encoder.layers.0.mlp.fc1", stages=["nullu"])
    assert one.cascade.stages == ["nullu"] and one.cascade.validation_threshold == 0.0
    assert one.nullu.targets == [r"^text_model\.encoder\.layers\.0\.mlp\.fc1$"] and one.nullu.ignore == []
    assert sec.cascade.stages == ["dare", "nullu", "alphaedit"]  # the original is not touched
