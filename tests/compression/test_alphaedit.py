"""Stage alphaedit: the closed-form null-space update and learned channel scales."""

from __future__ import annotations

import pytest
import torch

from rcc_compression import CompressionPipeline
from rcc_compression.compression.alphaedit import low_rank_update, null_space_ridge, preserve_basis
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.config import load_config


def _subspace_inputs(n: int, k: int, rows: int, seed: int, row_seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    g.manual_seed(seed * 1000 + row_seed + 1)
    return torch.randn(rows, k, generator=g, dtype=torch.float64) @ basis.t() * 3.0


def test_null_space_ridge_keeps_preserve_outputs_and_support():
    g = torch.Generator().manual_seed(0)
    m, n = 10, 16
    K0 = _subspace_inputs(n, 4, 200, 1)
    K1 = torch.randn(300, n, generator=g, dtype=torch.float64)
    C1 = K1.t() @ K1
    R = torch.randn(m, n, generator=g, dtype=torch.float64)
    support = torch.rand(m, n, generator=g) > 0.4
    U = preserve_basis(K0.t() @ K0 / len(K0), 2e-2)
    assert U.shape[1] == 4
    delta = null_space_ridge(C1, R, support, U, l2=1.0)
    assert torch.all(delta[~support] == 0)
    assert (delta @ K0.t()).abs().max() < 1e-8  # preserved inputs see no change
    err_before = ((R @ K1.t()) ** 2).sum()
    err_after = (((R - delta) @ K1.t()) ** 2).sum()
    assert err_after < 0.9 * err_before
    # without a preserve set and with full support it is the plain ridge solution
    full = null_space_ridge(C1, R, None, None, l2=1.0)
    torch.testing.assert_close(full, R @ C1 @ torch.linalg.inv(C1 + torch.eye(n, dtype=C1.dtype)))


def test_null_space_ridge_chunking_is_exact():
    g = torch.Generator().manual_seed(1)
    C = (lambda x: x.t() @ x)(torch.randn(50, 8, generator=g, dtype=torch.float64))
    R = torch.randn(9, 8, generator=g, dtype=torch.float64)
    support = torch.rand(9, 8, generator=g) > 0.3
    U = preserve_basis((lambda x: x.t() @ x / 40)(_subspace_inputs(8, 2, 40, 2)), 2e-2)
    a = null_space_ridge(C, R, support, U, 10.0, chunk_elements=64)  # one row at a time
    b = null_space_ridge(C, R, support, U, 10.0, chunk_elements=1 << 20)
    torch.testing.assert_close(a, b)


def test_low_rank_update_respects_preserve_set():
    g = torch.Generator().manual_seed(2)
    n, m, r = 12, 7, 5  # A U is 5 x 3: two directions of B stay free
    K0 = _subspace_inputs(n, 3, 100, 3)
    K1 = torch.randn(200, n, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    R = torch.randn(m, n, generator=g, dtype=torch.float64)
    U = preserve_basis(K0.t() @ K0 / 100, 2e-2)
    dB = low_rank_update(K1.t() @ K1, R, A, U, l2=1.0)
    assert (dB @ A @ K0.t()).abs().max() < 1e-8
    assert ((R - dB @ A) @ K1.t()).norm() < 0.99 * (R @ K1.t()).norm()


def test_closed_form_stage_on_compressed_mlp(mlp):
    """Fit set error falls; outputs on the preserve set stay within 1e-4 relative."""
    from rcc_compression.compression.nullu import svd  # noqa: F401 - stage import path

    g = torch.Generator().manual_seed(4)
    fit = [{"x": torch.randn(64, 24, generator=g)} for _ in range(6)]
    preserve = [{"x": _subspace_inputs(24, 5, 64, 5, row_seed=i).float()} for i in range(4)]
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.6, "iterations": 1, "fine_tune_epochs": 0, "targets": ["^fc"]},
        "nullu": {"param_budget": 0.1, "rank_reduction": None, "energy_threshold": None, "targets": ["^fc"]},
        "alphaedit": {"mode": "closed_form", "targets": ["^fc"]},
        "cascade": {"stages": ["dare", "nullu", "alphaedit"], "validation_threshold": 0.0}}}).compression
    snap = {}

    def remember(rec):
        if rec["stage"] == "nullu":
            layers = compressed_layers(mlp)
            snap.update({n: (m.weight.detach().clone(), m.mask.clone(), m.rank) for n, m in layers.items()})
            x0 = torch.cat([b["x"] for b in preserve])
            snap["preserve_out"] = {n: layers[n](x0 if n == "fc1" else torch.tanh(pipe.dense_model.fc1(x0))).detach()
                                    for n in layers}

    pipe = CompressionPipeline(cfg, calibration_data=fit, holdout_data=fit[:1], preserve_data=preserve,
                           step_callback=remember)
    pipe.compress(mlp)
    stats = pipe.stage_results["alphaedit"]
    layers = compressed_layers(mlp)
    x0 = torch.cat([b["x"] for b in preserve])
    for name, layer in layers.items():
        info = stats["layers"][name]
        assert info["error_after"] <= info["error_before"] + 1e-12
        if name == "fc1":  # preserve inputs span 5 of 24 directions: room to fit the rest
            assert info["preserve_dim"] == 5 and info["error_after"] < 0.99 * info["error_before"]
        assert torch.equal(layer.mask, snap[name][1]) and layer.rank == snap[name][2]  # compression survives
        inp = x0 if name == "fc1" else torch.tanh(pipe.dense_model.fc1(x0))
        before = snap["preserve_out"][name]
        change = (layer(inp).detach() - before).norm() / before.norm()
        if name == "fc1":
            assert change < 1e-4


