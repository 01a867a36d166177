"""Low-rank maths shared by ``nullu``, the sequential refit and the planner (pure functions).

Ranks (:func:`rank_for`, :func:`allocate_ranks` for a budget several layers share), decompositions
(:func:`svd`, :func:`spectral_energy`, :func:`warm_subspace_svd` from a previous subspace), factors
(:func:`balanced_factors`, :func:`whitening` for activation-aware SVD) and what a factorisation drops
(:func:`dropped_input_energy`). ``compression/nullu.py`` orchestrates them over a model's layers.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r`` (equal norms, better conditioned for training)."""
    root = S[:r].sqrt()
    return U[:, :r] * root[None, :], root[:, None] * Vh[:r]


#: the smallest ridge ``whitening`` adds to a (nearly) singular input moment, as a share of its mean energy
MIN_DAMPING = 1e-6


def whitening(gram: torch.Tensor, damping: float = 1e-2, method: str = "cholesky"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L^-1)`` with ``L L^T = X^T X + lambda I``, ``lambda = damping * mean(diag(X^T X))``.

    ``cholesky`` (SVD-LLM) falls back to the symmetric root when the factorisation fails.
    Any such ``L`` gives the same optimal output error; the ``symmetric`` root also keeps the
    factors' row space inside the span the inputs occupy, so directions they never visit are
    visibly dropped. Where ``damping`` is below :data:`MIN_DAMPING` and ``X^T X`` is (nearly)
    singular (fewer calibration tokens than channels; a Cholesky pivot below that share of the
    mean energy), ``lambda`` is raised to it, as SVD-LLM adds a minimal ridge: the inverse root
    would otherwise hold non-finite or astronomically large entries.
    """
    g = gram.double()
    n = g.shape[0]
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    mean = float(g.diagonal().mean().clamp_min(1e-12))
    lam = damping * mean
    h = g + lam * eye
    if lam < MIN_DAMPING * mean:
        L, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0 or float(L.diagonal().pow(2).min()) < MIN_DAMPING * mean:
            lam = MIN_DAMPING * mean
            h = g + lam * eye
    if method == "cholesky":
        L, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            return L.to(gram.dtype), Linv.to(gram.dtype)
    elif method != "symmetric":
        raise ValueError(f"unknown whitening {method!r}; allowed: cholesky, symmetric")
    evals, evecs = torch.linalg.eigh(h)
    evals = evals.clamp_min(max(lam, 1e-300))
    L = (evecs * evals.sqrt()[None, :]) @ evecs.t()
    Linv = (evecs / evals.sqrt()[None, :]) @ evecs.t()
    return L.to(gram.dtype), Linv.to(gram.dtype)


def whitened_top(R: torch.Tensor, L: torch.Tensor, k: int, niter: int = 2, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets ``(U, S, Vh)`` of ``R @ L`` without forming it (randomized SVD:
    Halko, Martinsson & Tropp 2011, ``niter`` power iterations, as :func:`torch.svd_lowrank`).

    Each product with ``R L`` is one with ``L`` and one with ``R``: ``(m + n) n k`` instead of the
    ``m n^2`` of forming it, what scoring several residuals of a wide layer costs. Seeded: the same
    inputs give the same directions.
    """
    g = torch.Generator(device=R.device).manual_seed(seed)
    omega = torch.randn(L.shape[1], k, generator=g, device=R.device, dtype=R.dtype)
    Q = torch.linalg.qr(R @ (L @ omega)).Q
    for _ in range(niter):
        Z = torch.linalg.qr(L.t() @ (R.t() @ Q)).Q
        Q = torch.linalg.qr(R @ (L @ Z)).Q
    B = (Q.t() @ R) @ L  # k x n
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub, S, Vh


def factorisable(rank: int, m: int, n: int) -> bool:
    """Whether rank-``rank`` factors of an ``m x n`` weight store fewer numbers: ``r (m + n) < m n``."""
    return 0 < rank and rank * (m + n) < m * n


def budget_rank(m: int, n: int, budget: float) -> int:
    """Largest rank whose factors use at most ``budget`` of the dense parameters (at least 1)."""
    return int(min(max(1, math.floor(budget * m * n / (m + n) + 1e-9)), min(m, n)))


