"""Choose stage settings that reach a requested compression rate.

``compression_rate = 1 - stored_bytes / dense_bytes`` (of the compressed layers, or of the whole
model). The byte model is exactly what the saved format holds (see ``storage``): S as a bitmask
or CSR plus values, low-rank factors, scales and bias, so the plan lands on the rate the saved
checkpoint measures. For the cascade, the byte budget is split between the sparse and the
low-rank part; the split is chosen by the reconstruction error it leaves on the model's own
weights (whitened by calibration statistics when given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CompressionError
from .dare import keep_count, magnitude_scores, topk_mask, wanda_scores
from .lowrank import whitening
from .nullu import allocate_ranks, budget_rank, spectral_energy, svd
from .storage import sparse_encoding_bytes


@dataclass(frozen=True)
class LayerShape:
    """What the byte model needs to know about one target layer."""

    out_features: int
    in_features: int
    element_size: int
    has_bias: bool

    @property
    def dense_bytes(self) -> int:
        return (self.out_features * self.in_features + (self.out_features if self.has_bias else 0)) * self.element_size


def layer_bytes(
    shape: LayerShape, pruning_rate: float | None, param_budget: float | None, scales: bool, bias: bool = True,
    scope: str = "layer",
) -> int:
    """Stored bytes of one layer: S at ``pruning_rate`` (None: no S), factors at ``param_budget`` (None: none).

    ``scope`` is how the pruning stage ranks (``layer`` or ``row``), which decides the rounding.
    """
    m, n, es = shape.out_features, shape.in_features, shape.element_size
    total = m * es if (bias and shape.has_bias) else 0
    if scales:
        total += (m + n) * es
    if pruning_rate is not None:
        nnz = m * keep_count(n, pruning_rate) if scope == "row" else keep_count(m * n, pruning_rate)
        enc = sparse_encoding_bytes(m, n, nnz, es)
        total += enc["dense"] if nnz == m * n else min(enc["bitmask"], enc["csr"])
    if param_budget is not None:
        total += budget_rank(m, n, param_budget) * (m + n) * es
    return total


def _bisect(f: Any, target: float, lo: float, hi: float, increasing: bool, iters: int = 60) -> float:
    """The bound of ``[lo, hi]`` nearest the crossing at which ``f <= target`` (never over budget)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (f(mid) <= target) == increasing:
            lo = mid
        else:
            hi = mid
    return lo if increasing else hi


def plan_rate(
    shapes: Sequence[LayerShape],
    rate: float,
    method: str,
    lowrank_share: float = 0.5,
    scales: bool = False,
    rest_bytes: int = 0,
    scope: str = "layers",
    prune_scope: str = "layer",
    rank_allocation: str = "layer",
) -> dict[str, Any]:
    """Settings (``pruning_rate``, ``param_budget``) whose stored bytes hit ``rate``.

    ``method`` is ``dare`` (sparse only), ``nullu`` (low rank only) or ``cascade`` (both, with
    ``lowrank_share`` of the variable bytes going to the factors); ``prune_scope`` is the pruning
    stage's ranking scope (``layer`` or ``row``); ``rank_allocation`` is ``nullu.budget_allocation``.
    Raises :class:`CompressionError`
    with the reason when the rate cannot be reached.
    """
    if not 0.0 <= rate < 1.0:
        raise CompressionError(f"compression_rate must be in [0, 1), got {rate}")
    dense = sum(s.dense_bytes for s in shapes)
    if scope == "model":
        budget = (1.0 - rate) * (dense + rest_bytes) - rest_bytes
        if budget <= 0:
            raise CompressionError(
                f"a model-wide rate of {rate:.4f} is out of reach: the parts left dense (embeddings, norms, heads: "
                f"{rest_bytes / 2**20:.2f} MiB) already exceed {(1 - rate) * 100:.2f} % of the model "
                f"({(dense + rest_bytes) / 2**20:.2f} MiB); compress more layers (targets) or ask for scope='layers'"
            )
    else:
        budget = (1.0 - rate) * dense
    fixed = sum(layer_bytes(s, None, None, scales) for s in shapes)
    variable = budget - fixed
    if variable <= 0:
        raise CompressionError(
            f"rate {rate:.4f} is out of reach: biases{' and scales' if scales else ''} alone take "
            f"{fixed / max(dense, 1) * 100:.2f} % of the dense layers"
        )

    def sparse_bytes(p: float) -> float:
        return sum(layer_bytes(s, p, None, False, bias=False, scope=prune_scope) for s in shapes)

    def lowrank_bytes(b: float) -> float:
        if rank_allocation == "global":  # ranks share b * sum(m n) parameters, filled to within one rank
            return b * sum(s.out_features * s.in_features * s.element_size for s in shapes)
        return sum(layer_bytes(s, None, b, False, bias=False) for s in shapes)

    if method not in ("dare", "nullu", "cascade"):
        raise CompressionError(f"cannot plan a rate for method {method!r}; allowed: cascade, dare, nullu")
    p_max, b_min = 1.0 - 1e-9, 1e-9
    floor = {"dare": sparse_bytes(p_max), "nullu": lowrank_bytes(b_min),
             "cascade": sparse_bytes(p_max) + lowrank_bytes(b_min)}[method]
    if floor > variable:
        total = dense + (rest_bytes if scope == "model" else 0)
        best = 1.0 - (fixed + floor + (rest_bytes if scope == "model" else 0)) / total
        raise CompressionError(
            f"rate {rate:.4f} is out of reach for {method} on this model: the highest it can store is {best:.4f} "
            f"(biases{', scales' if scales else ''}, sparse row counts and rank-1 factors are the floor)"
        )
    out: dict[str, Any] = {"method": method, "requested_rate": rate, "scope": scope}
    if method == "dare":
        out["pruning_rate"] = _bisect(sparse_bytes, variable, 0.0, p_max, increasing=False)
        stored = fixed + sparse_bytes(out["pruning_rate"])
    elif method == "nullu":
        out["param_budget"] = _bisect(lowrank_bytes, variable, b_min, 1.0, increasing=True)
        stored = fixed + lowrank_bytes(out["param_budget"])
    else:
        lr_target = max(lowrank_share * variable, lowrank_bytes(b_min))
        out["param_budget"] = _bisect(lowrank_bytes, lr_target, b_min, 1.0, increasing=True)
        rest = variable - lowrank_bytes(out["param_budget"])
        out["pruning_rate"] = _bisect(sparse_bytes, rest, 0.0, p_max, increasing=False)
        out["lowrank_share"] = lowrank_share
        stored = fixed + lowrank_bytes(out["param_budget"]) + sparse_bytes(out["pruning_rate"])
    total_dense = dense + (rest_bytes if scope == "model" else 0)
    out["predicted_rate"] = 1.0 - (stored + (rest_bytes if scope == "model" else 0)) / total_dense
    return out


