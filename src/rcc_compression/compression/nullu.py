"""Stage ``nullu``: low rank (the layer's input projected onto a subspace) and HalluSpace projection.

Default (docs/glossary.md; Eckart & Young, 1936, for the truncated SVD): replace the layer's weight, or the
residual left by ``dare``, by
``B A`` of rank r chosen by ``rank_reduction``, ``energy_threshold`` or a parameter budget;
``decomposition_method`` is ``svd`` (exact), ``randomized`` (``torch.svd_lowrank``),
``activation_aware`` (SVD-LLM, Wang et al. 2024: SVD of ``W L`` with ``L L^T = X^T X`` so each
dropped singular value equals the output error it causes) or ``asvd`` (Yuan et al. 2023: input
channels scaled by ``mean|x|^alpha``). A layer is only factorised where ``r (m + n) < m n``.
Later rounds of the cascade refine the previous subspace (``warm_start``) instead of starting
over: a block power iteration from the previous factors. In the final round it iterates until an
iteration gains less than ``WARM_TOL`` of the energy still left out; a layer that does not get
there within ``WARM_MAX_ITERATIONS`` (a small spectral gap) is decomposed exactly instead, and the
statistics say which (``warm_converged``, ``exact_svd``).

Mode ``hallu_space`` is the published Nullu (Yang et al., CVPR 2025, "HalluSpace Projection";
``utils/halluedit.py``): from paired truthful / hallucinated captions, per-layer mean hidden
states give ``D = (E_true - E_bad) / 2``; the top-k right singular vectors V of D span the
HalluSpace and the MLP output projection is edited to ``W <- (I - V V^T) W``, once: in a cascade of
several rounds the edit is made in the first and later rounds leave it as it is. Departure: hidden
states are mean-pooled over tokens (the reference uses the last token), and the bias is
projected too. It edits and does not shrink; on an already compressed layer the edit is folded
into the low-rank part as ``k`` extra columns so S keeps its structure.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import CompressionError
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from .layers import CompressedLinear
from .lowrank import balanced_factors, whitening
from .refit import sequential_refit
from .stage import CompressionContext, Stage, StageConfig, schedule_fraction
from .storage import dense_bytes, stored_bytes

log = get_logger("nullu")


class NulluConfig(StageConfig):
    """Keys of the ``nullu`` stage (defaults: docs/glossary.md)."""

    mode: Literal["lowrank", "hallu_space"] = Field(
        "lowrank",
        description="lowrank: factorise W ~ B A; hallu_space: the published Nullu edit (needs pairs_file)")
    rank_reduction: float | None = Field(0.5, ge=0.0, lt=1.0, description="share of the full rank removed")
    energy_threshold: float | None = Field(0.95, gt=0.0, le=1.0, description="share of spectral energy kept")
    param_budget: float | None = Field(None, gt=0.0, le=1.0, description="factor parameters / dense parameters")
    budget_allocation: Literal["global", "layer"] = Field(
        "global", description="param_budget over all target layers (ranks where they remove most error) or per layer")
    rank_rule: Literal["min", "max"] = Field(
        "min",
        description="when several rank rules are set, the smaller (min) or the larger (max) rank wins")
    decomposition_method: Literal["svd", "randomized", "activation_aware", "asvd"] = Field(
        "svd",
        description="svd, randomized (torch.svd_lowrank), activation_aware (SVD-LLM whitening) or asvd")
    oversample: int = Field(8, ge=0, description="randomized: extra columns of the random subspace")
    power_iterations: int = Field(2, ge=0, description="randomized: power iterations on the subspace")
    damping: float = Field(1e-2, ge=0.0, description="activation_aware: ridge as a share of mean input energy "
                                                         "(raised to 1e-6 where the input moment is singular)")
    asvd_alpha: float = Field(0.5, ge=0.0, description="asvd: input channels scaled by mean |x| to this power")
    warm_start: bool = Field(
        True,
        description="later rounds refine the previous subspace instead of decomposing afresh")
    refit: Literal["none", "sequential"] = Field(
        "none", description="sequential: refit the factors in execution order on the compressed model's own inputs")
    layer_ranks: dict[str, int] | None = Field(
        None, description="rank per layer by module name (a plan): those layers take it whatever the other "
                          "criteria say, layers not named (or named with 0) are left alone")
    pairs_file: str | None = Field(
        None,
        description="hallu_space: json file of paired truthful and hallucinated captions")
    top_k: int = Field(4, ge=1, description="hallu_space: singular directions projected out of each edited layer")
    layers: list[int] | None = Field(
        None,
        description="hallu_space: indices of the edited layers (None: the second half)")


# ------------------------------------------------------------------------------ pure functions
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


#: the most float64 bytes of layer matrices the low-rank step decomposes at once
CHUNK_BYTES = 1 << 25
#: the most bytes of input second moments (float32, n x n per layer) the final round's report holds at once
REPORT_BYTES = 1 << 27

#: final round of warm-started factors: subspace iterations until one gains less than WARM_TOL of the
#: energy still left out; a layer not there after WARM_MAX_ITERATIONS gets the exact SVD instead
WARM_TOL = 1e-5
WARM_MAX_ITERATIONS = 8


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


# ------------------------------------------------------------------------------ stage
class NulluStage(Stage):
    """Low-rank factorisation of each target layer (or its residual), or the HalluSpace edit."""

    name = "nullu"
    config_class = NulluConfig
    config: NulluConfig

    planned = ("rank",)

    def plan_dimensions(self) -> tuple[str, ...]:
        return self.planned if self.config.mode == "lowrank" else ()

    def unplannable_reason(self) -> str:
        return "the hallu_space edit (nullu.mode: hallu_space) stores no fewer bytes; use mode: lowrank"

    def apply_plan(self, layers: Mapping[str, Mapping[str, Any]], calibrated: bool) -> bool:
        ranks = {n: int(v["rank"]) for n, v in layers.items() if v.get("rank", 0) > 0}
        if ranks:
            self.config.layer_ranks, self.config.mode = ranks, "lowrank"
            if calibrated:
                self.config.decomposition_method = "activation_aware"
        return bool(ranks)

    def targets_at(self, progress: float, schedule: str) -> dict[str, float | None]:
        """rank_reduction, energy_threshold and param_budget reached at ``progress``."""
        c, f = self.config, schedule_fraction(progress, schedule)
        if f >= 1.0:
            return {"rank_reduction": c.rank_reduction, "energy_threshold": c.energy_threshold,
                    "param_budget": c.param_budget}
        return {
            "rank_reduction": None if c.rank_reduction is None else c.rank_reduction * f,
            "energy_threshold": None if c.energy_threshold is None else 1.0 - (1.0 - c.energy_threshold) * f,
            "param_budget": None if c.param_budget is None else 1.0 - (1.0 - c.param_budget) * f,
        }

    def target_description(self, progress: float, schedule: str) -> dict[str, Any]:
        if self.config.mode == "hallu_space":
            return {"mode": "hallu_space", "top_k": self.config.top_k}
        return {k: (None if v is None else round(v, 6)) for k, v in self.targets_at(progress, schedule).items()}

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        if self.config.mode == "hallu_space":
            return self._hallu_space(model, ctx)
        return self._low_rank(model, ctx)

    # -------------------------------------------------------------- low rank
    @torch.no_grad()
    def _low_rank(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        tg = self.targets_at(ctx.progress, ctx.schedule)
        planned = cfg.layer_ranks is not None
        if "param_budget" in ctx.targets.get(self.name, {}) and not planned:  # the cascade's joint byte schedule
            tg = {"rank_reduction": None, "energy_threshold": None,
                  "param_budget": ctx.targets[self.name]["param_budget"]}
        if all(v is None for v in tg.values()) and not planned:
            raise CompressionError("nullu needs one of rank_reduction, energy_threshold, param_budget, layer_ranks")
        layers = ctx.layers(self.layer_names(model))
        if planned:
            layers = {n: m for n, m in layers.items() if cfg.layer_ranks.get(n, 0) > 0}
        method = cfg.decomposition_method
        need_gram = method == "activation_aware"
        # second moments of every layer only where the factorisation needs them in every round; the
        # final round's subspace report gathers them a chunk of layers at a time (bounded memory)
        stats = ctx.stats(gram=True) if need_gram else ctx.stats() if method == "asvd" else None
        report = ctx.progress >= 1.0 and bool(ctx.batches) and ctx.dense_model is not None

        # 1. the matrix each layer factorises, in the space where its Frobenius error is what we minimise
        def prepare(names: list[str]) -> dict[str, dict[str, Any]]:
            work: dict[str, dict[str, Any]] = {}
            for name in names:
                layer = layers[name]
                # a sparse S, or a dense S already stored as integer codes, stays: the factors fit what it leaves
                keep = layer.mask is not None or "weight" in layer.quant
                residual = ctx.target_weight(name, layer) - (layer.sparse_part().float() if keep else 0)
                right = right_inv = None
                if method in ("activation_aware", "asvd") and residual.device.type == "cpu":
                    residual = residual.double()  # whitening amplifies rounding in rarely visited directions
                if method == "activation_aware":
                    right, right_inv = whitening(stats[name].gram.to(residual), cfg.damping)
                elif method == "asvd":
                    s = stats[name].mean_abs.to(residual).clamp_min(1e-6) ** cfg.asvd_alpha
                    right, right_inv = torch.diag(s), torch.diag(1.0 / s)
                M = residual @ right if right is not None else residual
                work[name] = {"layer": layer, "M": M, "right": right, "right_inv": right_inv,
                              "keep_sparse": keep}
            return work

        # layers go through steps 1-3 in chunks of one shape and bounded size, so the matrices,
        # whitening roots and singular vectors of all layers are never held at once
        chunks: list[list[str]] = []
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, layer in layers.items():
            by_shape.setdefault((layer.out_features, layer.in_features), []).append(name)
        for (m_, n_), names_ in by_shape.items():
            per = max(1, CHUNK_BYTES // (8 * m_ * n_))
            chunks += [names_[k:k + per] for k in range(0, len(names_), per)]

        # 2. decompositions, batched over layers of one shape; only layers that will be factorised
        #    get singular vectors (the spectrum alone decides the others)
        def decide(w: dict[str, Any], energy: torch.Tensor, total: float | None = None) -> bool:
            m, n = w["layer"].out_features, w["layer"].in_features
            w["rank"] = rank_for(energy, m, n, tg["rank_reduction"], tg["energy_threshold"], tg["param_budget"],
                                 cfg.rank_rule, total_energy=total)
            return factorisable(w["rank"], m, n)

        global_budget = (cfg.budget_allocation == "global" and tg["param_budget"] is not None
                         and tg["rank_reduction"] is None and tg["energy_threshold"] is None)
        fixed: dict[str, int] = {}
        if planned:
            fixed = {n: min(int(cfg.layer_ranks[n]), layers[n].out_features, layers[n].in_features) for n in layers}
        elif global_budget:  # a first pass for the spectra: ranks go where they remove the most error
            energy: dict[str, torch.Tensor] = {}
            for chunk in chunks:
                work = prepare(chunk)
                e = spectral_energy(torch.stack([work[n]["M"] for n in chunk]))
                energy.update({n: e[i] for i, n in enumerate(chunk)})
                del work
                release_memory()
            order = list(layers)
            shapes = [(layers[n].out_features, layers[n].in_features) for n in order]
            budget = tg["param_budget"] * sum(m * n for m, n in shapes)
            fixed = dict(zip(order, allocate_ranks([energy[n] for n in order], shapes, budget), strict=True))
        # the final round's report needs each layer's n x n input second moments: they are gathered for
        # a group of chunks at a time, one pass of the teacher per group, at most REPORT_BYTES held
        group_of: list[int] = []
        group_names: list[list[str]] = []
        held = REPORT_BYTES
        for chunk in chunks:
            size = sum(4 * layers[n].in_features ** 2 for n in chunk)
            if held + size > REPORT_BYTES:
                group_names.append([])
                held = 0
            group_names[-1] += chunk
            group_of.append(len(group_names) - 1)
            held += size
        current: dict[int, dict[str, Any]] = {}
        per_layer: dict[str, Any] = {}
        done = 0
        for ci, chunk in enumerate(chunks):
            work = prepare(chunk)
            grams = None
            if report and need_gram:
                grams = stats
            elif report:
                if group_of[ci] not in current:
                    current.clear()  # the previous group's moments go before the next group's come
                    current[group_of[ci]] = ctx.stats(gram=True, names=group_names[group_of[ci]])
                grams = current[group_of[ci]]
            for n in chunk:
                if n in fixed:
                    work[n]["rank"], work[n]["fixed_rank"] = fixed[n], True
                    work[n]["planned"] = planned
            groups = {(layers[chunk[0]].out_features, layers[chunk[0]].in_features): chunk}
            for names in groups.values():
                warm = [n for n in names if cfg.warm_start and 0 < work[n].get("rank", 1) <= work[n]["layer"].rank]
                fresh = [n for n in names if n not in warm]
                if global_budget or planned:
                    fresh = [n for n in fresh if work[n]["rank"] > 0]
                elif tg["energy_threshold"] is None:
                    fresh = [n for n in fresh if decide(work[n], torch.empty(0))]
                elif fresh and method != "randomized":
                    if cfg.rank_rule == "min" and (tg["rank_reduction"] is not None or tg["param_budget"] is not None):
                        # the other targets cap the rank, and a smaller rank saves more: a layer the cap
                        # leaves factorisable is factorised at a rank its SVD decides (no separate
                        # spectrum needed); for any other, the energy rank may still be small enough,
                        # so its spectrum decides
                        kept, capped = [], []
                        for n in fresh:
                            cap = rank_for(torch.empty(0), *work[n]["M"].shape, tg["rank_reduction"], None,
                                           tg["param_budget"], "min")
                            (kept if factorisable(cap, *work[n]["M"].shape) else capped).append(n)
                        if capped:
                            energies = spectral_energy(torch.stack([work[n]["M"] for n in capped]))
                            kept += [n for i, n in enumerate(capped) if decide(work[n], energies[i])]
                        fresh = [n for n in names if n in kept]
                    else:
                        energies = spectral_energy(torch.stack([work[n]["M"] for n in fresh]))
                        fresh = [n for i, n in enumerate(fresh) if decide(work[n], energies[i])]
                if fresh and method == "randomized":
                    for n in fresh:
                        w = work[n]
                        q = min(min(w["M"].shape), self._rank_guess(w["M"].shape, tg) + cfg.oversample)
                        U, S, V = torch.svd_lowrank(w["M"], q=q, niter=cfg.power_iterations)
                        w["usv"] = (U, S, V.t())
                elif fresh:
                    U, S, Vh = svd(torch.stack([work[n]["M"] for n in fresh]))
                    for i, n in enumerate(fresh):
                        work[n]["usv"] = (U[i], S[i], Vh[i])
                for n in warm:
                    w = work[n]
                    prev_A = w["layer"].lr_A.detach().to(w["M"].dtype)
                    if w["right"] is not None:
                        prev_A = prev_A @ w["right"]
                    # intermediate rounds: Rayleigh-Ritz on the previous subspace; the final one iterates
                    # until its error is within WARM_TOL of the exact truncated SVD's
                    w["warm_info"] = {}
                    final = ctx.progress >= 1.0
                    w["usv"] = warm_subspace_svd(w["M"], prev_A, iterations=0, tol=WARM_TOL if final else None,
                                                 max_iterations=WARM_MAX_ITERATIONS, info=w["warm_info"])
                    w["warm"] = True
                    if final and not w["warm_info"]["converged"]:  # slow to converge (a small spectral gap): exact
                        U, S, Vh = svd(w["M"])
                        w["usv"] = (U, S, Vh)
                        w["warm_info"]["exact_svd"] = True

            # 3. rank selection, factors, report
            for name, w in work.items():
                done += 1
                layer = w["layer"]
                m, n = layer.out_features, layer.in_features
                total = float(w["M"].pow(2).sum())
                if "usv" in w:
                    U, S, Vh = w["usv"]
                    r = w["rank"] if w.get("fixed_rank") else rank_for(
                        S.pow(2), m, n, tg["rank_reduction"], tg["energy_threshold"], tg["param_budget"], cfg.rank_rule,
                        total_energy=total)
                    r = min(r, S.numel())
                else:
                    r = w["rank"]
                info: dict[str, Any] = {"rank": 0, "full_rank": min(m, n), "candidate_rank": r}
                if w.get("fixed_rank") and r == 0:
                    # the shared budget is better spent elsewhere: no low-rank part (only S, or only the bias)
                    info["dropped"] = "no rank under the global budget"
                    layer.set_low_rank(None, None)
                    if not w["keep_sparse"]:
                        layer.set_sparse(None)
                elif "usv" not in w or not (factorisable(r, m, n) or w.get("planned")):
                    info["skipped"] = f"r (m + n) >= m n for r={r}"
                    cap = ctx.byte_cap(name)
                    dense_fits = cap is None or dense_bytes(layer) <= cap
                    if not w["keep_sparse"] and layer.weight is None and layer.rank > 0 and dense_fits:
                        layer.set_low_rank(None, None)
                        layer.set_sparse(ctx.target_weight(name, layer))
                else:
                    # the parts this step replaces (references, not copies: the setters make new tensors)
                    before = layer.state(copy=False)
                    B, A = balanced_factors(U, S, Vh, r)
                    if w["right_inv"] is not None:
                        A = A @ w["right_inv"]
                    layer.set_low_rank(B, A)
                    if not w["keep_sparse"]:
                        layer.set_sparse(None)
                    cap = ctx.byte_cap(name)
                    excess = stored_bytes(layer) - cap if cap is not None else 0
                    if excess > 0:
                        # no step stores more than the previous round: fewer directions (the factors are
                        # fresh and unquantized, so each costs (m + n) values)
                        per_rank = (m + n) * layer.element_size
                        r = r - -(-excess // per_rank)
                        info["byte_capped_rank"] = max(r, 0)
                        if r > 0:
                            B, A = B[:, :r], A[:r]
                            layer.set_low_rank(B, A)
                        else:
                            layer.load_state(before, copy=False)
                            info["skipped"] = "no factors fit in the bytes the previous round stored"
                            per_layer[name] = info
                            ctx.tick(f"nullu {name}", done, len(layers))
                            continue
                    kept = float(S[:r].pow(2).sum())
                    info.update(rank=r, energy_kept=kept / total if total > 0 else 1.0, warm=bool(w.get("warm")))
                    if w.get("warm") and ctx.progress >= 1.0:
                        wi = w["warm_info"]
                        info.update(warm_iterations=wi["iterations"], warm_converged=wi["converged"],
                                    exact_svd=bool(wi.get("exact_svd")))
                    if grams is not None and grams[name].gram is not None:
                        info.update(self._subspace_report(name, w, B, A, Vh[:r], grams[name].gram, ctx))
                per_layer[name] = info
                ctx.tick(f"nullu {name}", done, len(layers))
            del work, grams
            release_memory()
        current.clear()
        refit: dict[str, dict[str, float]] = {}
        if cfg.refit == "sequential" and ctx.progress >= 1.0 and ctx.dense_model is not None and ctx.batches:
            refit = sequential_refit(model, ctx.dense_model, ctx.dense, layers, ctx.batches, ctx.device, cfg.damping,
                                     ctx.progress_callback)
            for name, errors in refit.items():
                per_layer[name].update(refit_error_before=errors["error_before"],
                                       refit_error_after=errors["error_after"])
        dense = sum(layers[n].in_features * layers[n].out_features for n in layers)
        factor = sum(layers[n].rank * (layers[n].in_features + layers[n].out_features) for n in layers)
        self.statistics = {
            "method": method,
            "targets": tg,
            "factorised_layers": sum(1 for v in per_layer.values() if v["rank"] > 0),
            "layers_total": len(per_layer),
            "factor_params_share": factor / max(dense, 1),
            **({"refit_mean_error": {
                "before": sum(e["error_before"] for e in refit.values()) / len(refit),
                "after": sum(e["error_after"] for e in refit.values()) / len(refit)}} if refit else {}),
            "layers": per_layer,
        }
        return model

    def _subspace_report(self, name: str, w: dict[str, Any], B: torch.Tensor, A: torch.Tensor, Vh_r: torch.Tensor,
                         gram: torch.Tensor, ctx: CompressionContext) -> dict[str, Any]:
        """Final-round report: relative output error on calibration inputs and the input energy dropped."""
        g = gram.float()  # a report: single precision is plenty and several times faster
        target = (w["M"] @ w["right_inv"] if w["right_inv"] is not None else w["M"]).to(g)
        Bd, Ad = B.to(g), A.to(g)
        AG = Ad @ g
        t_g_t = float(((target @ g) * target).sum())
        cross = float(((Bd.t() @ target) * AG).sum())  # tr(B A G T^T)
        lr_sq = float(((AG @ Ad.t()) * (Bd.t() @ Bd)).sum())  # tr(B A G A^T B^T)
        return {
            "output_error": max(0.0, t_g_t - 2 * cross + lr_sq) / max(t_g_t, 1e-300),
            "dropped_input_energy": dropped_input_energy(Vh_r, g, w["right"], w["right_inv"]),
        }

    def _rank_guess(self, shape: tuple[int, ...], tg: dict[str, float | None]) -> int:
        m, n = shape
        full = min(m, n)
        if tg["param_budget"] is not None:
            return budget_rank(m, n, tg["param_budget"])
        if tg["rank_reduction"] is not None:
            return max(1, round(full * (1 - tg["rank_reduction"])))
        return full

    # -------------------------------------------------------------- HalluSpace projection
    @torch.no_grad()
    def _hallu_space(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        if ctx.round > 1:
            # a one-shot edit: repeating it would add top_k more directions each round, recomputed
            # on the already edited model, and the earlier projections would stop being exact
            self.statistics = {"mode": "hallu_space", "pairs": self.statistics.get("pairs"), "top_k": cfg.top_k,
                               "skipped": f"one-shot edit, made in round 1 (now round {ctx.round})",
                               "layers": self.statistics.get("layers", {})}
            return model
        if not cfg.pairs_file:
            raise CompressionError("nullu mode 'hallu_space' needs pairs_file (JSON lines of truthful/hallucinated)")
        if ctx.tokenizer is None:
            raise CompressionError("nullu mode 'hallu_space' needs a model with a tokenizer (a CLIP or BLIP wrapper)")
        pairs = load_caption_pairs(cfg.pairs_file)
        adapter = _text_adapter(model)
        layer_ids = cfg.layers if cfg.layers is not None else list(range(adapter.num_layers // 2, adapter.num_layers))
        bad = [i for i in layer_ids if not 0 <= i < adapter.num_layers]
        if bad:
            raise CompressionError(f"hallu_space layers {bad} out of range 0..{adapter.num_layers - 1}")
        true_h = adapter.hidden_states(ctx, [p["truthful"] for p in pairs], pairs)
        bad_h = adapter.hidden_states(ctx, [p["hallucinated"] for p in pairs], pairs)
        per_layer: dict[str, Any] = {}
        for li in layer_ids:
            D = (true_h[li] - bad_h[li]) / 2.0
            k = min(cfg.top_k, min(D.shape))
            V = torch.linalg.svd(D.double(), full_matrices=False).Vh[:k].t()
            name = adapter.edit_layer(li)
            per_layer[name] = hallu_project_layer(model.get_submodule(name), V)
        self.statistics = {"mode": "hallu_space", "pairs": len(pairs), "top_k": cfg.top_k, "layers": per_layer}
        return model


def load_caption_pairs(path: str | Path) -> list[dict[str, str]]:
    """Read paired captions: a JSON list or JSON lines of ``{"truthful", "hallucinated", ["image"]}``."""
    path = Path(path)
    if not path.is_file():
        raise CompressionError(f"{path}: pairs file not found")
    text = path.read_text(encoding="utf-8").strip()
    try:
        lines = [line for line in text.splitlines() if line.strip()]
        items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in lines]
    except json.JSONDecodeError as exc:
        raise CompressionError(f"{path}: malformed JSON: {exc}") from None
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("truthful"), str) or not isinstance(
            item.get("hallucinated"), str
        ):
            raise CompressionError(f"{path}: item {i} needs string fields 'truthful' and 'hallucinated'")
        out.append(item)
    if not out:
        raise CompressionError(f"{path}: no caption pairs")
    return out


@torch.no_grad()
def hallu_project_layer(layer: nn.Module, V: torch.Tensor) -> dict[str, float]:
    """Edit a layer so its output has no component along the columns of ``V`` (orthonormal, out x k).

    Dense layers get ``W <- (I - V V^T) W`` (and the bias projected); compressed layers get the
    same map as ``k`` extra low-rank columns, so their sparse part keeps its structure (or, where
    those would store more than the dense layer, the edited weight as a dense S, scales folded in).
    """
    V = V.to(torch.float64)
    if isinstance(layer, nn.Linear):
        W = layer.weight.double()
        removed = float((V.t() @ W).norm() / W.norm().clamp_min(1e-30))
        layer.weight.copy_((W - V @ (V.t() @ W)).to(layer.weight.dtype))
        if layer.bias is not None:
            b = layer.bias.double()
            layer.bias.copy_((b - V @ (V.t() @ b)).to(layer.bias.dtype))
        return {"removed_weight_share": removed}
    if not isinstance(layer, CompressedLinear):
        raise CompressionError(f"cannot HalluSpace-edit a {type(layer).__name__}")
    M = layer.inner_weight().double()
    a_out = layer.a_out.double() if layer.a_out is not None else torch.ones(layer.out_features, dtype=torch.float64)
    a_in = layer.a_in.double() if layer.a_in is not None else None
    eff = a_out[:, None] * M * (a_in[None, :] if a_in is not None else 1)
    removed = float((V.t() @ eff).norm() / eff.norm().clamp_min(1e-30))
    if layer.weight is not None and layer.mask is None and layer.rank == 0 and layer.base is None:
        layer.set_sparse(M - (V @ (V.t() @ (a_out[:, None] * M))) / a_out[:, None])
    else:
        B_extra = -(V / a_out[:, None])
        A_extra = V.t() @ (a_out[:, None] * M)
        B = torch.cat([layer.lr_B.double(), B_extra], 1) if layer.rank else B_extra
        A = torch.cat([layer.lr_A.double(), A_extra], 0) if layer.rank else A_extra
        layer.set_low_rank(B, A)
        if stored_bytes(layer) > dense_bytes(layer):
            # k more columns would store more than the dense layer: the edited layer as a dense S,
            # scales folded in
            edited = eff - V @ (V.t() @ eff)
            layer.set_low_rank(None, None)
            layer.set_scales(None, None)
            layer.set_sparse(edited - (layer.base.double() if layer.base is not None else 0))
    if layer.bias is not None:
        b = layer.bias.double()
        layer.bias.data.copy_((b - V @ (V.t() @ b)).to(layer.bias.dtype))
    return {"removed_weight_share": removed}


class _TextAdapter:
    """Where a model's text hidden states come from and which MLP output projection follows layer i."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model, self.kind = model, kind
        cfg = model.config.text_config
        self.num_layers = int(cfg.num_hidden_layers)

    def edit_layer(self, i: int) -> str:
        if self.kind == "clip":
            return f"text_model.encoder.layers.{i}.mlp.fc2"
        return f"text_decoder.bert.encoder.layer.{i}.output.dense"

    def hidden_states(self, ctx: CompressionContext, texts: list[str], pairs: list[dict[str, str]]
                      ) -> list[torch.Tensor]:
        tok = ctx.tokenizer
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if self.kind == "clip":
            out = self.model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        else:
            pixels = ctx.image_loader([p.get("image") for p in pairs]).to(device)
            img = self.model.vision_model(pixel_values=pixels).last_hidden_state
            ids = ids.clone()
            ids[:, 0] = self.model.config.text_config.bos_token_id
            out = self.model.text_decoder.bert(
                input_ids=ids, attention_mask=mask, encoder_hidden_states=img, output_hidden_states=True
            )
        w = mask.unsqueeze(-1).to(out.hidden_states[0].dtype)
        pooled = [(h * w).sum(1) / w.sum(1).clamp_min(1) for h in out.hidden_states[1:]]
        return [p.double().cpu() for p in pooled]


def _text_adapter(model: nn.Module) -> _TextAdapter:
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype == "clip":
        return _TextAdapter(model, "clip")
    if mtype == "blip" and hasattr(model, "text_decoder"):
        return _TextAdapter(model, "blip")
    raise CompressionError("hallu_space supports CLIP and BLIP captioning models")
