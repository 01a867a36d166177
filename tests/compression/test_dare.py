"""Stage dare: masks, scorers, schedules, N:M, DARE on deltas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.dare import (
    DareConfig,
    bernoulli_mask,
    keep_count,
    nm_mask,
    rescale_values,
    topk_mask,
    topk_masks,
    wanda_scores,
)
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.compression.stage import schedule_fraction


def test_topk_masks_from_one_sort_equal_each_rate_alone():
    s = torch.randint(0, 7, (12, 40)).float()  # many ties: kept by position, as topk_mask keeps them
    rates = [0.1, 0.5, 0.75, 0.9]
    for scope in ("layer", "row"):
        together = topk_masks(s, rates, scope)
        for p in rates:
            assert torch.equal(together[p], topk_mask(s, p, scope)), (scope, p)


def test_topk_mask_counts_and_scope():
    s = torch.rand(10, 30)
    m = topk_mask(s, 0.7, "layer")
    assert int(m.sum()) == keep_count(300, 0.7) == 90
    r = topk_mask(s, 0.7, "row")
    assert torch.all(r.sum(1) == keep_count(30, 0.7))
    # the kept entries are exactly the largest scores
    assert s[m].min() >= s[~m].max()
    assert torch.all(topk_mask(s, 0.0, "layer"))


def test_topk_mask_respects_allowed():
    s = torch.rand(8, 8)
    allowed = torch.rand(8, 8) > 0.3
    m = topk_mask(s, 0.9, "layer", allowed)
    assert not torch.any(m & ~allowed)


def test_wanda_equals_magnitude_when_input_norms_equal():
    w = torch.randn(16, 32)
    mag = topk_mask(w.abs(), 0.5, "row")
    wan = topk_mask(wanda_scores(w, torch.full((32,), 3.7)), 0.5, "row")
    assert torch.equal(mag, wan)
    # and differs once channel norms differ
    norms = torch.linspace(0.1, 10, 32)
    assert not torch.equal(mag, topk_mask(wanda_scores(w, norms), 0.5, "row"))


def test_nm_mask_two_of_four():
    s = torch.rand(6, 16)
    m = nm_mask(s, 2, 4)
    assert torch.all(m.view(6, 4, 4).sum(-1) == 2)
    # within each group the kept are the top two
    g = s.view(6, 4, 4)
    kept_min = torch.where(m.view(6, 4, 4), g, torch.full_like(g, 2)).amin(-1)
    dropped_max = torch.where(~m.view(6, 4, 4), g, torch.full_like(g, -1)).amax(-1)
    assert torch.all(kept_min >= dropped_max)


def test_schedules():
    assert schedule_fraction(0.5, "linear") == 0.5
    assert schedule_fraction(0.5, "cubic") == pytest.approx(0.875)
    assert schedule_fraction(1.0, "cubic") == 1.0
    with pytest.raises(ValueError):
        schedule_fraction(0.5, "exp")


def test_l1_rescale_keeps_row_norms():
    w = torch.randn(5, 40)
    m = topk_mask(w.abs(), 0.8, "row")
    out = rescale_values(w, m, w, "l1", 0.2)
    torch.testing.assert_close(out.abs().sum(1), w.abs().sum(1))
    assert torch.all(out[~m] == 0)


def test_dare_on_deltas_keeps_expected_weight():
    """Published DARE: E[base + rescaled dropped delta] = fine-tuned weight (statistical, fixed seed)."""
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(200, 300, generator=g) * 0.01
    p = 0.9
    mask = bernoulli_mask(delta.shape, p, g)
    kept = rescale_values(delta, mask, delta, "inverse_keep", 1 - p)
    n = delta.numel()
    # kept share within 4 sigma of 1 - p
    assert abs(mask.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # sum of (kept - delta) is zero in expectation; variance of each term is delta^2 p / (1 - p)
    z = (kept - delta).sum() / (delta.pow(2).sum() * p / (1 - p)).sqrt()
    assert abs(z.item()) < 4
    # and per output: x @ kept.T estimates x @ delta.T without bias
    x = torch.randn(64, 300, generator=g)
    err = (x @ kept.t() - x @ delta.t()).mean() / (x @ kept.t() - x @ delta.t()).std() * (64 * 200) ** 0.5
    assert abs(err.item()) < 4


def test_dare_stage_delta_mode_end_to_end(mlp, mlp_batches):
    import copy

    base = copy.deepcopy(mlp)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = {"compression": {"dare": {"pruning_rate": 0.0, "scorer": "random", "target": "delta", "iterations": 1,
                                    "fine_tune_epochs": 0, "targets": ["^fc"]},
                           "cascade": {"stages": ["dare"], "validation_threshold": 0.0}}}
    from rcc_compression.config import load_config

    x = mlp_batches[0]["x"]
    expected = mlp(x)
    pipe = CascadePipeline(load_config(None, data=cfg).compression, calibration_data=mlp_batches,
                           reference_model=base)
    pipe.compress(mlp)
    layers = compressed_layers(mlp)
    assert set(layers) == {"fc1", "fc2"} and all(m.base is not None for m in layers.values())
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)  # rate 0: the delta is kept whole


def test_dare_iterations_shrink_masks_monotonically(mlp, mlp_batches):
    from rcc_compression.config import load_config

    masks = []
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.8, "iterations": 4, "fine_tune_epochs": 0, "targets": ["^fc"]},
        "cascade": {"stages": ["dare"], "validation_threshold": 0.0}}}).compression
    pipe = CascadePipeline(cfg, calibration_data=mlp_batches,
                           step_callback=lambda r: masks.append(compressed_layers(mlp)["fc1"].mask.clone()))
    pipe.compress(mlp)
    rates = [r["summary"]["achieved_sparsity"] for r in pipe.records]
    assert rates == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=1e-3)
    for a, b in zip(masks, masks[1:], strict=False):
        assert not torch.any(b & ~a)


def test_nm_config_validation():
    assert DareConfig(nm=" 2 : 4").nm == "2:4"
    with pytest.raises(ValueError):
        DareConfig(nm="4:2")


def test_zero_rate_leaves_clip_unchanged(tiny_clip):
    from rcc_compression.config import load_config

    batch = tiny_clip.synthetic_batch(3, torch.Generator().manual_seed(5))
    expected = tiny_clip(**batch)
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.0, "iterations": 2, "fine_tune_epochs": 0},
        "nullu": {"rank_reduction": 0.0, "energy_threshold": None},
        "alphaedit": {"num_epochs": 0},
        "cascade": {"validation_threshold": 0.999}}}).compression
    out = CascadePipeline(cfg).compress(tiny_clip)
    got = out(**batch)
    assert torch.equal(got.logits_per_image, expected.logits_per_image)
    assert torch.equal(got.text_embeds, expected.text_embeds)
    assert all(not isinstance(m, nn.Linear) or "projection" in n or "embed" in n
               for n, m in out.model.named_modules() if isinstance(m, nn.Linear) and "encoder" in n)


def test_topk_mask_exact_count_with_ties():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0, 0.5]])
    m = topk_mask(s, 0.5, "row")
    assert int(m.sum()) == 3 and m[0, 4] and m[0, 1] and m[0, 2] and not m[0, 3]
    big = torch.randn(300, 700).round(decimals=1)  # many ties
    for rate in (0.1, 0.5, 0.93):
        assert int(topk_mask(big, rate, "layer").sum()) == keep_count(big.numel(), rate)
        assert torch.all(topk_mask(big, rate, "row").sum(1) == keep_count(700, rate))


def test_entries_are_scored_with_their_channel_scales():
    """Issue 10, item 16: a second round scores S as the layer applies it, ``diag(a_out) S diag(a_in)``."""
    from rcc_compression.compression.dare import DareStage
    from rcc_compression.compression.layers import CompressedLinear
    from rcc_compression.compression.stage import CompressionContext

    g = torch.Generator().manual_seed(3)
    model = nn.Module()
    model.fc = CompressedLinear.from_linear(nn.Linear(16, 8))
    w = torch.randn(8, 16, generator=g)
    model.fc.set_sparse(w, torch.ones(8, 16, dtype=torch.bool))
    a_in = torch.cat([torch.full((8,), 0.05), torch.full((8,), 4.0)])
    a_out = torch.rand(8, generator=g) + 0.5
    model.fc.set_scales(a_in, a_out)
    ctx = CompressionContext(model=model, dense={"fc": w})
    stage = DareStage({"pruning_rate": 0.5, "iterations": 1, "fine_tune_epochs": 0, "targets": ["^fc$"]})
    stage.compress(model, ctx)
    expected = topk_mask((w * a_out[:, None] * a_in[None, :]).abs(), 0.5, "layer")
    assert torch.equal(model.fc.mask, expected)
    assert stage.statistics["achieved_sparsity"] == pytest.approx(0.5)
    assert "achieved_rate" not in stage.statistics  # a share of entries, not of bytes (issue 10, item 15)


def test_docstring_states_the_distillation_the_default_runs():
    """Issue 10, item 16: the docstring described DARE (which trains nothing) and omitted the default epochs."""
    from rcc_compression.compression import dare

    doc = " ".join(dare.__doc__.split())
    assert f"``fine_tune_epochs`` is {dare.DareConfig().fine_tune_epochs} by default" in doc
    assert "train nothing" in doc and "fine_tune_epochs=0" in doc