def test_scaling_mode_lowers_distillation_loss_and_keeps_structure(tiny_clip):
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.6, "iterations": 1, "fine_tune_epochs": 0},
        "alphaedit": {"num_epochs": 6, "learning_rate": 0.01, "scale_fraction": 0.5},
        "cascade": {"stages": ["dare", "alphaedit"], "validation_threshold": 0.0}}}).compression
    masks = {}
    pipe = CompressionPipeline(cfg, step_callback=lambda r: masks.update(
        {n: m.mask.clone() for n, m in compressed_layers(tiny_clip.model).items()}) if r["stage"] == "dare" else None)
    pipe.compress(tiny_clip)
    stats = pipe.stage_results["alphaedit"]
    assert stats["kd_loss_last_epoch"] < stats["kd_loss_first_epoch"]
    assert pipe.records[-1]["retention"] > pipe.records[0]["retention"]
    for name, layer in compressed_layers(tiny_clip.model).items():
        assert torch.equal(layer.mask, masks[name])
        moved = (layer.a_out.detach() != 1).sum().item()
        assert 0 < moved <= round(0.5 * layer.out_features)  # only the important half learns


def test_stage_distillation_follows_the_run_training_section(tiny_clip, monkeypatch):
    """The run's ``training`` section (optimiser, losses) drives stage distillation; epochs and lr are the stage's."""
    import copy

    from rcc_compression import CompressionPipeline
    from rcc_compression.jobs import api

    full = load_config(None, data={
        "compression": {"dare": {"pruning_rate": 0.6, "iterations": 1, "fine_tune_epochs": 0},
                        "alphaedit": {"num_epochs": 2, "learning_rate": 0.01},
                        "cascade": {"stages": ["dare", "alphaedit"], "validation_threshold": 0.0}},
        "training": {"optimizer": "sgd", "kd_weight": 0.0, "feature_weight": 1.0}})
    seen, real = [], api.finetune_on_batches
    monkeypatch.setattr(api, "finetune_on_batches", lambda *a, **k: seen.append(k["config"]) or real(*a, **k))
    results = []
    for training in (full.training, None):
        pipe = CompressionPipeline(full.compression, training=training)
        pipe.compress(copy.deepcopy(tiny_clip))
        results.append(pipe.stage_results["alphaedit"]["kd_loss_last_epoch"])
    assert seen == [full.training, None]
    assert results[0] != results[1]  # SGD on features only is another run than the default AdamW on KD + features