@torch.no_grad()
def split_error(
    weights: Sequence[torch.Tensor],
    plan: dict[str, Any],
    order: Sequence[str],
    grams: Sequence[torch.Tensor | None] | None = None,
    scorer: str = "magnitude",
    prune_scope: str = "layer",
    method: str = "svd",
    damping: float = 1e-2,
    rank_allocation: str = "layer",
) -> float:
    """Relative output error ``sum tr(R G R^T) / sum tr(W G W^T)`` a cascade plan leaves, ``R = W - S - B A``.

    One pass of each stage in ``order`` (sparse then low rank, or the reverse), scored the way the
    stages will run: wanda or magnitude masks, activation-aware or plain SVD, ranks per layer or
    allocated globally. ``G`` is each layer's calibration input second moment; without it the
    error is the plain Frobenius one.
    """
    W = [w.double() for w in weights]
    G = [g.double() for g in grams] if grams is not None and all(g is not None for g in grams) else None
    S = [torch.zeros_like(w) for w in W]
    LR = [torch.zeros_like(w) for w in W]
    roots = [whitening(g, damping) for g in G] if (G is not None and method == "activation_aware") else None
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(W):
        groups.setdefault(tuple(w.shape), []).append(i)
    for stage in order:
        if stage == "dare":
            for i, w in enumerate(W):
                t = w - LR[i]
                score = (wanda_scores(t, G[i].diagonal().clamp_min(0).sqrt()) if (scorer == "wanda" and G is not None)
                         else magnitude_scores(t))
                S[i] = t * topk_mask(score, plan["pruning_rate"], prune_scope)
        elif stage == "nullu":
            M = [(W[i] - S[i]) @ roots[i][0] if roots else W[i] - S[i] for i in range(len(W))]
            if rank_allocation == "global":
                energy: list[torch.Tensor] = [torch.empty(0)] * len(W)
                for idx in groups.values():
                    e = spectral_energy(torch.stack([M[i] for i in idx]))
                    for j, i in enumerate(idx):
                        energy[i] = e[j]
                shapes = [tuple(w.shape) for w in W]
                ranks = allocate_ranks(energy, shapes, plan["param_budget"] * sum(m * n for m, n in shapes))
            else:
                ranks = [budget_rank(*w.shape, plan["param_budget"]) for w in W]
            for idx in groups.values():
                U, sv, Vh = svd(torch.stack([M[i] for i in idx]))
                for j, i in enumerate(idx):
                    r = ranks[i]
                    lr = (U[j, :, :r] * sv[j, :r]) @ Vh[j, :r, :]
                    LR[i] = lr @ roots[i][1] if roots else lr
    num = den = 0.0
    for i, w in enumerate(W):
        R = w - S[i] - LR[i]
        if G is None:
            num += float(R.pow(2).sum())
            den += float(w.pow(2).sum())
        else:
            num += float(((R @ G[i]) * R).sum())
            den += float(((w @ G[i]) * w).sum())
    return num / den if den > 0 else 0.0
