"""Subspace measures: principal angles against scipy, Grassmann distances with known answers, invariants
of real compressions (truncated SVD keeps the dominant subspaces exactly; pruning does not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from torch import nn

from rcc_compression.analysis.subspace import (
    GrassmannAnalyzer,
    analyze_overlap,
    compare_weights,
    compute_grassmann_distance,
    energy_rank,
    input_null_basis,
    null_space_report,
    principal_angles,
    subspace_overlap,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("n", "p", "q"), [(20, 5, 5), (20, 3, 7), (12, 12, 4), (64, 16, 16)])
def test_principal_angles_match_scipy(n: int, p: int, q: int) -> None:
    A, B = _rand(n, p, seed=1), _rand(n, q, seed=2)
    ours = principal_angles(A, B).numpy()
    ref = np.sort(sl.subspace_angles(A.numpy(), B.numpy()))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_tiny_angles_keep_relative_accuracy() -> None:
    """Cosines alone cannot resolve angles below ~1e-8; the sine branch must."""
    A = _rand(30, 4, seed=3)
    B = A + 1e-10 * _rand(30, 4, seed=4)
    ours = principal_angles(A, B).numpy()
    ref = np.sort(sl.subspace_angles(A.numpy(), B.numpy()))
    assert ours.max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_distances_with_known_answers() -> None:
    e = torch.eye(6, dtype=torch.float64)
    theta = 0.3
    rotated = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]], dim=1)
    base = e[:, :2]
    assert compute_grassmann_distance(base, base) == pytest.approx(0.0, abs=1e-12)
    assert compute_grassmann_distance(base, rotated) == pytest.approx(theta, abs=1e-12)
    assert compute_grassmann_distance(base, rotated, "chordal") == pytest.approx(math.sin(theta), abs=1e-12)
    assert compute_grassmann_distance(base, rotated, "projection") == pytest.approx(math.sin(theta), abs=1e-12)
    orth = e[:, 3:5]
    assert compute_grassmann_distance(base, orth) == pytest.approx(math.sqrt(2) * math.pi / 2, abs=1e-12)
    assert compute_grassmann_distance(base, orth, "binet_cauchy") == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(base, orth) == pytest.approx(0.0, abs=1e-12)
    assert subspace_overlap(base, rotated) == pytest.approx((1 + math.cos(theta) ** 2) / 2, abs=1e-12)
    # different dimensions (Ye & Lim): a subspace and one of its own subspaces differ by pi/2 per missing direction
    assert compute_grassmann_distance(e[:, :1], base) == pytest.approx(math.pi / 2, abs=1e-12)
    # the basis does not matter, only the span
    mixed = base @ torch.tensor([[2.0, 1.0], [0.5, -3.0]], dtype=torch.float64)
    assert compute_grassmann_distance(base, mixed) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_grassmann_distance(base, rotated, "cosine")  # type: ignore[arg-type]


def test_energy_rank() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3


def test_truncated_svd_keeps_dominant_subspaces_exactly_and_pruning_does_not() -> None:
    W = _rand(48, 32, seed=5)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W8 = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
    rep = compare_weights(W, W8, energy=0.5)
    assert rep["rank_compressed"] == 8 and 1 <= rep["k"] <= 8
    for side in ("rows", "columns"):
        assert rep[side]["geodesic"] < 1e-6 and rep[side]["overlap"] == pytest.approx(1.0, abs=1e-9)
    # k is capped by the compressed rank: a rank-8 weight has no 9th direction to compare
    assert compare_weights(W, W8, energy=0.99)["k"] == 8
    pruned = W * (W.abs() > W.abs().median())
    rep_p = compare_weights(W, pruned, energy=0.5)
    assert rep_p["rows"]["geodesic"] > 0.1 and rep_p["columns"]["geodesic"] > 0.1
    assert 0 < rep_p["rows"]["geodesic_normalised"] < 1
    assert rep_p["relative_weight_error"] == pytest.approx(float((W - pruned).norm() / W.norm()))


def test_null_space_share_of_weight_energy() -> None:
    n, d = 16, 10
    basis = torch.linalg.qr(_rand(n, n, seed=6))[0]
    X = _rand(500, d, seed=7) @ basis[:, :d].t()  # inputs live in a d-dimensional subspace
    G = X.t() @ X / X.shape[0]
    N = input_null_basis(G, 1e-8)
    assert N.shape == (n, n - d)
    assert (N.t() @ basis[:, :d]).abs().max() < 1e-6  # orthogonal to the data
    W = _rand(8, n, seed=8)
    share = float((W @ basis[:, d:]).square().sum() / W.square().sum())
    rep = null_space_report(W, G, rel_tols=(1e-8,), compressed=W @ basis[:, :d] @ basis[:, :d].t())
    row = rep["tolerances"][0]
    assert row["null_dim"] == n - d
    assert row["weight_energy_share"] == pytest.approx(share, rel=1e-6)
    assert row["compressed_weight_energy_share"] == pytest.approx(0.0, abs=1e-12)  # projected off the null space
    assert rep["effective_rank"] <= d + 1e-6


def _two_layer_models() -> tuple[nn.Module, nn.Module]:
    from rcc_compression.compression.layers import CompressedLinear

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 24))
    comp = nn.Sequential(CompressedLinear.from_linear(dense[0]), nn.ReLU(), CompressedLinear.from_linear(dense[2]))
    W = dense[0].weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    comp[0].set_sparse(None)
    comp[0].set_low_rank(U[:, :6] * S[:6], Vh[:6])
    w2 = dense[2].weight.detach()
    comp[2].set_sparse(w2, w2.abs() > w2.abs().median())
    return dense, comp


def test_analyzer_compares_models_layer_by_layer() -> None:
    dense, comp = _two_layer_models()
    rep = GrassmannAnalyzer(energy=0.5).compare_models(dense, comp)
    assert set(rep["layers"]) == {"0", "2"}
    assert rep["layers"]["0"]["rows"]["geodesic"] < 1e-5  # truncated SVD
    assert rep["layers"]["2"]["rows"]["geodesic"] > 1e-2  # pruned
    assert rep["summary"]["layers"] == 2
    same = GrassmannAnalyzer().compare_runs(comp, comp)
    assert all(v["rows"]["geodesic"] < 1e-6 for v in same["layers"].values())
    over = GrassmannAnalyzer(energy=0.9).overlap_across_layers(dense, ["0", "2"], side="rows")
    assert set(over) == {"24", "32"}  # layers of different input widths are not compared
    assert over["24"]["overlap"] == [[pytest.approx(1.0)]]
    twin = nn.Sequential(nn.Linear(24, 32), nn.Linear(24, 32))
    twin[1].weight.data = twin[0].weight.data * -2.0  # the same row space
    both = analyze_overlap(twin, ["0", "1"])["24"]
    assert both["layers"] == ["0", "1"] and both["overlap"][0][1] == pytest.approx(1.0)