def test_closed_form_on_the_compressed_models_own_inputs(mlp):
    """``fit_inputs: sequential`` fits each layer on what the compressed model feeds it: lower model error."""
    import copy

    g = torch.Generator().manual_seed(5)
    scale = torch.linspace(0.1, 2.0, 24)
    fit = [{"x": torch.randn(64, 24, generator=g) * scale} for _ in range(6)]
    held = [{"x": torch.randn(64, 24, generator=g) * scale} for _ in range(3)]
    dense_out = torch.cat([mlp(**b) for b in held]).detach()
    errors, stats = {}, {}
    for fit_inputs in ("dense", "sequential"):
        cfg = load_config(None, data={"compression": {
            "dare": {"pruning_rate": 0.7, "iterations": 1, "fine_tune_epochs": 0, "targets": ["^fc"]},
            "nullu": {"param_budget": 0.1, "rank_reduction": None, "energy_threshold": None, "targets": ["^fc"]},
            "alphaedit": {"mode": "closed_form", "targets": ["^fc"], "l2": 1e-3, "fit_inputs": fit_inputs},
            "cascade": {"stages": ["dare", "nullu", "alphaedit"], "validation_threshold": 0.0}}}).compression
        model = copy.deepcopy(mlp)
        masks = {}
        def remember(rec, model=model, masks=masks):
            if rec["stage"] == "nullu":
                masks.update({n: (m.mask.clone(), m.rank) for n, m in compressed_layers(model).items()})

        pipe = CompressionPipeline(cfg, calibration_data=fit, holdout_data=held[:1], step_callback=remember)
        pipe.compress(model)
        out = torch.cat([model(**b) for b in held]).detach()
        errors[fit_inputs] = float((out - dense_out).norm() / dense_out.norm())
        stats[fit_inputs] = pipe.stage_results["alphaedit"]
        for name, layer in compressed_layers(model).items():
            assert torch.equal(layer.mask, masks[name][0]) and layer.rank == masks[name][1]  # compression survives
            assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
    assert stats["sequential"]["fit_inputs"] == "sequential" and stats["dense"]["fit_inputs"] == "dense"
    # fc1 sees dense inputs either way: the same update
    fc1 = stats["sequential"]["layers"]["fc1"], stats["dense"]["layers"]["fc1"]
    assert abs(fc1[0]["error_after"] - fc1[1]["error_after"]) < 1e-6
    assert errors["sequential"] < 0.95 * errors["dense"]


def _row_reference(C, R, support, U, l2):
    """Brute force, one row at a time on its support: z_s = N (N^T C_ss N + l2 I)^-1 N^T (r C)_s."""
    out = torch.zeros_like(R)
    for i in range(R.shape[0]):
        s = support[i].nonzero().squeeze(1)
        N = torch.eye(len(s), dtype=C.dtype)
        if U is not None:
            Us = U[s]
            u, sv, _ = torch.linalg.svd(Us, full_matrices=True)
            N = u[:, int((sv > 1e-7 * sv.max()).sum()):]
        Css = C[s][:, s]
        y = torch.linalg.lstsq(N.t() @ Css @ N + l2 * torch.eye(N.shape[1], dtype=C.dtype),
                               N.t() @ (R[i] @ C)[s]).solution
        out[i, s] = N @ y
    return out