def allocate_ranks(energies: list[torch.Tensor], shapes: list[tuple[int, int]], budget_params: float) -> list[int]:
    """Ranks for several layers sharing one parameter budget (greedy, globally optimal order).

    Each singular direction is worth its share of its layer's energy (the relative output error it
    removes) per parameter it costs (``m + n``); directions are taken best first until the budget
    is spent. A layer never gets a rank at which factors would not save (``r (m + n) >= m n``).
    """
    vals, owners, costs = [], [], []
    for i, (e, (m, n)) in enumerate(zip(energies, shapes, strict=True)):
        cap = min(len(e), (m * n - 1) // (m + n))
        total = float(e.sum())
        if cap <= 0 or total <= 0:
            continue
        vals.append(e[:cap].double() / total / (m + n))
        owners.append(torch.full((cap,), i, dtype=torch.long))
        costs.append(torch.full((cap,), m + n, dtype=torch.float64))
    if not vals:
        return [0] * len(energies)
    order = torch.argsort(torch.cat(vals), descending=True, stable=True)
    owner = torch.cat(owners)[order]
    cost = torch.cat(costs)[order]
    spent = torch.cumsum(cost, 0)
    n_prefix = int((spent <= budget_params + 1e-9).sum())
    ranks = torch.bincount(owner[:n_prefix], minlength=len(energies)).tolist()
    left = budget_params - (float(spent[n_prefix - 1]) if n_prefix else 0.0)
    # then what still fits, best first (a layer whose next direction does not fit is done: all cost the same)
    for i, c in zip(owner[n_prefix:].tolist(), cost[n_prefix:].tolist(), strict=True):
        if c <= left + 1e-9:
            ranks[i] += 1
            left -= c
    return ranks


def rank_for(
    energy: torch.Tensor,
    m: int,
    n: int,
    rank_reduction: float | None = None,
    energy_threshold: float | None = None,
    param_budget: float | None = None,
    rule: str = "min",
    total_energy: float | None = None,
) -> int:
    """Rank from whichever criteria are set, combined by ``rule`` (``min`` = the most compressive).

    ``energy`` are the squared singular values (descending); ``total_energy`` defaults to their
    sum (pass ``||W||_F^2`` when only the top ones are known).
    """
    full = min(m, n)
    cands = []
    if rank_reduction is not None:
        cands.append(max(1, round(full * (1.0 - rank_reduction))))
    if energy_threshold is not None:
        e = energy.double()
        total = float(total_energy) if total_energy is not None else float(e.sum())
        if total <= 0:
            cands.append(1)
        else:
            frac = torch.cumsum(e, 0) / total
            hit = torch.nonzero(frac >= energy_threshold - 1e-12)
            cands.append(int(hit[0]) + 1 if hit.numel() else len(e))
    if param_budget is not None:
        cands.append(budget_rank(m, n, param_budget))
    if not cands:
        return full
    r = min(cands) if rule == "min" else max(cands)
    return int(min(max(r, 1), full))


@functools.lru_cache(maxsize=64)
def _best_cuda_driver(shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Time the cuSOLVER SVD drivers once per shape and keep the fastest."""
    x = torch.randn(shape, device="cuda", dtype=dtype)
    best, best_t = None, float("inf")
    for driver in ("gesvd", "gesvdj", "gesvda"):
        try:
            torch.linalg.svd(x, full_matrices=False, driver=driver)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.linalg.svd(x, full_matrices=False, driver=driver)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        except RuntimeError:
            continue
        if dt < best_t:
            best, best_t = driver, dt
    return best


def svd(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, batched over leading dimensions; on CUDA the fastest driver for the shape, measured."""
    if matrices.is_cuda:
        driver = _best_cuda_driver(tuple(matrices.shape), matrices.dtype)
        return torch.linalg.svd(matrices, full_matrices=False, driver=driver)
    return torch.linalg.svd(matrices, full_matrices=False)


def spectral_energy(matrices: torch.Tensor) -> torch.Tensor:
    """Squared singular values (descending) from the eigenvalues of the smaller Gram matrix.

    Several times cheaper than ``svdvals`` and exact enough to pick a rank by energy.
    """
    m, n = matrices.shape[-2:]
    gram = matrices @ matrices.transpose(-1, -2) if m <= n else matrices.transpose(-1, -2) @ matrices
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def warm_subspace_svd(M: torch.Tensor, A_prev: torch.Tensor, iterations: int = 1, tol: float | None = None,
                      max_iterations: int = 30, info: dict[str, Any] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top SVD of ``M`` by subspace iteration started from ``A_prev``'s row space.

    Returns ``U, S, Vh`` with ``q = A_prev.shape[0]`` components; exact when ``M``'s top-q
    subspace is ``A_prev``'s, and otherwise improving with each iteration. With ``tol`` it
    iterates (at most ``max_iterations`` times) until an iteration adds less captured energy
    ``||Q^T M||^2`` than ``tol`` times the energy still left out, i.e. until the truncation error
    is within about that share of the exact truncated SVD's; ``info`` receives ``iterations`` and
    ``converged``.
    """
    Q = torch.linalg.qr(M @ A_prev.t().to(M.dtype)).Q
    done, converged = 0, tol is None
    if tol is None:
        for _ in range(max(iterations, 0)):
            Q = torch.linalg.qr(M @ (M.t() @ Q)).Q
        done = max(iterations, 0)
    else:
        total = float(M.double().pow(2).sum())
        captured = float((Q.t() @ M).double().pow(2).sum())
        while done < max_iterations:
            Q = torch.linalg.qr(M @ (M.t() @ Q)).Q
            done += 1
            new = float((Q.t() @ M).double().pow(2).sum())
            gain, left = new - captured, total - new
            captured = new
            if gain <= tol * max(left, 1e-12 * total):
                converged = True
                break
    if info is not None:
        info.update(iterations=done, converged=converged)
    # the q x n projection's SVD from the eigenpairs of its q x q Gram (float64): far cheaper than
    # an SVD of the q x n matrix when n >> q, and exact for the directions with S > 0
    B = Q.t() @ M
    evals, evecs = torch.linalg.eigh((B @ B.t()).double())
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    S = evals.sqrt()
    live = S > 1e-6 * S[:1].clamp_min(torch.finfo(torch.float64).tiny)  # below: lost to rounding in the Gram
    S = torch.where(live, S, torch.zeros_like(S))
    Vh = torch.where(live[:, None], (evecs.t() @ B.double()) / torch.where(live, S, 1.0)[:, None], 0.0)
    return Q @ evecs.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype)


def dropped_input_energy(Vh_r: torch.Tensor, gram: torch.Tensor, right: torch.Tensor | None = None,
                         right_inv: torch.Tensor | None = None) -> float:
    """Share of calibration input energy ``tr(X^T X)`` in the subspace the factorisation drops.

    Truncating the SVD of ``W R`` to ``Vh_r`` gives ``B A = W P`` with the input-side projector
    ``P = R Vh_r^T Vh_r R^-1`` (``R`` = I for plain SVD, the whitening root for activation-aware
    SVD, ``diag(s)`` for ASVD; P does not depend on which root). The dropped inputs are
    ``(I - P) x``; directions the calibration inputs never occupy cost nothing. Computed as
    ``tr(G) - 2 tr(P G) + tr(P G P^T)`` through the rank-r factors of P, in O(r n^2).
    """
    g = gram.to(Vh_r.dtype if Vh_r.dtype == torch.float64 else torch.float32)
    V = Vh_r.to(g.dtype)
    X = V.t() if right is None else right.to(g.dtype) @ V.t()  # n x r
    Y = V if right_inv is None else V @ right_inv.to(g.dtype)  # r x n, P = X Y
    YG = Y @ g
    total = float(g.diagonal().sum())
    if total <= 0:
        return 0.0
    kept_cross = float((YG * X.t()).sum())  # tr(P G)
    kept_sq = float(((YG @ Y.t()) * (X.t() @ X)).sum())  # tr(P G P^T)
    return max(0.0, (total - 2 * kept_cross + kept_sq) / total)


def input_null_dim(gram: torch.Tensor, rel_tol: float = 1e-5) -> int:
    """Number of input directions calibration data never occupies (eigenvalues below ``rel_tol * max``)."""
    evals = torch.linalg.eigvalsh(gram.float())
    return int((evals <= rel_tol * evals.max().clamp_min(1e-300)).sum())
