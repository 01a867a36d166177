"""Low-rank factor maths shared by ``nullu``, the sequential refit and the planner (pure functions)."""

from __future__ import annotations

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
