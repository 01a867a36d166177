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

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import CompressionError
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from .layers import CompressedLinear
from .lowrank import (
    allocate_ranks,
    balanced_factors,
    budget_rank,
    dropped_input_energy,
    factorisable,
    rank_for,
    spectral_energy,
    svd,
    warm_subspace_svd,
    whitening,
)
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


#: the most float64 bytes of layer matrices the low-rank step decomposes at once
CHUNK_BYTES = 1 << 25
#: the most bytes of input second moments (float32, n x n per layer) the final round's report holds at once
REPORT_BYTES = 1 << 27

#: final round of warm-started factors: subspace iterations until one gains less than WARM_TOL of the
#: energy still left out; a layer not there after WARM_MAX_ITERATIONS gets the exact SVD instead
WARM_TOL = 1e-5
WARM_MAX_ITERATIONS = 8


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
    def _low_rank_targets(self, ctx: CompressionContext) -> dict[str, float | None]:
        """This step's rank targets: the round's share of the configured ones, or the cascade's joint budget."""
        cfg = self.config
        tg = self.targets_at(ctx.progress, ctx.schedule)
        planned = cfg.layer_ranks is not None
        if "param_budget" in ctx.targets.get(self.name, {}) and not planned:  # the cascade's joint byte schedule
            tg = {"rank_reduction": None, "energy_threshold": None,
                  "param_budget": ctx.targets[self.name]["param_budget"]}
        if all(v is None for v in tg.values()) and not planned:
            raise CompressionError("nullu needs one of rank_reduction, energy_threshold, param_budget, layer_ranks")
        return tg

    @torch.no_grad()
    def _low_rank(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        tg = self._low_rank_targets(ctx)
        planned = cfg.layer_ranks is not None
        layers = ctx.layers(self.layer_names(model))
        if planned:
            layers = {n: m for n, m in layers.items() if cfg.layer_ranks.get(n, 0) > 0}
        method = cfg.decomposition_method
        # second moments of every layer only where the factorisation needs them in every round; the
        # final round's subspace report gathers them a chunk of layers at a time (bounded memory)
        stats = None
        if method == "activation_aware":
            stats = ctx.stats(gram=True)
        elif method == "asvd":
            stats = ctx.stats()
        run = _LowRankRun(self, ctx, tg, layers, stats)
        fixed = run.fixed_ranks()
        per_layer: dict[str, Any] = {}
        for ci, chunk in enumerate(run.chunks):
            work = run.prepare(chunk)
            for n in chunk:
                if n in fixed:
                    work[n].rank, work[n].fixed_rank, work[n].planned = fixed[n], True, planned
            run.decompose([work[n] for n in chunk])
            grams = run.report_grams(ci)
            for w in work.values():
                per_layer[w.name] = run.install(w, grams)
                ctx.tick(f"nullu {w.name}", len(per_layer), len(layers))
            del work, grams
            release_memory()
        run.close()
        self.statistics = self._low_rank_statistics(model, ctx, tg, layers, per_layer)
        return model

    def _low_rank_statistics(self, model: nn.Module, ctx: CompressionContext, tg: dict[str, float | None],
                             layers: dict[str, CompressedLinear], per_layer: dict[str, Any]) -> dict[str, Any]:
        """The final round's sequential refit (``refit: sequential``), then the step's statistics."""
        cfg = self.config
        refit: dict[str, dict[str, float]] = {}
        if cfg.refit == "sequential" and ctx.progress >= 1.0 and ctx.dense_model is not None and ctx.batches:
            refit = sequential_refit(model, ctx.dense_model, ctx.dense, layers, ctx.batches, ctx.device, cfg.damping,
                                     ctx.progress_callback)
            for name, errors in refit.items():
                per_layer[name].update(refit_error_before=errors["error_before"],
                                       refit_error_after=errors["error_after"])
        dense = sum(layers[n].in_features * layers[n].out_features for n in layers)
        factor = sum(layers[n].rank * (layers[n].in_features + layers[n].out_features) for n in layers)
        return {
            "method": cfg.decomposition_method,
            "targets": tg,
            "factorised_layers": sum(1 for v in per_layer.values() if v["rank"] > 0),
            "layers_total": len(per_layer),
            "factor_params_share": factor / max(dense, 1),
            **({"refit_mean_error": {
                "before": sum(e["error_before"] for e in refit.values()) / len(refit),
                "after": sum(e["error_after"] for e in refit.values()) / len(refit)}} if refit else {}),
            "layers": per_layer,
        }

    def _subspace_report(self, w: _LayerWork, B: torch.Tensor, A: torch.Tensor, Vh_r: torch.Tensor,
                         gram: torch.Tensor) -> dict[str, Any]:
        """Final-round report: relative output error on calibration inputs and the input energy dropped."""
        g = gram.float()  # a report: single precision is plenty and several times faster
        target = (w.M @ w.right_inv if w.right_inv is not None else w.M).to(g)
        Bd, Ad = B.to(g), A.to(g)
        AG = Ad @ g
        t_g_t = float(((target @ g) * target).sum())
        cross = float(((Bd.t() @ target) * AG).sum())  # tr(B A G T^T)
        lr_sq = float(((AG @ Ad.t()) * (Bd.t() @ Bd)).sum())  # tr(B A G A^T B^T)
        return {
            "output_error": max(0.0, t_g_t - 2 * cross + lr_sq) / max(t_g_t, 1e-300),
            "dropped_input_energy": dropped_input_energy(Vh_r, g, w.right, w.right_inv),
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
        layer_ids = cfg.layers
        if layer_ids is None:  # the upper half of the text encoder
            layer_ids = list(range(adapter.num_layers // 2, adapter.num_layers))
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


@dataclass(eq=False)
class _LayerWork:
    """One layer in a low-rank step: the matrix it factorises (in the space whose Frobenius error is minimised),
    the rank decided for it, and its decomposition."""

    name: str
    layer: CompressedLinear
    M: torch.Tensor
    right: torch.Tensor | None  # the input-side transform (whitening root, ASVD scales); None for plain SVD
    right_inv: torch.Tensor | None
    keep_sparse: bool  # S stays (sparse, or stored as codes): the factors fit what it leaves
    rank: int | None = None
    fixed_rank: bool = False  # a planned rank or the global budget's: the spectrum does not change it
    planned: bool = False
    usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    warm: bool = False  # refined from the layer's previous factors
    warm_info: dict[str, Any] = field(default_factory=dict)
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # B, A as installed

    @property
    def shape(self) -> tuple[int, int]:
        return self.layer.out_features, self.layer.in_features


class _LowRankRun:
    """The steps of one low-rank step over a model's layers, in chunks of one shape and bounded size.

    :meth:`fixed_ranks` (plan or global budget), then per chunk :meth:`prepare`, :meth:`decompose`,
    :meth:`report_grams` and :meth:`install` per layer. The matrices, whitening roots and singular
    vectors of all layers are never held at once.
    """

    def __init__(self, stage: NulluStage, ctx: CompressionContext, tg: dict[str, float | None],
                 layers: dict[str, CompressedLinear], stats: Any) -> None:
        self.stage = stage
        self.cfg = stage.config
        self.ctx = ctx
        self.tg = tg
        self.layers = layers
        self.stats = stats
        self.planned = self.cfg.layer_ranks is not None
        self.global_budget = (self.cfg.budget_allocation == "global" and tg["param_budget"] is not None
                              and tg["rank_reduction"] is None and tg["energy_threshold"] is None)
        self.report = ctx.progress >= 1.0 and bool(ctx.batches) and ctx.dense_model is not None
        self.chunks = self._chunks()
        self._group_of, self._group_names = self._report_groups()
        self._current: dict[int, Any] = {}

    def _chunks(self) -> list[list[str]]:
        """Layers by shape, in chunks of at most ``CHUNK_BYTES`` of float64 matrices."""
        chunks: list[list[str]] = []
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, layer in self.layers.items():
            by_shape.setdefault((layer.out_features, layer.in_features), []).append(name)
        for (m, n), names in by_shape.items():
            per = max(1, CHUNK_BYTES // (8 * m * n))
            chunks += [names[k:k + per] for k in range(0, len(names), per)]
        return chunks

    def _report_groups(self) -> tuple[list[int], list[list[str]]]:
        """The final round's report needs each layer's n x n input second moments: they are gathered for a group
        of chunks at a time, one pass of the teacher per group, at most ``REPORT_BYTES`` held."""
        group_of: list[int] = []
        group_names: list[list[str]] = []
        held = REPORT_BYTES
        for chunk in self.chunks:
            size = sum(4 * self.layers[n].in_features ** 2 for n in chunk)
            if held + size > REPORT_BYTES:
                group_names.append([])
                held = 0
            group_names[-1] += chunk
            group_of.append(len(group_names) - 1)
            held += size
        return group_of, group_names

    def prepare(self, names: list[str]) -> dict[str, _LayerWork]:
        """The matrix each layer factorises: its target weight, less a sparse S that stays, times ``right``."""
        cfg, ctx, method = self.cfg, self.ctx, self.cfg.decomposition_method
        work: dict[str, _LayerWork] = {}
        for name in names:
            layer = self.layers[name]
            # a sparse S, or a dense S already stored as integer codes, stays: the factors fit what it leaves
            keep = layer.mask is not None or "weight" in layer.quant
            residual = ctx.target_weight(name, layer) - (layer.sparse_part().float() if keep else 0)
            right = right_inv = None
            if method in ("activation_aware", "asvd") and residual.device.type == "cpu":
                residual = residual.double()  # whitening amplifies rounding in rarely visited directions
            if method == "activation_aware":
                right, right_inv = whitening(self.stats[name].gram.to(residual), cfg.damping)
            elif method == "asvd":
                s = self.stats[name].mean_abs.to(residual).clamp_min(1e-6) ** cfg.asvd_alpha
                right, right_inv = torch.diag(s), torch.diag(1.0 / s)
            M = residual @ right if right is not None else residual
            work[name] = _LayerWork(name, layer, M, right, right_inv, keep)
        return work

    def fixed_ranks(self) -> dict[str, int]:
        """Ranks decided before any decomposition: the plan's, or the global budget's from every layer's spectrum
        (ranks go where they remove the most error)."""
        layers = self.layers
        if self.planned:
            return {n: min(int(self.cfg.layer_ranks[n]), layers[n].out_features, layers[n].in_features)
                    for n in layers}
        if not self.global_budget:
            return {}
        energy: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            work = self.prepare(chunk)
            e = spectral_energy(torch.stack([work[n].M for n in chunk]))
            energy.update({n: e[i] for i, n in enumerate(chunk)})
            del work
            release_memory()
        order = list(layers)
        shapes = [(layers[n].out_features, layers[n].in_features) for n in order]
        budget = self.tg["param_budget"] * sum(m * n for m, n in shapes)
        return dict(zip(order, allocate_ranks([energy[n] for n in order], shapes, budget), strict=True))

    def _decide(self, w: _LayerWork, energy: torch.Tensor, total: float | None = None) -> bool:
        """Set the layer's rank from ``energy``; whether factors of that rank save anything."""
        tg, (m, n) = self.tg, w.shape
        w.rank = rank_for(energy, m, n, tg["rank_reduction"], tg["energy_threshold"], tg["param_budget"],
                          self.cfg.rank_rule, total_energy=total)
        return factorisable(w.rank, m, n)

    def _fresh(self, fresh: list[_LayerWork]) -> list[_LayerWork]:
        """Of the layers decomposed afresh, those that will be factorised: only they get singular vectors (the
        spectrum alone decides the others)."""
        tg, cfg = self.tg, self.cfg
        if self.global_budget or self.planned:
            return [w for w in fresh if w.rank > 0]
        if tg["energy_threshold"] is None:
            return [w for w in fresh if self._decide(w, torch.empty(0))]
        if not fresh or cfg.decomposition_method == "randomized":
            return fresh
        if cfg.rank_rule == "min" and (tg["rank_reduction"] is not None or tg["param_budget"] is not None):
            # the other targets cap the rank, and a smaller rank saves more: a layer the cap leaves
            # factorisable is factorised at a rank its SVD decides (no separate spectrum needed); for any
            # other, the energy rank may still be small enough, so its spectrum decides
            kept, capped = [], []
            for w in fresh:
                cap = rank_for(torch.empty(0), *w.M.shape, tg["rank_reduction"], None, tg["param_budget"], "min")
                (kept if factorisable(cap, *w.M.shape) else capped).append(w)
            if capped:
                energies = spectral_energy(torch.stack([w.M for w in capped]))
                kept += [w for i, w in enumerate(capped) if self._decide(w, energies[i])]
            return [w for w in fresh if w in kept]
        energies = spectral_energy(torch.stack([w.M for w in fresh]))
        return [w for i, w in enumerate(fresh) if self._decide(w, energies[i])]

    def decompose(self, chunk: list[_LayerWork]) -> None:
        """Singular triplets of one chunk (one shape): batched SVD or ``svd_lowrank`` for fresh layers, subspace
        iteration from the previous factors for the others (``warm_start``)."""
        cfg = self.cfg
        warm = [w for w in chunk if cfg.warm_start and 0 < (1 if w.rank is None else w.rank) <= w.layer.rank]
        fresh = self._fresh([w for w in chunk if w not in warm])
        if fresh and cfg.decomposition_method == "randomized":
            for w in fresh:
                q = min(min(w.M.shape), self.stage._rank_guess(w.M.shape, self.tg) + cfg.oversample)
                U, S, V = torch.svd_lowrank(w.M, q=q, niter=cfg.power_iterations)
                w.usv = (U, S, V.t())
        elif fresh:
            U, S, Vh = svd(torch.stack([w.M for w in fresh]))
            for i, w in enumerate(fresh):
                w.usv = (U[i], S[i], Vh[i])
        for w in warm:
            self._warm_decomposition(w)

    def _warm_decomposition(self, w: _LayerWork) -> None:
        """Intermediate rounds: Rayleigh-Ritz on the previous subspace; the final one iterates until its error is
        within ``WARM_TOL`` of the exact truncated SVD's, or decomposes exactly (a small spectral gap)."""
        prev_A = w.layer.lr_A.detach().to(w.M.dtype)
        if w.right is not None:
            prev_A = prev_A @ w.right
        final = self.ctx.progress >= 1.0
        w.usv = warm_subspace_svd(w.M, prev_A, iterations=0, tol=WARM_TOL if final else None,
                                  max_iterations=WARM_MAX_ITERATIONS, info=w.warm_info)
        w.warm = True
        if final and not w.warm_info["converged"]:
            w.usv = svd(w.M)
            w.warm_info["exact_svd"] = True

    def report_grams(self, chunk_index: int) -> Any:
        """The input second moments the final round's report reads for this chunk (``None`` before it)."""
        if not self.report:
            return None
        if self.cfg.decomposition_method == "activation_aware":
            return self.stats
        group = self._group_of[chunk_index]
        if group not in self._current:
            self._current.clear()  # the previous group's moments go before the next group's come
            self._current[group] = self.ctx.stats(gram=True, names=self._group_names[group])
        return self._current[group]

    def close(self) -> None:
        self._current.clear()

    def install(self, w: _LayerWork, grams: Any) -> dict[str, Any]:
        """Choose the layer's final rank and install its factors (or none); returns the layer's report."""
        layer, ctx = w.layer, self.ctx
        m, n = w.shape
        total = float(w.M.pow(2).sum())
        if w.usv is not None:
            U, S, Vh = w.usv
            tg = self.tg
            r = w.rank if w.fixed_rank else rank_for(S.pow(2), m, n, tg["rank_reduction"], tg["energy_threshold"],
                                                     tg["param_budget"], self.cfg.rank_rule, total_energy=total)
            r = min(r, S.numel())
        else:
            r = w.rank
        info: dict[str, Any] = {"rank": 0, "full_rank": min(m, n), "candidate_rank": r}
        if w.fixed_rank and r == 0:
            # the shared budget is better spent elsewhere: no low-rank part (only S, or only the bias)
            info["dropped"] = "no rank under the global budget"
            layer.set_low_rank(None, None)
            if not w.keep_sparse:
                layer.set_sparse(None)
        elif w.usv is None or not (factorisable(r, m, n) or w.planned):
            info["skipped"] = f"r (m + n) >= m n for r={r}"
            cap = ctx.byte_cap(w.name)
            dense_fits = cap is None or dense_bytes(layer) <= cap
            if not w.keep_sparse and layer.weight is None and layer.rank > 0 and dense_fits:
                layer.set_low_rank(None, None)
                layer.set_sparse(ctx.target_weight(w.name, layer))
        else:
            r = self._install_factors(w, r, info)
            if r > 0:
                self._factor_report(w, r, total, grams, info)
        return info

    def _install_factors(self, w: _LayerWork, r: int, info: dict[str, Any]) -> int:
        """Factors of rank ``r`` in the layer, cut to the bytes the previous round stored; the rank installed (0:
        none fit, and the layer is as it was)."""
        layer, (m, n) = w.layer, w.shape
        U, S, Vh = w.usv
        before = layer.state(copy=False)  # the parts this step replaces (references: the setters make new tensors)
        B, A = balanced_factors(U, S, Vh, r)
        if w.right_inv is not None:
            A = A @ w.right_inv
        layer.set_low_rank(B, A)
        if not w.keep_sparse:
            layer.set_sparse(None)
        cap = self.ctx.byte_cap(w.name)
        excess = stored_bytes(layer) - cap if cap is not None else 0
        if excess > 0:
            # no step stores more than the previous round: fewer directions (the factors are fresh and
            # unquantized, so each costs (m + n) values)
            r = r - -(-excess // ((m + n) * layer.element_size))
            info["byte_capped_rank"] = max(r, 0)
            if r > 0:
                B, A = B[:, :r], A[:r]
                layer.set_low_rank(B, A)
            else:
                layer.load_state(before, copy=False)
                info["skipped"] = "no factors fit in the bytes the previous round stored"
                return 0
        w.factors = (B, A)
        return r

    def _factor_report(self, w: _LayerWork, r: int, total: float, grams: Any, info: dict[str, Any]) -> None:
        """The kept energy, the warm start's convergence and, in the final round, the output error and the input
        energy dropped."""
        U, S, Vh = w.usv
        kept = float(S[:r].pow(2).sum())
        info.update(rank=r, energy_kept=kept / total if total > 0 else 1.0, warm=w.warm)
        if w.warm and self.ctx.progress >= 1.0:
            info.update(warm_iterations=w.warm_info["iterations"], warm_converged=w.warm_info["converged"],
                        exact_svd=bool(w.warm_info.get("exact_svd")))
        if grams is not None and grams[w.name].gram is not None:
            B, A = w.factors
            info.update(self.stage._subspace_report(w, B, A, Vh[:r], grams[w.name].gram))


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
