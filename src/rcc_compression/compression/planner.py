"""Choose stage settings that reach a requested compression rate.

``compression_rate = 1 - stored_bytes / dense_bytes`` (of the compressed layers, or of the whole
model). The byte model is exactly what the saved format holds (see ``storage``): S as a bitmask
or CSR plus values, low-rank factors, scales and bias, so the plan lands on the rate the saved
checkpoint measures. For the cascade, the byte budget is split between the sparse and the
low-rank part; the split is chosen by the reconstruction error it leaves on the model's own
weights (whitened by calibration statistics when given).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CompressionError
from ..utils.memory import release_memory
from .dare import keep_count, magnitude_scores, topk_mask, topk_masks, wanda_scores
from .lowrank import allocate_ranks, budget_rank, factorisable, spectral_energy, svd, whitened_top, whitening
from .quant import damped_inverse, format_bytes, gptq_formats, quantize_nearest
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
    Gs = grams if grams is not None and all(g is not None for g in grams) else None
    shapes = [tuple(w.shape) for w in weights]
    # layers of one shape go through the batched SVD together, in chunks of bounded size: nothing
    # model-sized is held in float64 at once (a ViT-B/32 plan held six such copies)
    chunks: list[list[int]] = []
    for shape in dict.fromkeys(shapes):
        per = max(1, SPLIT_CHUNK_BYTES // (8 * shape[0] * shape[1]))
        idx = [i for i, s in enumerate(shapes) if s == shape]
        chunks += [idx[k:k + per] for k in range(0, len(idx), per)]

    def run(idx: list[int], ranks: list[int] | None) -> Any:
        """One pass of the stages over the layers ``idx``: ``(num, den)``, or the energies when ``ranks`` is None."""
        W = [weights[i].double() for i in idx]
        G = [Gs[i].double() for i in idx] if Gs is not None else None
        roots = [whitening(g, damping) for g in G] if (G is not None and method == "activation_aware") else None
        S = [torch.zeros_like(w) for w in W]
        LR = [torch.zeros_like(w) for w in W]
        for stage in order:
            if stage == "dare":
                for j, w in enumerate(W):
                    t = w - LR[j]
                    score = (wanda_scores(t, G[j].diagonal().clamp_min(0).sqrt())
                             if (scorer == "wanda" and G is not None) else magnitude_scores(t))
                    S[j] = t * topk_mask(score, plan["pruning_rate"], prune_scope)
            elif stage == "nullu":
                M = torch.stack([(W[j] - S[j]) @ roots[j][0] if roots else W[j] - S[j] for j in range(len(W))])
                if ranks is None:
                    return spectral_energy(M)
                U, sv, Vh = svd(M)
                for j, i in enumerate(idx):
                    r = ranks[i]
                    lr = (U[j, :, :r] * sv[j, :r]) @ Vh[j, :r, :]
                    LR[j] = lr @ roots[j][1] if roots else lr
                del M, U, sv, Vh
        num = den = 0.0
        for j, w in enumerate(W):
            R = w - S[j] - LR[j]
            if G is None:
                num += float(R.pow(2).sum())
                den += float(w.pow(2).sum())
            else:
                num += float(((R @ G[j]) * R).sum())
                den += float(((w @ G[j]) * w).sum())
        return num, den

    ranks: list[int] = [0] * len(weights)
    if "nullu" in order:
        if rank_allocation == "global":
            energy: list[torch.Tensor] = [torch.empty(0)] * len(weights)
            for idx in chunks:
                e = run(idx, None)
                for j, i in enumerate(idx):
                    energy[i] = e[j]
            ranks = allocate_ranks(energy, shapes, plan["param_budget"] * sum(m * n for m, n in shapes))
        else:
            ranks = [budget_rank(m, n, plan["param_budget"]) for m, n in shapes]
    num = den = 0.0
    for idx in chunks:
        n_, d_ = run(idx, ranks)
        num, den = num + n_, den + d_
    return num / den if den > 0 else 0.0


#: the most float64 bytes of weights ``split_error`` decomposes at once
SPLIT_CHUNK_BYTES = 1 << 27


# ------------------------------------------------------------------------------ one plan over bits, rank, sparsity
#: formats of S the planner weighs: (bits, group size or None for one scale per row, symmetric)
QUANT_FORMATS: tuple[tuple[int, int | None, bool], ...] = (
    (8, None, True), (4, None, True), (4, 128, False), (4, 64, False), (4, 32, False),
    (3, None, False), (3, 128, False), (3, 64, False), (3, 32, False), (2, None, False), (2, 64, False),
    (2, 32, False),
)
#: the sparse S formats
SPARSE_FORMATS = ((8, None, True), (4, 64, False))
SPARSITIES = (0.5, 0.75)
#: pruning rates of a float S (cheap to try; they also let the byte budget be filled closely)
FLOAT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
#: ranks tried, as shares of min(m, n); factors are stored with 8 or 4 bits
RANK_SHARES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
FACTOR_BITS = (8, 4)


@dataclass(frozen=True)
class Choice:
    """One way to store one layer: S (pruned at ``pruning_rate``, ``bits`` or float), factors of ``rank``.

    ``keep_s=False`` drops S (low rank only). ``nbytes`` is what the saved layer holds,
    ``error`` the relative output error ``tr(D H D^T) / tr(W H W^T)`` it leaves on calibration inputs.
    """

    pruning_rate: float = 0.0
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    rank: int = 0
    factor_bits: int | None = None
    keep_s: bool = True
    nbytes: int = 0
    error: float = 0.0

    def label(self) -> str:
        """A short description, e.g. ``int3/g64 + r4 int8`` or ``50% int8 + r8 int8``."""
        parts = []
        if self.keep_s:
            s = "float" if self.bits is None else f"int{self.bits}" + (f"/g{self.group_size}" if self.group_size
                                                                        else "")
            parts.append(f"{self.pruning_rate:.0%} {s}" if self.pruning_rate else s)
        if self.rank:
            parts.append(f"r{self.rank} " + ("float" if self.factor_bits is None else f"int{self.factor_bits}"))
        return " + ".join(parts)


def choice_bytes(shape: LayerShape, c: Choice, prune_scope: str = "layer") -> int:
    """Stored bytes of one layer under choice ``c`` (the saved format's own count)."""
    m, n, es = shape.out_features, shape.in_features, shape.element_size
    total = m * es if shape.has_bias else 0
    if c.keep_s:
        nnz = m * n
        if c.pruning_rate > 0:
            nnz = m * keep_count(n, c.pruning_rate) if prune_scope == "row" else keep_count(m * n, c.pruning_rate)
            enc = sparse_encoding_bytes(m, n, nnz, 0)
            total += min(enc["bitmask"], enc["csr"])
        total += nnz * es if c.bits is None else format_bytes(m, n, nnz, c.bits, c.group_size, c.symmetric)
    if c.rank:
        for rows, cols in ((c.rank, n), (m, c.rank)):
            total += rows * cols * es if c.factor_bits is None else format_bytes(
                rows, cols, rows * cols, c.factor_bits, c.group_size, c.symmetric)
    return total


class _LayerScorer:
    """Scores candidate storages of one layer: each one's bytes and its calibration output error.

    The error is ``tr(D G D^T) / tr(W G W^T)``, or with ``row_weight`` ``sum_c row_weight[c] (D G D^T)_cc``
    (see :func:`layer_choices`); ``choices`` collects the scored candidates in the order they are found.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor | None, shape: LayerShape, *, lowrank: bool,
                 prune_scope: str, damping: float, rounding: str, row_weight: torch.Tensor | None,
                 act_order: bool, clip_search: bool) -> None:
        self.W = W = weight.detach().float()
        self.m, self.n = W.shape
        self.gram, self.shape, self.prune_scope, self.damping = gram, shape, prune_scope, damping
        self.act_order, self.clip_search = act_order, clip_search
        self.H = gram.float() if gram is not None else torch.eye(self.n, device=W.device)
        self.rw = None if row_weight is None else row_weight.to(W.device, torch.float64)[:, None]
        self.ref = 1.0 if self.rw is not None else max(self.wsum((W @ self.H) * W), 1e-300)
        self.gptq_on = rounding == "gptq" and gram is not None
        # one Cholesky factor for every rounding of the layer; ``shift``: what its damping adds to diag(H)
        self.inverse, self.shift = damped_inverse(self.H, damping) if self.gptq_on else (None, None)
        self.root = self.root32 = None
        if lowrank:
            self.root = whitening(self.H.double(), damping)
            self.root32 = (self.root[0].float(), self.root[1].float())
        self.choices: list[Choice] = []

    def wsum(self, t: torch.Tensor) -> float:
        """Sum over output rows, weighted by their output sensitivity when known."""
        t = t.double()
        return float(t.sum() if self.rw is None else (t * self.rw).sum())

    def error(self, approx: torch.Tensor) -> float:
        D = self.W - approx
        return max(0.0, self.wsum((D @ self.H) * D) / self.ref)

    def rounded(self, s: torch.Tensor, fmts: Sequence[tuple[int, int | None, bool]], mask: torch.Tensor | None,
                losses: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``s`` rounded to each format as the ``quant`` stage rounds it (GPTQ against the gram, or nearest);
        ``losses``: GPTQ's per-row losses are appended to it (``row_losses`` of :func:`gptq_formats`)."""
        if self.gptq_on:
            parts = gptq_formats(s, self.H, fmts, mask, self.damping, act_order=self.act_order,
                                 clip_search=self.clip_search, inverse=self.inverse, row_losses=losses)
        else:
            parts = [quantize_nearest(s, b, g, sym, mask, self.clip_search) for b, g, sym in fmts]
        return [q.dequantize(torch.float32, mask).to(self.W.device) for q in parts]

    def loss_error(self, approx: torch.Tensor, loss: torch.Tensor) -> float:
        """:meth:`error` of a GPTQ rounding of ``W`` from its per-row losses (exact: the losses are the error
        under the damped gram, less the damping's share), an ``m n`` sum instead of an ``m n^2`` product."""
        D = (self.W - approx).double()
        rows = (loss - (D * D * self.shift).sum(1)).clamp_min(0)
        return max(0.0, self.wsum(rows[:, None]) / self.ref)

    def add(self, c: Choice, approx: torch.Tensor | None, err: float | None = None) -> Choice:
        e = err if err is not None else (0.0 if approx is None else self.error(approx))
        scored = Choice(**{**c.__dict__, "nbytes": choice_bytes(self.shape, c, self.prune_scope), "error": e})
        self.choices.append(scored)
        return scored

    def with_factors(self, base: Choice, s_hat: torch.Tensor | None, rank_list: list[int],
                     factor_bits: Sequence[int] = FACTOR_BITS, e0: float | None = None) -> None:
        """Factors of each rank fitted to what ``s_hat`` leaves; errors from r x r and m x r products only.

        ``e0``: the (unnormalised) error ``s_hat`` leaves, when known. The whitened residual ``R L`` is
        not formed for a few directions of a large matrix (a randomized SVD through products with ``R``
        and ``L``); the factors' rows do not depend on the rank, so ``H A^T`` and ``R H A^T`` are formed once
        for the largest rank and sliced.
        """
        if not rank_list:
            return
        W, H, m, n = self.W, self.H, self.m, self.n
        R = W - s_hat if s_hat is not None else W
        if e0 is None:
            e0 = self.wsum((R @ H) * R)
        q = max(rank_list)
        # float32: the decomposition only ranks directions; errors are float64 sums
        if q + 8 < min(m, n) // 2:  # a few directions of a large matrix: randomized SVD is plenty
            U, sv, Vh = whitened_top(R, self.root32[0], q + 8)
        else:
            U, sv, Vh = torch.linalg.svd(R @ self.root32[0], full_matrices=False)
        A = (Vh[:q] @ self.root32[1]).float()
        for fb in factor_bits:
            # rows are rounded alone (a scale per row or per group of its columns): the rank-r factor is the top r rows
            A_q = quantize_nearest(A, fb, base.group_size, base.symmetric).dequantize(torch.float32)
            HA_all = H @ A_q.t()
            HB_all = (A_q @ HA_all).double()
            rhs_all = (R @ HA_all).double()  # R H A^T
            for r in rank_list:
                HB, rhs = HB_all[:r, :r], rhs_all[:, :r]
                if self.gram is not None:  # B re-solved on the rounded A: least squares with a small ridge
                    lam = self.damping * float(HB.diagonal().mean().clamp_min(1e-300))
                    B_c = torch.linalg.solve(HB + lam * torch.eye(r, dtype=HB.dtype, device=HB.device),
                                             rhs.t()).t().float()
                else:
                    B_c = (U[:, :r] * sv[:r]).float()
                B_q = quantize_nearest(B_c, fb, base.group_size, base.symmetric).dequantize(torch.float64)
                num = e0 - 2 * self.wsum(B_q * rhs) + self.wsum((B_q @ HB) * B_q)
                self.add(Choice(**{**base.__dict__, "rank": r, "factor_bits": fb}), None, max(0.0, num) / self.ref)

    def quantized(self, lowrank: bool) -> None:
        """S rounded to every format; with ``lowrank``, low-rank corrections of the rounding error."""
        fmts = [f for f in QUANT_FORMATS if f[1] is None or f[1] < self.n]
        losses: list[torch.Tensor] | None = [] if self.gptq_on else None
        cached = dict(zip(fmts, self.rounded(self.W, fmts, None, losses), strict=True))
        plain = {fmt: self.add(Choice(bits=fmt[0], group_size=fmt[1], symmetric=fmt[2]), s_hat,
                               None if losses is None else self.loss_error(s_hat, losses[k]))
                 for k, (fmt, s_hat) in enumerate(cached.items())}
        if not lowrank:
            return
        # a low-rank correction of the rounding error (LQER / L2QER, SVDQuant: factors fitted to the whitened
        # residual the quantizer leaves), in steps of doubling rank: small ranks also let the byte budget be
        # filled closely. A format with more bytes and more error than another gets none.
        full = min(self.m, self.n)
        small = [2**k for k in range(max(1, full // 8).bit_length()) if 2**k <= max(1, full // 8)]
        for fmt, s_hat in cached.items():
            c0 = plain[fmt]
            if any(o.nbytes <= c0.nbytes and o.error < c0.error for o in plain.values()):
                continue
            self.with_factors(Choice(bits=fmt[0], group_size=fmt[1], symmetric=fmt[2]), s_hat, small, (8,),
                              e0=c0.error * self.ref)

    def sparse(self, quant: bool, lowrank: bool, scorer: str, ranks: list[int]) -> None:
        """S pruned at every rate (float), and at the sparse rates rounded; factors on the sparsest int S."""
        W, m = self.W, self.m
        score = (wanda_scores(W, self.H.diagonal().clamp_min(0).sqrt()) if (scorer == "wanda" and self.gram is not None)
                 else magnitude_scores(W))
        masks = topk_masks(score, sorted(set(FLOAT_SPARSITIES) | set(SPARSITIES)), self.prune_scope)
        for p, mask in masks.items():
            self.add(Choice(pruning_rate=p), W * mask)
        fmts = [f for f in SPARSE_FORMATS if f[1] is None or f[1] < self.n] if quant else []
        if not fmts:
            return
        # every sparse S of the layer rounded in one pass: GPTQ rounds rows independently
        stack = torch.cat([masks[p] for p in SPARSITIES])
        parts = self.rounded(W.repeat(len(SPARSITIES), 1) * stack, fmts, stack)
        full = min(self.m, self.n)
        for fmt, part in zip(fmts, parts, strict=True):
            for j, p in enumerate(SPARSITIES):
                s_hat = part[j * m:(j + 1) * m]
                base = Choice(pruning_rate=p, bits=fmt[0], group_size=fmt[1], symmetric=fmt[2])
                self.add(base, s_hat)
                if lowrank and p == SPARSITIES[-1] and fmt == SPARSE_FORMATS[-1]:
                    self.with_factors(base, s_hat, [r for r in ranks if r <= full // 8])

    def low_rank_only(self, quant: bool, ranks: list[int]) -> None:
        """No S: factors alone, rounded (with ``quant``) or float, at the ranks that store less than dense."""
        m, n = self.m, self.n
        lr_ranks = [r for r in ranks if factorisable(r, m, n) and r < min(m, n)]  # float factors below dense
        if quant:
            self.with_factors(Choice(keep_s=False), None, lr_ranks)
            return
        U, sv, Vh = torch.linalg.svd(self.W.double() @ self.root[0], full_matrices=False)
        for r in lr_ranks:
            self.add(Choice(keep_s=False, rank=r), ((U[:, :r] * sv[:r]) @ Vh[:r] @ self.root[1]).float())


@torch.no_grad()
def layer_choices(
    weight: torch.Tensor, gram: torch.Tensor | None, shape: LayerShape, *, sparse: bool, lowrank: bool,
    quant: bool = True, scorer: str = "magnitude", prune_scope: str = "layer", damping: float = 1e-2,
    rounding: str = "gptq", row_weight: torch.Tensor | None = None, act_order: bool = False,
    clip_search: bool = False,
) -> list[Choice]:
    """Every candidate storage of one layer, each with its bytes and its calibration output error.

    The error is ``tr(D G D^T) / tr(W G W^T)`` (the layer's own relative output error), or with
    ``row_weight`` (:func:`~rcc_compression.compression.calibration.output_sensitivity`)
    ``sum_c row_weight[c] (D G D^T)_cc``: the share of the model's output energy the error moves,
    so errors of different layers are weighed by their effect on the model's output.

    S is rounded the way the ``quant`` stage will round it (GPTQ against ``gram``, so its error
    correction is in the estimate); a low-rank part is fitted by activation-aware SVD to the
    residual the rounded (and pruned) S leaves, as ``nullu`` after ``quant`` does, so it absorbs
    that rounding error; its factors are rounded to nearest with ``B`` re-solved on the rounded
    ``A`` (the stage's GPTQ rounding of them only lowers the error further).
    """
    scorer_ = _LayerScorer(weight, gram, shape, lowrank=lowrank, prune_scope=prune_scope, damping=damping,
                           rounding=rounding, row_weight=row_weight, act_order=act_order, clip_search=clip_search)
    full = min(scorer_.m, scorer_.n)
    ranks = sorted({max(1, round(full * s)) for s in RANK_SHARES})
    scorer_.add(Choice(), None)  # left as it is
    if quant:
        scorer_.quantized(lowrank)
    if sparse:
        scorer_.sparse(quant, lowrank, scorer, ranks)
    if lowrank:
        scorer_.low_rank_only(quant, ranks)
    return scorer_.choices


@torch.no_grad()
def choice_weight(
    weight: torch.Tensor, gram: torch.Tensor | None, c: Choice, *, scorer: str = "magnitude",
    prune_scope: str = "layer", damping: float = 1e-2, rounding: str = "gptq", act_order: bool = False,
    clip_search: bool = False,
) -> torch.Tensor:
    """The weight a layer computes with under choice ``c``, built as :func:`layer_choices` scores it.

    S pruned (magnitude or wanda) and rounded (GPTQ against ``gram``, or to nearest), then factors of
    ``c.rank`` fitted by activation-aware SVD to what S leaves, rounded to nearest with ``B``
    re-solved on the rounded ``A``. The sequential planner installs it while it measures the
    inputs of the layers after this one.
    """
    W = weight.detach().float()
    m, n = W.shape
    H = gram.float() if gram is not None else torch.eye(n, device=W.device)
    approx = torch.zeros_like(W)
    if c.keep_s:
        mask = None
        if c.pruning_rate:
            score = (wanda_scores(W, H.diagonal().clamp_min(0).sqrt()) if (scorer == "wanda" and gram is not None)
                     else magnitude_scores(W))
            mask = topk_mask(score, c.pruning_rate, prune_scope)
        S = W * mask if mask is not None else W
        if c.bits is not None:
            fmt = (c.bits, c.group_size, c.symmetric)
            q = (gptq_formats(S, H, [fmt], mask, damping, act_order=act_order, clip_search=clip_search)[0]
                 if (rounding == "gptq" and gram is not None) else quantize_nearest(S, *fmt, mask, clip_search))
            S = q.dequantize(torch.float32, mask).to(W.device)
        approx = S
    if c.rank:
        R = W - approx
        root = whitening(H.double(), damping)
        M = R.double() @ root[0]
        r = min(c.rank, m, n)
        if r + 8 < min(m, n) // 2:
            U, sv, V = torch.svd_lowrank(M, q=r + 8, niter=2)
            Vh = V.t()
        else:
            U, sv, Vh = torch.linalg.svd(M, full_matrices=False)
        B = (U[:, :r] * sv[:r]).float()
        A = (Vh[:r] @ root[1]).float()
        if c.factor_bits is not None:
            A = quantize_nearest(A, c.factor_bits, c.group_size, c.symmetric).dequantize(torch.float32)
            if gram is not None:
                HB = (A @ H @ A.t()).double()
                lam = damping * float(HB.diagonal().mean().clamp_min(1e-300))
                rhs = (R @ H @ A.t()).double()
                B = torch.linalg.solve(HB + lam * torch.eye(r, dtype=HB.dtype, device=HB.device), rhs.t()).t().float()
            B = quantize_nearest(B, c.factor_bits, c.group_size, c.symmetric).dequantize(torch.float32)
        approx = approx + B @ A
    return approx


def probe_estimate(weight: torch.Tensor, gram: torch.Tensor, row_weight: torch.Tensor, bits: int) -> dict[str, float]:
    """The towers' probe (``bits`` round to nearest, one scale per row) of one layer, to first order: its own
    relative output error ``tr(D G D^T) / tr(W G W^T)`` and its estimated effect on the model's outputs
    ``sum_c f[c] (D G D^T)_cc`` (``f``: the layer's output sensitivity), and their ratio, ``weight``."""
    W = weight.detach().float()
    G = gram.float().to(W.device)
    D = W - quantize_nearest(W, bits, None, False).dequantize(torch.float32).to(W.device)
    own = float(((D @ G) * D).double().sum()) / max(float(((W @ G) * W).double().sum()), 1e-300)
    moved = float((((D @ G) * D).double().sum(1) * row_weight.to(W.device, torch.float64)).sum())
    return {"layer_error": own, "output_error": moved, "weight": moved / own if own > 1e-12 else 0.0}


def allocate(options: Sequence[Sequence[Choice]], budget: float) -> list[int]:
    """Pick one choice per layer minimising the summed error with total bytes within ``budget``.

    A multiple-choice knapsack, solved as the global rank budget is: by a Lagrange multiplier
    (each layer takes ``argmin error + lambda * bytes``; lambda bisected to the smallest total within
    budget), then the bytes left are spent greedily on the upgrades that remove the most error per
    byte. Raises :class:`CompressionError` when even the smallest choices do not fit.
    """
    if not options:
        return []
    smallest = sum(min(c.nbytes for c in opts) for opts in options)
    if smallest > budget:
        raise CompressionError(f"the smallest storage the planner knows takes {smallest} bytes, over the budget "
                               f"of {int(budget)}")
    scale = max(sum(max(c.nbytes for c in opts) for opts in options), 1)

    def pick(lam: float) -> list[int]:
        return [min(range(len(opts)), key=lambda k, o=opts: (o[k].error + lam * o[k].nbytes / scale,
                                                              o[k].nbytes)) for opts in options]

    def total(sel: list[int]) -> int:
        return sum(options[i][k].nbytes for i, k in enumerate(sel))

    lo, hi = -12.0, 12.0  # log10 lambda
    if total(pick(10.0**lo)) <= budget:
        sel = pick(10.0**lo)
    else:
        for _ in range(80):
            mid = (lo + hi) / 2
            if total(pick(10.0**mid)) <= budget:
                hi = mid
            else:
                lo = mid
        sel = pick(10.0**hi)
        if total(sel) > budget:  # lambda this large keeps every layer at its cheapest
            sel = [min(range(len(o)), key=lambda k, o=o: (o[k].nbytes, o[k].error)) for o in options]
    left = budget - total(sel)
    while True:
        best = None
        for i, opts in enumerate(options):
            cur = opts[sel[i]]
            for k, c in enumerate(opts):
                extra = c.nbytes - cur.nbytes
                gain = cur.error - c.error
                if gain <= 0 or extra > left:
                    continue
                value = gain / max(extra, 1)
                if best is None or value > best[0]:
                    best = (value, i, k, extra)
        if best is None:
            break
        _, i, k, extra = best
        sel[i] = k
        left -= extra
    return sel


def plan_layers(
    names: Sequence[str], weights: Sequence[torch.Tensor], grams: Iterable[torch.Tensor | None],
    shapes: Sequence[LayerShape], rate: float, *, dims: Sequence[Collection[str]],
    reserved: Sequence[int] | None = None, rest_bytes: int = 0, scope: str = "layers", scorer: str = "magnitude",
    prune_scope: str = "layer", damping: float = 1e-2, rounding: str = "gptq", act_order: bool = False,
    clip_search: bool = False, progress: Any = None, sensitivity: Sequence[torch.Tensor | None] | None = None,
    on_layer: Callable[[int, list[list[Choice]], float], None] | None = None,
    min_bits: Mapping[str, int] | None = None, probe_bits: int | None = None,
    lift: Callable[[dict[str, dict[str, float]]], Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """One storage choice per layer (bits x rank x sparsity) minimising the summed calibration output
    error within the bytes ``rate`` leaves (:func:`layer_choices`, then :func:`allocate`).

    ``dims`` are each layer's plan dimensions (``bits``, ``sparsity``, ``rank``: those of the stages
    that target it; none: the layer stays as it is); ``reserved`` the bytes each layer will gain
    after the plan (channel scales), kept out of the budget; ``sensitivity`` each layer's output
    sensitivity per output channel (errors are then weighed by their effect on the model's output,
    see :func:`layer_choices`); ``on_layer(i, options so far, budget)`` is called after each layer's
    candidates are scored, before the next layer's second moment is read (the sequential planner
    installs provisional choices there). ``min_bits`` keeps the named layers at that precision or
    more (:func:`keeps_precision`; the towers' protections, most important first): where the rate is
    out of reach with all of them, the last ones are released until it is not (``released``
    in the plan); the plan over the same candidates without them is an alternative (``without
    protections``) the cascade measures end to end. With ``probe_bits`` and the sensitivity, each
    layer's probe rounding is estimated as it is scored (:func:`probe_estimate`) and
    ``lift(estimates)`` returns the protections that stay (``min_bits``, most important first); the
    others are planned over all their candidates. Returns the plan: per layer its choice,
    bytes and estimated error, the predicted rate and the mean estimated error. Raises
    :class:`CompressionError` when the rate is out of reach.
    """
    reserved = list(reserved) if reserved is not None else [0] * len(shapes)
    budget = _budget(shapes, rate, reserved, rest_bytes, scope)
    sens = list(sensitivity) if sensitivity is not None else [None] * len(shapes)
    weighted = all(x is not None for x in sens)
    build = {"scorer": scorer, "prune_scope": prune_scope, "damping": damping, "rounding": rounding,
             "act_order": act_order, "clip_search": clip_search}
    options: list[list[Choice]] = []
    full: dict[int, list[Choice]] = {}  # protected layers' unfiltered candidates
    probes: dict[str, dict[str, float]] = {}
    for i, (w, g, shape, d) in enumerate(zip(weights, grams, shapes, dims, strict=True)):
        opts, unfiltered = score_layer(w, g, shape, d, min_bits=(min_bits or {}).get(names[i]),
                                       row_weight=sens[i] if weighted else None, **build)
        options.append(opts)
        if unfiltered is not None:
            full[i] = unfiltered
        if probe_bits is not None and weighted and g is not None:
            probes[names[i]] = probe_estimate(w, g, sens[i], probe_bits)
        release_memory()  # the candidates' temporaries: hand their pages back before the next layer
        if on_layer is not None:
            on_layer(i, options, budget.layers)
        if progress is not None:
            progress("plan", i + 1, len(shapes))
    if lift is not None and probes:
        min_bits = lift(probes)
        for i in [i for i in full if names[i] not in min_bits]:
            options[i] = full.pop(i)  # lifted: planned like any other layer
    return finish_plan(names, options, full, shapes, rate, dims=dims, reserved=reserved, rest_bytes=rest_bytes,
                       scope=scope, rounding=rounding, weighted=weighted, min_bits=min_bits)


def score_layer(weight: torch.Tensor, gram: torch.Tensor | None, shape: LayerShape, dims: Collection[str], *,
                min_bits: int | None = None, row_weight: torch.Tensor | None = None, scorer: str = "magnitude",
                prune_scope: str = "layer", damping: float = 1e-2, rounding: str = "gptq", act_order: bool = False,
                clip_search: bool = False) -> tuple[list[Choice], list[Choice] | None]:
    """``(candidates the plan may pick, all candidates when ``min_bits`` filtered them, else None)`` of one layer
    over its plan dimensions (:func:`layer_choices`); ``min_bits``: the layer keeps that precision
    (:func:`keeps_precision`) unless the rate needs its bytes (:func:`finish_plan` releases it)."""
    options = layer_choices(weight, gram, shape, sparse="sparsity" in dims, lowrank="rank" in dims,
                            quant="bits" in dims, scorer=scorer, prune_scope=prune_scope, damping=damping,
                            rounding=rounding, row_weight=row_weight, act_order=act_order, clip_search=clip_search)
    if min_bits is None:
        return options, None
    return [c for c in options if keeps_precision(c, min_bits)] or options, options


def plan_budget(shapes: Sequence[LayerShape], rate: float, reserved: Sequence[int], rest_bytes: int = 0,
                scope: str = "layers") -> tuple[float, int, int]:
    """``(bytes the planned layers may store, bytes reserved after the plan, dense bytes rates count against)``."""
    budget = _budget(shapes, rate, reserved, rest_bytes, scope)
    return budget.layers, budget.fixed, budget.total_dense


def _budget(shapes: Sequence[LayerShape], rate: float, reserved: Sequence[int], rest_bytes: int, scope: str
            ) -> _Budget:
    if not 0.0 <= rate < 1.0:
        raise CompressionError(f"compression_rate must be in [0, 1), got {rate}")
    rest = rest_bytes if scope == "model" else 0
    return _Budget(sum(s.dense_bytes for s in shapes) + rest, rest, sum(reserved), rate)


def finish_plan(names: Sequence[str], options: list[list[Choice]], full: dict[int, list[Choice]],
                shapes: Sequence[LayerShape], rate: float, *, dims: Sequence[Collection[str]],
                reserved: Sequence[int], rest_bytes: int = 0, scope: str = "layers", rounding: str = "gptq",
                weighted: bool = False, min_bits: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The plan from every layer's scored candidates (``options``; ``full``: protected layers' unfiltered ones):
    protections released from the least important while the rate is out of reach with them, one allocation
    (:func:`allocate`), and the single-stage plans at the same bytes (and the plan without protections) listed
    as alternatives. Used by :func:`plan_layers` and by the sequential pipeline's survey (candidates scored a
    block at a time)."""
    budget = _budget(shapes, rate, reserved, rest_bytes, scope)
    options = list(options)
    used = [k for k in ("bits", "sparsity", "rank") if any(k in d for d in dims)]
    released = _release_protections(names, options, full, min_bits or {}, budget.layers)
    budget.check(options, used)
    out = {"method": "layers", "requested_rate": rate, "scope": scope,
           **budget.plan(names, shapes, options, weighted), "dimensions": used,
           "error_model": "output-weighted" if weighted else "per layer",
           "rounding": rounding, "candidates": sum(len(o) for o in options), "released": released}
    out["alternatives"] = _alternatives(names, shapes, options, full, used, budget, weighted, out["layers"])
    return out


@dataclass(frozen=True)
class _Budget:
    """The bytes a plan may spend on its layers: ``(1 - rate)`` of the dense total, less the rest of the model
    (``scope: model``) and the bytes the layers gain after the plan (``fixed``)."""

    total_dense: int
    rest: int
    fixed: int
    rate: float

    @property
    def layers(self) -> float:
        return (1.0 - self.rate) * self.total_dense - self.rest - self.fixed

    def check(self, options: Sequence[Sequence[Choice]], used: list[str]) -> None:
        """Raise :class:`CompressionError` when even the smallest choices do not fit."""
        floor = sum(min(c.nbytes for c in opts) for opts in options)
        if floor > self.layers:
            best = 1.0 - (floor + self.fixed + self.rest) / self.total_dense
            raise CompressionError(
                f"rate {self.rate:.4f} is out of reach: the smallest storage over {', '.join(used) or 'nothing'} "
                f"the planner knows reaches {best:.4f} (biases{', scales' if self.fixed else ''}, scales of the "
                "codes, the smallest formats and layers no stage may shrink are the floor)")

    def plan(self, names: Sequence[str], shapes: Sequence[LayerShape], options: Sequence[Sequence[Choice]],
             weighted: bool) -> dict[str, Any]:
        """The allocation over ``options``: per layer its choice, bytes and error; the predicted rate and error."""
        sel = allocate(options, self.layers)
        chosen = [o[k] for o, k in zip(options, sel, strict=True)]
        stored = sum(c.nbytes for c in chosen) + self.fixed
        return {
            "predicted_rate": 1.0 - (stored + self.rest) / self.total_dense,
            # weighted: the estimated share of output energy moved (a sum); else the mean relative layer error
            "predicted_error": sum(c.error for c in chosen) / (1 if weighted else max(len(chosen), 1)),
            "layers": {name: {"choice": c.label(), "pruning_rate": c.pruning_rate, "bits": c.bits,
                              "group_size": c.group_size, "symmetric": c.symmetric, "rank": c.rank,
                              "factor_bits": c.factor_bits, "keep_s": c.keep_s, "bytes": c.nbytes,
                              "dense_bytes": s.dense_bytes, "error": c.error}
                       for name, c, s in zip(names, chosen, shapes, strict=True)},
        }


def _release_protections(names: Sequence[str], options: list[list[Choice]], full: dict[int, list[Choice]],
                         min_bits: Mapping[str, int], budget: float) -> list[str]:
    """Give protected layers back their unfiltered candidates, least important first, until the smallest
    choices fit ``budget``; returns the names released."""
    released: list[str] = []
    order = [names.index(n) for n in min_bits if n in names and names.index(n) in full]
    while order and sum(min(c.nbytes for c in opts) for opts in options) > budget:
        i = order.pop()  # the least important protection goes first
        options[i] = full[i]
        released.append(names[i])
    return released


def _alternatives(names: Sequence[str], shapes: Sequence[LayerShape], options: Sequence[Sequence[Choice]],
                  full: dict[int, list[Choice]], used: list[str], budget: _Budget, weighted: bool,
                  chosen: dict[str, Any]) -> dict[str, Any]:
    """Every single-stage plan at the same bytes, from the same candidates (the end-to-end choice measures them),
    and the plan without the towers' protections (they are a prior)."""
    alternatives: dict[str, Any] = {}
    kinds = [d for d in used if len(used) > 1]
    if {"bits", "rank", "sparsity"} <= set(used):
        kinds.append("bits+rank")  # quantization with low-rank corrections of its error (LQER), no pruning
    for dim in kinds:
        only = [[c for c in opts if SINGLE[dim](c)] for opts in options]
        if any(not o for o in only) or sum(min(c.nbytes for c in o) for o in only) > budget.layers:
            alternatives[dim] = {"error": f"out of reach with {dim} alone"}
            continue
        alt = budget.plan(names, shapes, only, weighted)
        if alt["layers"] != chosen:
            alternatives[dim] = alt
    if full:
        alt = budget.plan(names, shapes, [full.get(i, o) for i, o in enumerate(options)], weighted)
        if alt["layers"] != chosen:
            alternatives[UNPROTECTED] = alt
    return alternatives


#: the alternative plan without the towers' protections
UNPROTECTED = "without protections"


def keeps_precision(c: Choice, bits: int) -> bool:
    """Whether a choice stores the layer at ``bits`` or more: its own values unpruned, codes and factors that wide."""
    return (c.keep_s and not c.pruning_rate and (c.bits is None or c.bits >= bits)
            and (not c.rank or c.factor_bits is None or c.factor_bits >= bits))


#: which candidates each single-stage plan may use (a layer may also stay as it is)
SINGLE: dict[str, Any] = {
    "bits": lambda c: c.keep_s and not c.rank and not c.pruning_rate,
    "rank": lambda c: not c.keep_s or (c.bits is None and not c.rank and not c.pruning_rate),
    "sparsity": lambda c: c.keep_s and c.bits is None and not c.rank,
    "bits+rank": lambda c: c.keep_s and not c.pruning_rate,
}
