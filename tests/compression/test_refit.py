"""Sequential refit of low-rank factors on the compressed model's own inputs."""

from __future__ import annotations

import copy

import torch

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.lowrank import balanced_factors, whitening
from rcc_compression.compression.refit import execution_groups, layer_output_error, refit_low_rank
from rcc_compression.config import load_config

from .conftest import batches_for


def _data(n: int = 12, rows: int = 400, seed: int = 0, noise: float = 0.3
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)
    y = x + noise * torch.randn(rows, n, generator=g, dtype=torch.float64)  # what a compressed model feeds the layer
    w = torch.randn(8, n, generator=g, dtype=torch.float64)
    return x, y, w


def _err(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, e: torch.Tensor) -> float:
    return float((x @ w.t() - y @ e.t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


def test_full_rank_refit_is_the_least_squares_solution():
    x, y, w = _data()
    B, A = refit_low_rank(w, None, x.t() @ y, y.t() @ y, rank=8, damping=0.0)
    lstsq = torch.linalg.lstsq(y, x @ w.t()).solution.t()
    torch.testing.assert_close(B @ A, lstsq, rtol=1e-8, atol=1e-8)


def test_on_dense_inputs_it_is_activation_aware_svd():
    x, _, w = _data()
    gram = x.t() @ x
    B, A = refit_low_rank(w, None, gram, gram, rank=3, damping=0.0)
    R, R_inv = whitening(gram, 0.0)
    U, S, Vh = torch.linalg.svd(w @ R, full_matrices=False)
    b, a = balanced_factors(U, S, Vh, 3)
    torch.testing.assert_close(B @ A, b @ (a @ R_inv), rtol=1e-6, atol=1e-8)


def test_refit_beats_the_dense_input_fit_and_every_perturbation():
    x, y, w = _data(seed=1, noise=1.0)
    fixed = torch.zeros_like(w)
    fixed[:, :3] = w[:, :3]  # a sparse part the low-rank part must complement
    B, A = refit_low_rank(w, fixed, x.t() @ y, y.t() @ y, rank=2, damping=0.0)
    ours = _err(x, y, w, fixed + B @ A)
    gram = x.t() @ x
    b, a = refit_low_rank(w, fixed, gram, gram, rank=2, damping=0.0)  # fitted on dense inputs
    assert ours < 0.95 * _err(x, y, w, fixed + b @ a)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        dB = 1e-2 * torch.randn(B.shape, generator=g, dtype=B.dtype)
        dA = 1e-2 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        assert _err(x, y, w, fixed + (B + dB) @ (A + dA)) >= ours - 1e-12
    assert abs(layer_output_error(w, fixed + B @ A, gram, x.t() @ y, y.t() @ y) - ours) < 1e-10


def test_execution_groups_put_qkv_together(tiny_clip):
    from rcc_compression.compression.stage import select_layers

    names = select_layers(tiny_clip.model)
    batch = tiny_clip.synthetic_batch(2, torch.Generator().manual_seed(0))
    groups = execution_groups(tiny_clip.model, names, batch, torch.device("cpu"))
    assert sorted(n for g in groups for n in g) == sorted(names)
    qkv = [g for g in groups if any(n.endswith("q_proj") for n in g)]
    assert qkv and all(sorted(n.rsplit(".", 1)[1] for n in g) == ["k_proj", "q_proj", "v_proj"] for g in qkv)
    # every other layer reads its own input, even where a new input tensor reuses a freed one's memory
    assert all(len(g) == 1 for g in groups if g not in qkv) and len(groups) == len(names) - 2 * len(qkv)
    first = groups[0][0]
    assert "vision_model.encoder.layers.0" in first or "text_model.encoder.layers.0" in first


def test_sequential_refit_lowers_model_output_error(mlp):
    batches = batches_for(24, 8, scale=torch.linspace(0.1, 2.0, 24))
    held = batches_for(24, 4, seed=9, scale=torch.linspace(0.1, 2.0, 24))
    dense_out = torch.cat([mlp(**b) for b in held]).detach()
    errors, reports = [], []
    for refit in ("none", "sequential"):
        cfg = load_config(None, data={"compression": {
            "nullu": {"decomposition_method": "activation_aware", "rank_reduction": 0.75, "energy_threshold": None,
                      "refit": refit},
            "cascade": {"stages": ["nullu"], "validation_threshold": 0.0}}}).compression
        model = copy.deepcopy(mlp)
        pipe = CascadePipeline(cfg, calibration_data=batches, holdout_data=held[:1])
        pipe.compress(model)
        out = torch.cat([model(**b) for b in held]).detach()
        errors.append(float((out - dense_out).norm() / dense_out.norm()))
        reports.append(pipe.stage_results["nullu"])
    assert errors[1] < 0.98 * errors[0]
    layers = reports[1]["layers"]
    refit = {n: v for n, v in layers.items() if "refit_error_after" in v}
    assert set(refit) == {n for n, v in layers.items() if v["rank"] > 0} and refit
    assert all(v["refit_error_after"] <= v["refit_error_before"] for v in refit.values())
    # the first layer sees dense inputs: its refit is the activation-aware fit it already had
    assert abs(layers["fc1"]["refit_error_after"] - layers["fc1"]["refit_error_before"]) < 1e-6
    assert reports[1]["refit_mean_error"]["after"] < reports[1]["refit_mean_error"]["before"]
