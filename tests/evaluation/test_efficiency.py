"""Efficiency metrics: FLOP kinds, parameter and byte counts, latency and memory probes."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from rcc_compression.compression.layers import CompressedLinear, compressed_layers, merge_all, replace_module
from rcc_compression.evaluation.efficiency import (
    flops_report,
    measure_latency,
    parameter_report,
    peak_memory,
    profile_model,
    resize_batch,
    storage_report,
)


def _compress(wrapper):
    for name, mod in list(wrapper.model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ".mlp.fc1" in name:
            layer = CompressedLinear.from_linear(mod)
            layer.set_sparse(mod.weight.detach(), torch.rand_like(mod.weight) > 0.75)
            layer.set_low_rank(torch.randn(mod.out_features, 2), torch.randn(2, mod.in_features))
            replace_module(wrapper.model, name, layer)
    return wrapper


def _flops(model, batch):
    c = FlopCounterMode(display=False)
    with c:
        model(**batch)
    return c.get_total_flops()


def test_flop_kinds(tiny_clip):
    batch = tiny_clip.synthetic_batch(2, torch.Generator().manual_seed(0))
    dense_counted = _flops(tiny_clip.model, batch)
    rep = flops_report(tiny_clip, batch)
    assert rep["dense_flops"] == rep["executed_flops"] == rep["sparsity_aware_flops"] == dense_counted
    _compress(tiny_clip)
    rep = flops_report(tiny_clip, batch)
    assert rep["dense_flops"] == dense_counted  # what the uncompressed model would run
    assert rep["executed_flops"] == _flops(tiny_clip.model, batch)
    saved = 0
    for name, m in compressed_layers(tiny_clip.model).items():
        tokens = 2 * (16 if name.startswith("text") else 17)
        mn = m.in_features * m.out_features
        saved += 2 * tokens * (mn - m.nnz() - m.rank * (m.in_features + m.out_features))
    assert rep["sparsity_aware_flops"] == dense_counted - saved
    merged = merge_all(copy.deepcopy(tiny_clip.model))
    assert _flops(merged, batch) == rep["dense_flops"]


def test_parameter_and_storage_counts(tiny_clip):
    before = parameter_report(tiny_clip)
    _compress(tiny_clip)
    after = parameter_report(tiny_clip)
    assert after["dense_equivalent"] == before["dense_equivalent"] == before["stored"]
    layers = compressed_layers(tiny_clip.model).values()
    expect = before["stored"] - sum(m.in_features * m.out_features - m.nnz() - m.rank * (m.in_features + m.out_features)
                                    for m in layers)
    assert after["stored"] == expect
    st = storage_report(tiny_clip)
    assert 0 < st["compression_rate_model"] < st["compression_rate_layers"] < 1


def test_latency_memory_and_profile(tiny_clip):
    lat = measure_latency(lambda: torch.ones(64, 64) @ torch.ones(64, 64), warmup=1, iters=5)
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    mem = peak_memory(lambda: torch.ones(4096, 4096).sum())
    assert mem["increase_bytes"] >= 0 and mem["peak_bytes"] > 0
    batch = tiny_clip.synthetic_batch(3)
    assert resize_batch(batch, 7)["pixel_values"].shape[0] == 7
    prof = profile_model(tiny_clip, batch, batch_sizes=(1, 2), iters=2)
    assert set(prof["per_batch_size"]) == {"1", "2"}
    f1 = prof["per_batch_size"]["1"]["flops"]["dense_flops"]
    f2 = prof["per_batch_size"]["2"]["flops"]["dense_flops"]
    assert abs(f2 - 2 * f1) < 1e-3 * f2  # linear in batch size but for the B x B similarity