@pytest.mark.timeout(120, method="thread")  # on failure MKL hangs inside C code
def test_null_space_ridge_with_two_threads_matches_the_row_by_row_solution():
    """Issue 10, item 1: MKL's batched LU solve fails or hangs with 2 threads; the Cholesky solve does not."""
    g = torch.Generator().manual_seed(7)
    m, n = 6, 192
    K1 = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    C = K1.t() @ K1
    R = torch.randn(m, n, generator=g, dtype=torch.float64)
    support = torch.rand(m, n, generator=g) > 0.5
    U = preserve_basis((lambda x: x.t() @ x / 300)(_subspace_inputs(n, 6, 300, 8)), 2e-2)
    refs = {b: _row_reference(C, R, support, b, 10.0) for b in (None, U)}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = {b: null_space_ridge(C, R, support, b, 10.0) for b in (None, U)}
        full = null_space_ridge(C, R, None, U, 10.0)
    finally:
        torch.set_num_threads(before)
    for b in (None, U):
        torch.testing.assert_close(got[b], refs[b], rtol=1e-8, atol=1e-10)
    assert (full @ U).abs().max() < 1e-8


def test_closed_form_never_keeps_an_update_that_raises_the_error(mlp, mlp_batches, monkeypatch):
    """Issue 10, item 1: a solve gone wrong is caught by its calibration error and not applied."""
    from rcc_compression.compression import alphaedit

    monkeypatch.setattr(alphaedit, "null_space_ridge", lambda C, R, *a, **k: -100.0 * R)  # a garbage update
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.6, "iterations": 1, "fine_tune_epochs": 0, "targets": ["^fc"]},
        "alphaedit": {"mode": "closed_form", "targets": ["^fc"]},
        "cascade": {"stages": ["dare", "alphaedit"], "validation_threshold": 0.0}}}).compression
    snap = {}

    def after_dare(r):
        if r["stage"] == "dare":
            snap.update({n: m.weight.detach().clone() for n, m in compressed_layers(mlp).items()})

    pipe = CompressionPipeline(cfg, calibration_data=mlp_batches, holdout_data=mlp_batches[:1],
                               step_callback=after_dare)
    pipe.compress(mlp)
    stats = pipe.stage_results["alphaedit"]
    assert stats["rejected_layers"] == ["fc1", "fc2"]
    for name, layer in compressed_layers(mlp).items():
        assert torch.equal(layer.weight, snap[name])
        assert "rejected" in stats["layers"][name]
        assert stats["layers"][name]["error_after"] == stats["layers"][name]["error_before"]


def test_channels_without_a_learnable_scale_do_not_move_under_weight_decay(tiny_clip, monkeypatch):
    """Issue 10, item 16: scale_fraction < 1 masked the gradient but weight decay still moved the other channels;
    at scale_fraction 1 no backward pass is spent on importance that would change nothing."""
    import copy

    from rcc_compression.compression.alphaedit import AlphaEditStage

    full = load_config(None, data={
        "compression": {"dare": {"pruning_rate": 0.6, "iterations": 1, "fine_tune_epochs": 0},
                        "alphaedit": {"num_epochs": 2, "learning_rate": 0.01, "scale_fraction": 0.5},
                        "cascade": {"stages": ["dare", "alphaedit"], "validation_threshold": 0.0}},
        "training": {"weight_decay": 0.5}})
    model = copy.deepcopy(tiny_clip)
    CompressionPipeline(full.compression, training=full.training).compress(model)
    for layer in compressed_layers(model.model).values():
        for scale in (layer.a_in, layer.a_out):
            moved = int((scale.detach() != 1).sum())
            assert 0 < moved <= round(0.5 * scale.numel())
    calls = []
    monkeypatch.setattr(AlphaEditStage, "_importance", lambda self, *a: calls.append(1) or {})
    full.compression.alphaedit.scale_fraction = 1.0
    pipe = CompressionPipeline(full.compression, training=full.training)
    pipe.compress(tiny_clip)
    assert not calls and pipe.stage_results["alphaedit"]["importance_metric"].startswith("not computed")
