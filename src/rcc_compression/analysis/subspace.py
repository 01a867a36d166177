"""Subspace measures: what compression keeps of each layer's row and column spaces.

A ``m x n`` weight ``W`` maps its *row space* (in ``R^n``, spanned by the right singular
vectors) onto its *column space* (in ``R^m``, the left singular vectors). Compression changes
both; how much is a distance on the Grassmann manifold between the dominant ``k``-dimensional
subspaces of the dense and the compressed weight:

- :func:`principal_angles` between two subspaces (Knyazev-Argentati: cosines for large angles,
  sines for small ones, so tiny angles are not lost to rounding; agrees with
  ``scipy.linalg.subspace_angles``);
- :func:`compute_grassmann_distance`: the geodesic distance ``||theta||_2`` (default), or the
  chordal ``||sin theta||_2``, projection ``max sin theta`` or Binet-Cauchy distances; for
  subspaces of different dimensions, Ye and Lim's extension (each missing dimension counts
  ``pi/2``);
- :func:`subspace_overlap`: ``||Q_a^T Q_b||_F^2 / min(p, q)``, the mean squared cosine (1: the
  same subspace, 0: orthogonal);
- :class:`GrassmannAnalyzer`: every layer of a dense and a compressed model (or two compressed
  runs), overlap across layers, and the numerical null space of each layer's calibration inputs
  with the share of the weight's energy that lies in it (:func:`null_space_report`).

``k`` is the number of singular directions holding ``energy`` of the dense weight's squared
spectrum, capped by the compressed weight's numerical rank (a rank-``r`` factorisation has no
``(r+1)``-th direction to compare). Everything is float64 linear algebra on whole matrices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..compression.layers import CompressedLinear

Metric = Literal["geodesic", "chordal", "projection", "binet_cauchy"]
METRICS: tuple[str, ...] = ("geodesic", "chordal", "projection", "binet_cauchy")


def orthonormal_basis(M: torch.Tensor, rel_tol: float = 1e-10) -> torch.Tensor:
    """An orthonormal basis (columns) of the column span of ``M``; numerically null directions are dropped."""
    M = M.detach().to(torch.float64)
    if M.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(M.shape)}")
    if M.shape[1] == 0:
        return M
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    keep = S > rel_tol * S[0].clamp_min(torch.finfo(torch.float64).tiny) if S.numel() else S.bool()
    return U[:, keep]


def principal_angles(A: torch.Tensor, B: torch.Tensor, orthonormal: bool = False) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of ``A`` (``n x p``) and ``B`` (``n x q``).

    ``min(rank A, rank B)`` angles. Angles whose cosine is above ``1/sqrt(2)`` are taken from the
    sines (``arcsin`` of the singular values of ``(I - Q_a Q_a^T) Q_b``), the others from the
    cosines (``arccos`` of the singular values of ``Q_a^T Q_b``), as in Knyazev & Argentati
    (2002) and ``scipy.linalg.subspace_angles``.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces must live in one space: got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    Qa = A.detach().to(torch.float64) if orthonormal else orthonormal_basis(A)
    Qb = B.detach().to(torch.float64) if orthonormal else orthonormal_basis(B)
    if Qa.shape[1] < Qb.shape[1]:
        Qa, Qb = Qb, Qa
    k = Qb.shape[1]
    if k == 0:
        return torch.zeros(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(Qa.t() @ Qb).clamp(0.0, 1.0)  # descending -> angles ascending
    resid = Qb - Qa @ (Qa.t() @ Qb)
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0).flip(0)  # k values (n >= k), flipped to ascending angles
    small = cos**2 > 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def compute_grassmann_distance(
    A: torch.Tensor, B: torch.Tensor, metric: Metric = "geodesic", orthonormal: bool = False
) -> float:
    """Distance between the column spans of ``A`` and ``B`` on the Grassmannian.

    ``geodesic`` = ``sqrt(sum theta_i^2)`` (arc length; at most ``sqrt(k) pi/2``), ``chordal`` =
    ``sqrt(sum sin^2 theta_i)``, ``projection`` = ``max sin theta_i`` (the spectral norm of the
    projector difference), ``binet_cauchy`` = ``sqrt(1 - prod cos^2 theta_i)``. When the
    dimensions differ by ``d``, the ``d`` directions with no partner each add an angle of ``pi/2``
    (Ye & Lim 2016), so the distance is zero only for identical subspaces.
    """
    Qa = A.detach().to(torch.float64) if orthonormal else orthonormal_basis(A)
    Qb = B.detach().to(torch.float64) if orthonormal else orthonormal_basis(B)
    theta = principal_angles(Qa, Qb, orthonormal=True)
    extra = abs(Qa.shape[1] - Qb.shape[1])
    if extra:
        theta = torch.cat([theta, theta.new_full((extra,), math.pi / 2)])
    if metric == "geodesic":
        return float(theta.square().sum().sqrt())
    if metric == "chordal":
        return float(torch.sin(theta).square().sum().sqrt())
    if metric == "projection":
        return float(torch.sin(theta).max()) if theta.numel() else 0.0
    if metric == "binet_cauchy":
        return float((1.0 - torch.cos(theta).square().prod()).clamp_min(0.0).sqrt())
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def subspace_overlap(A: torch.Tensor, B: torch.Tensor, orthonormal: bool = False) -> float:
    """Mean squared cosine of the principal angles, ``||Q_a^T Q_b||_F^2 / min(p, q)``, in [0, 1]."""
    Qa = A.detach().to(torch.float64) if orthonormal else orthonormal_basis(A)
    Qb = B.detach().to(torch.float64) if orthonormal else orthonormal_basis(B)
    k = min(Qa.shape[1], Qb.shape[1])
    if k == 0:
        return 0.0
    return float((Qa.t() @ Qb).square().sum()) / k


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Fewest leading directions holding ``energy`` of ``sum s_i^2`` (at least 1 for a non-zero matrix)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    s2 = singular_values.to(torch.float64).square()
    total = float(s2.sum())
    if total <= 0.0:
        return 0
    cum = torch.cumsum(s2, 0) / total
    return min(int((cum < energy - 1e-12).sum()) + 1, s2.numel())


def numerical_rank(singular_values: torch.Tensor, rel_tol: float = 1e-6) -> int:
    """Singular values above ``rel_tol`` times the largest."""
    s = singular_values.to(torch.float64)
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > rel_tol * s[0]).sum())


def compare_weights(
    dense: torch.Tensor,
    compressed: torch.Tensor,
    energy: float = 0.9,
    k: int | None = None,
    rank_tol: float = 1e-6,
) -> dict[str, Any]:
    """Principal angles and Grassmann distances between the dominant subspaces of two weights.

    ``k`` (default: the dense weight's ``energy`` rank) is capped by the compressed weight's
    numerical rank. Returns the dimensions, and for ``rows`` (input side) and ``columns``
    (output side): the geodesic, chordal and projection distances, the geodesic distance
    normalised by its maximum ``sqrt(k) pi/2``, the overlap, the largest and mean angle (degrees),
    and the relative weight error ``||W - W_c||_F / ||W||_F``.
    """
    if dense.shape != compressed.shape:
        raise ValueError(f"weights differ in shape: {tuple(dense.shape)} vs {tuple(compressed.shape)}")
    Ud, Sd, Vhd = torch.linalg.svd(dense.detach().to(torch.float64), full_matrices=False)
    Uc, Sc, Vhc = torch.linalg.svd(compressed.detach().to(torch.float64), full_matrices=False)
    kd = energy_rank(Sd, energy) if k is None else min(k, Sd.numel())
    rank_c = numerical_rank(Sc, rank_tol)
    kk = min(kd, rank_c)
    out: dict[str, Any] = {"shape": list(dense.shape), "k": kk, "k_dense": kd, "energy": energy if k is None else None,
                           "rank_dense": numerical_rank(Sd, rank_tol), "rank_compressed": rank_c}
    dn = float(dense.detach().to(torch.float64).norm())
    out["relative_weight_error"] = float((dense.detach().to(torch.float64) - compressed.detach().to(torch.float64)
                                          ).norm()) / dn if dn else 0.0
    for side, (Qd, Qc) in {"rows": (Vhd[:kk].t(), Vhc[:kk].t()), "columns": (Ud[:, :kk], Uc[:, :kk])}.items():
        theta = principal_angles(Qd, Qc, orthonormal=True)
        geo = float(theta.square().sum().sqrt())
        out[side] = {
            "geodesic": geo,
            "geodesic_normalised": geo / (math.sqrt(kk) * math.pi / 2) if kk else 0.0,
            "chordal": float(torch.sin(theta).square().sum().sqrt()),
            "projection": float(torch.sin(theta).max()) if kk else 0.0,
            "overlap": float(torch.cos(theta).square().mean()) if kk else 0.0,
            "max_angle_deg": math.degrees(float(theta.max())) if kk else 0.0,
            "mean_angle_deg": math.degrees(float(theta.mean())) if kk else 0.0,
        }
    return out


def input_null_basis(second_moment: torch.Tensor, rel_tol: float = 1e-5) -> torch.Tensor:
    """Orthonormal basis (``n x d``) of the input directions the calibration inputs (nearly) never occupy.

    The eigenvectors of the input second moment ``X^T X / N`` whose eigenvalue is at most
    ``rel_tol`` times the largest.
    """
    G = second_moment.detach().to(torch.float64)
    G = (G + G.t()) / 2
    evals, evecs = torch.linalg.eigh(G)
    top = float(evals[-1]) if evals.numel() else 0.0
    return evecs[:, evals <= rel_tol * max(top, torch.finfo(torch.float64).tiny)]


def null_space_report(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    rel_tols: Iterable[float] = (1e-6, 1e-4, 1e-2),
    compressed: torch.Tensor | None = None,
) -> dict[str, Any]:
    """For each tolerance: the null-space dimension of the layer's inputs and the weight energy in it.

    ``weight_energy_share`` is ``||W N||_F^2 / ||W||_F^2`` with ``N`` the null basis: weight that
    acts only on inputs the data never produce. With ``compressed``, the same share of the
    compressed weight is reported too. The input spectrum's effective rank (exp of the entropy of
    the normalised eigenvalues) is given as well.
    """
    W = weight.detach().to(torch.float64)
    G = second_moment.detach().to(torch.float64)
    if G.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"second moment {tuple(G.shape)} does not match the weight's {W.shape[1]} inputs")
    G = (G + G.t()) / 2
    evals, evecs = torch.linalg.eigh(G)
    evals = evals.clamp_min(0.0)
    top = float(evals[-1]) if evals.numel() else 0.0
    p = evals / evals.sum() if float(evals.sum()) > 0 else evals
    nz = p[p > 0]
    out: dict[str, Any] = {"input_dim": int(W.shape[1]),
                           "effective_rank": float(torch.exp(-(nz * nz.log()).sum())) if nz.numel() else 0.0,
                           "tolerances": []}
    wn = float(W.square().sum())
    Wc = compressed.detach().to(torch.float64) if compressed is not None else None
    cn = float(Wc.square().sum()) if Wc is not None else 0.0
    for tol in rel_tols:
        N = evecs[:, evals <= tol * max(top, torch.finfo(torch.float64).tiny)]
        row: dict[str, Any] = {"rel_tol": tol, "null_dim": int(N.shape[1]),
                               "weight_energy_share": float((W @ N).square().sum()) / wn if wn else 0.0}
        if Wc is not None:
            row["compressed_weight_energy_share"] = float((Wc @ N).square().sum()) / cn if cn else 0.0
        out["tolerances"].append(row)
    return out


def _layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective dense weights of a model's Linear and compressed layers, by module name."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear):
            out[name] = mod.weight.detach()
        elif hasattr(mod, "effective_weight") and hasattr(mod, "in_features"):
            out[name] = mod.effective_weight().detach()
    return out


class GrassmannAnalyzer:
    """Subspace analysis of compressed models, layer by layer (docs/analysis.md).

    >>> report = GrassmannAnalyzer(energy=0.9).compare_models(dense, compressed)  # doctest: +SKIP
    >>> report["layers"]["vision_model.encoder.layers.0.mlp.fc1"]["rows"]["geodesic"]  # doctest: +SKIP
    """

    def __init__(self, energy: float = 0.9, k: int | None = None, rank_tol: float = 1e-6) -> None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy}")
        self.energy, self.k, self.rank_tol = energy, k, rank_tol

    def compare_models(self, dense: nn.Module, compressed: nn.Module, layers: Iterable[str] | None = None
                       ) -> dict[str, Any]:
        """Per-layer :func:`compare_weights` of the layers both models share (or ``layers``)."""
        wd, wc = _layer_weights(dense), _layer_weights(compressed)
        names = list(layers) if layers is not None else [n for n in wc if n in wd and _is_compressed(compressed, n)]
        missing = [n for n in names if n not in wd or n not in wc]
        if missing:
            raise ValueError(f"layers missing from a model: {missing[:3]}")
        per = {n: compare_weights(wd[n], wc[n], self.energy, self.k, self.rank_tol) for n in names}
        return {"energy": self.energy, "k": self.k, "layers": per, "summary": _summary(per)}

    def compare_runs(self, run_a: nn.Module, run_b: nn.Module, layers: Iterable[str] | None = None) -> dict[str, Any]:
        """The same measures between two compressed models of one dense model (e.g. two orders or seeds)."""
        return self.compare_models(run_a, run_b, layers)

    def overlap_across_layers(self, model: nn.Module, layers: Iterable[str] | None = None,
                              side: Literal["rows", "columns"] = "rows") -> dict[str, Any]:
        """Pairwise :func:`subspace_overlap` of the dominant subspaces of layers of equal dimension.

        Returns ``{"dim": {"layers": [...], "overlap": [[...]]}}`` per input (``rows``) or output
        (``columns``) dimension: which layers read (write) nearly the same directions.
        """
        weights = _layer_weights(model)
        names = list(layers) if layers is not None else [n for n in weights if _is_compressed(model, n)] or list(
            weights)
        bases: dict[str, torch.Tensor] = {}
        for n in names:
            W = weights[n].to(torch.float64)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            kk = energy_rank(S, self.energy) if self.k is None else min(self.k, S.numel())
            kk = min(kk, max(numerical_rank(S, self.rank_tol), 1))
            bases[n] = Vh[:kk].t() if side == "rows" else U[:, :kk]
        groups: dict[int, list[str]] = {}
        for n, Q in bases.items():
            groups.setdefault(int(Q.shape[0]), []).append(n)
        out: dict[str, Any] = {}
        for dim, members in groups.items():
            mat = [[subspace_overlap(bases[a], bases[b], orthonormal=True) for b in members] for a in members]
            out[str(dim)] = {"layers": members, "k": [int(bases[n].shape[1]) for n in members], "overlap": mat}
        return out

    def null_spaces(self, dense: nn.Module, second_moments: Mapping[str, torch.Tensor],
                    compressed: nn.Module | None = None, rel_tols: Iterable[float] = (1e-6, 1e-4, 1e-2)
                    ) -> dict[str, Any]:
        """:func:`null_space_report` for every layer with a calibration second moment."""
        wd = _layer_weights(dense)
        wc = _layer_weights(compressed) if compressed is not None else {}
        tols = tuple(rel_tols)
        return {n: null_space_report(wd[n], G, tols, wc.get(n)) for n, G in second_moments.items() if n in wd}


def analyze_overlap(model: nn.Module, layers: Iterable[str] | None = None, side: Literal["rows", "columns"] = "rows",
                    energy: float = 0.9) -> dict[str, Any]:
    """Pairwise overlap of the layers' dominant subspaces (:meth:`GrassmannAnalyzer.overlap_across_layers`)."""
    return GrassmannAnalyzer(energy=energy).overlap_across_layers(model, layers, side)


def _is_compressed(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name), CompressedLinear)


def _summary(per: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    if not per:
        return {}
    out: dict[str, Any] = {"layers": len(per)}
    for side in ("rows", "columns"):
        geo = [v[side]["geodesic_normalised"] for v in per.values()]
        ov = [v[side]["overlap"] for v in per.values()]
        out[side] = {"mean_geodesic_normalised": sum(geo) / len(geo), "max_geodesic_normalised": max(geo),
                     "mean_overlap": sum(ov) / len(ov)}
    return out
