"""Stage ``dare``: sparsify the weights (or a fine-tune's deltas).

Default (docs/glossary.md): iterative unstructured magnitude pruning (Zhu & Gupta, "To prune, or not to
prune", 2017) to ``pruning_rate`` over
``iterations`` along a ``linear``/``cubic`` schedule, with distillation from the dense model
between iterations: ``fine_tune_epochs`` is 5 by default. After ``alphaedit`` has given a layer
channel scales, its entries are scored with them (``|a_out_i S_ij a_in_j|``, the weight the layer
really applies). Published DARE (Yu et al., "Language Models are Super Mario", ICML 2024; MergeLM
``mask_weights_utils.py``) is ``scorer=random, target=delta, rescale=inverse_keep,
fine_tune_epochs=0``: drop each delta entry with probability p, rescale survivors by 1/(1-p), and
train nothing. It departs from the paper only when ``iterations > 1``, where the drop probability
is split across rounds (same final rate), or when ``fine_tune_epochs > 0`` (the paper trains nothing).
Also ``wanda`` scores (Sun et al., ICLR 2024: ``|W_ij| * ||X_j||``, ranked per output row) and
N:M structure (2:4).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import CompressionError
from .stage import CompressionContext, Stage, StageConfig, kd_finetune, schedule_fraction
from .storage import stored_bytes


class DareConfig(StageConfig):
    """Keys of the ``dare`` stage (defaults: docs/glossary.md)."""

    pruning_rate: float = Field(0.9, ge=0.0, lt=1.0, description="final share of the weights (or deltas) set to zero")
    iterations: int = Field(
        10, ge=1,
        description="rounds of pruning that reach pruning_rate (also the cascade's default number of rounds)")
    pruning_schedule: Literal["linear", "cubic"] = Field(
        "linear",
        description="how the rate grows over the rounds: linear, or cubic (Zhu & Gupta)")
    fine_tune_epochs: int = Field(
        5, ge=0,
        description="distillation epochs on the calibration batches after each round (0: none)")
    fine_tune_lr: float = Field(1e-4, gt=0, description="learning rate of that distillation")
    scorer: Literal["magnitude", "wanda", "random"] = Field(
        "magnitude",
        description="what decides which entries stay: magnitude |W|, wanda |W| * ||x||, random (DARE)")
    target: Literal["weights", "delta"] = Field(
        "weights",
        description="weights, or delta: the difference to reference_model (published DARE)")
    reference_model: str | None = Field(None, description="the base model a fine-tune came from (target: delta)")
    rescale: Literal["none", "inverse_keep", "l1"] | None = Field(
        None,
        description="survivors rescaled: none, inverse_keep 1/(1-p) (DARE), l1 (keep the L1 norm); None: by scorer")
    scope: Literal["layer", "row"] | None = Field(
        None,
        description="entries ranked over the whole layer or per output row; None: row for wanda, else layer")
    nm: str | None = Field(None, description="N:M structure, e.g. '2:4' (overrides pruning_rate with 1 - N/M)")
    layer_rates: dict[str, float] | None = Field(
        None, description="final pruning rate per layer by module name (a plan): those layers take it instead of "
                          "pruning_rate; layers not named (or named with 0) are left alone")

    @field_validator("layer_rates")
    @classmethod
    def _rates(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: r for k, r in (v or {}).items() if not 0.0 <= r < 1.0}
        if bad:
            raise ValueError(f"layer rates must be in [0, 1): {bad}")
        return v

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", v)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError("expected 'N:M' with 0 < N < M, e.g. '2:4'")
        return f"{int(m.group(1))}:{int(m.group(2))}"

    def resolved_rescale(self) -> str:
        return self.rescale or ("inverse_keep" if self.scorer == "random" else "none")

    def resolved_scope(self) -> str:
        return self.scope or ("row" if self.scorer == "wanda" else "layer")

    def nm_pair(self) -> tuple[int, int] | None:
        if self.nm is None:
            return None
        n, m = self.nm.split(":")
        return int(n), int(m)


# ------------------------------------------------------------------------------ pure functions
def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Wanda)."""
    return weight.abs() * col_norm.to(weight)[None, :]


def keep_count(numel: int, rate: float) -> int:
    """Entries kept when ``rate`` of ``numel`` are pruned."""
    return numel - round(numel * rate)


def _top_per_row(s: torch.Tensor, keep: int) -> torch.Tensor:
    """Exactly ``keep`` highest entries of each row (ties broken by position), in O(n) by ``kthvalue``."""
    cols = s.shape[1]
    if keep <= 0:
        return torch.zeros_like(s, dtype=torch.bool)
    if keep >= cols:
        return torch.ones_like(s, dtype=torch.bool)
    thr = s.kthvalue(cols - keep + 1, dim=1, keepdim=True).values
    above = s > thr
    ties = s == thr
    need = keep - above.sum(1, keepdim=True)
    return above | (ties & (ties.cumsum(1) <= need))


def topk_mask(scores: torch.Tensor, rate: float, scope: str = "layer", allowed: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Keep the highest scores so that ``rate`` of all entries are pruned (per layer or per row).

    ``allowed`` (bool) restricts the choice to entries still kept (masks only shrink).
    """
    s = scores.float()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if scope == "row":
        mask = _top_per_row(s, keep_count(s.shape[1], rate))
    elif scope == "layer":
        mask = _top_per_row(s.reshape(1, -1), keep_count(s.numel(), rate)).view_as(s)
    else:
        raise ValueError(f"unknown scope {scope!r}; allowed: layer, row")
    if allowed is not None:
        mask &= allowed
    return mask


def topk_masks(scores: torch.Tensor, rates: Sequence[float], scope: str = "layer") -> dict[float, torch.Tensor]:
    """:func:`topk_mask` at each of ``rates`` from one stable sort (the same masks, ties kept by position)."""
    s = scores.float()
    if scope == "layer":
        flat = s.reshape(1, -1)
    elif scope == "row":
        flat = s
    else:
        raise ValueError(f"unknown scope {scope!r}; allowed: layer, row")
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return {p: (rank < keep_count(flat.shape[1], p)).view_as(s) for p in rates}


def nm_mask(scores: torch.Tensor, n: int, m: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """N:M mask: in every group of ``m`` consecutive inputs of a row keep the ``n`` highest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise CompressionError(f"N:M structure {n}:{m} needs in_features divisible by {m}, got {cols}")
    s = scores.float()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    groups = s.reshape(rows, cols // m, m)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    return mask & allowed if allowed is not None else mask


def bernoulli_mask(shape: torch.Size, drop: float, generator: torch.Generator, allowed: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Keep each entry independently with probability ``1 - drop`` (DARE's random drop)."""
    keep = torch.rand(shape, generator=generator) >= drop
    return keep & allowed.cpu() if allowed is not None else keep


def rescale_values(values: torch.Tensor, mask: torch.Tensor, before: torch.Tensor, kind: str, keep_prob: float
                   ) -> torch.Tensor:
    """Rescale the kept entries: ``none``, ``inverse_keep`` (x 1/keep_prob, DARE) or ``l1`` (row L1 of ``before``)."""
    kept = values * mask
    if kind == "none":
        return kept
    if kind == "inverse_keep":
        return kept / max(keep_prob, 1e-12)
    if kind == "l1":
        num = before.abs().sum(1, keepdim=True)
        den = kept.abs().sum(1, keepdim=True)
        return kept * torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))
    raise ValueError(f"unknown rescale {kind!r}; allowed: none, inverse_keep, l1")


# ------------------------------------------------------------------------------ stage
class DareStage(Stage):
    """Prune the S part of the target layers along the schedule (magnitude, wanda or random)."""

    name = "dare"
    config_class = DareConfig
    config: DareConfig

    planned = ("sparsity",)

    def plan_dimensions(self) -> tuple[str, ...]:
        c = self.config
        return self.planned if (c.nm is None and c.target == "weights" and c.scorer in ("magnitude", "wanda")) else ()

    def unplannable_reason(self) -> str:
        c = self.config
        if c.nm is not None:
            return f"N:M sparsity (dare.nm: {c.nm!r}) has no per-layer rate; set dare.nm: null"
        if c.target != "weights":
            return "pruning deltas to a reference model (dare.target: delta) has no per-layer byte plan"
        return f"the {c.scorer!r} scorer is not one the planner models (magnitude, wanda)"

    def apply_plan(self, layers: Mapping[str, Mapping[str, Any]], calibrated: bool) -> bool:
        rates = {n: float(v["pruning_rate"]) for n, v in layers.items() if v.get("pruning_rate", 0) > 0}
        if rates:
            self.config.layer_rates, self.config.nm, self.config.fine_tune_epochs = rates, None, 0
        return bool(rates)

    def default_rounds(self) -> int | None:
        return self.config.iterations

    def default_schedule(self) -> str | None:
        return self.config.pruning_schedule

    def rate_at(self, progress: float, schedule: str | None = None) -> float:
        """Cumulative pruning rate reached at ``progress`` of the schedule."""
        nm = self.config.nm_pair()
        if nm is not None:
            return 1.0 - nm[0] / nm[1]
        return self.config.pruning_rate * schedule_fraction(progress, schedule or self.config.pruning_schedule)

    def target_description(self, progress: float, schedule: str) -> dict[str, Any]:
        return {"pruning_rate": round(self.rate_at(progress, schedule), 6)}

    @torch.no_grad()
    def _prune_layer(self, name: str, layer: Any, ctx: CompressionContext, rate: float, stats: Any) -> dict[str, Any]:
        cfg = self.config
        if cfg.target == "delta" and layer.base is None:
            if ctx.reference is None or name not in ctx.reference:
                raise CompressionError(
                    f"dare target 'delta' needs a reference model holding layer {name!r} "
                    "(set compression.dare.reference_model or pass reference_model=...)"
                )
            ref = ctx.reference[name].to(layer.device, layer.dtype)
            if layer.weight is not None and layer.mask is None:
                layer.set_sparse(layer.weight.detach() - ref)
            layer.set_base(ref)
        if layer.weight is not None:
            current = layer.weight.detach().float()
        else:
            current = ctx.target_weight(name, layer) - layer.low_rank_part().float()
        allowed = layer.mask
        prev_keep = float(allowed.float().mean()) if allowed is not None else 1.0
        target_keep = 1.0 - rate
        if target_keep >= prev_keep - 1e-12 and allowed is not None:
            return {"sparsity": 1.0 - prev_keep, "changed": False}
        nm = cfg.nm_pair()
        if cfg.scorer == "random":
            step_drop = max(0.0, 1.0 - target_keep / prev_keep)
            gen = ctx.generator(zlib.crc32(name.encode()))
            mask = bernoulli_mask(current.shape, step_drop, gen, allowed).to(current.device)
            keep_prob = 1.0 - step_drop
        else:
            # ranked by what each entry contributes to the output: after recovery the layer computes
            # diag(a_out) S diag(a_in), so S is scored with its scales
            scored = current
            if layer.a_out is not None:
                scored = scored * layer.a_out.detach().float()[:, None]
            if layer.a_in is not None:
                scored = scored * layer.a_in.detach().float()[None, :]
            scores = (magnitude_scores(scored) if cfg.scorer == "magnitude"
                      else wanda_scores(scored, stats[name].col_norm))
            if nm is not None:
                mask = nm_mask(scores, nm[0], nm[1], allowed)
            else:
                mask = topk_mask(scores, rate, cfg.resolved_scope(), allowed)
            keep_prob = float(mask.float().mean()) / prev_keep
        values = rescale_values(current, mask, current, cfg.resolved_rescale(), keep_prob)
        layer.set_sparse(values, mask)
        info: dict[str, Any] = {"sparsity": 1.0 - float(mask.float().mean()), "changed": True}
        cap = ctx.byte_cap(name)
        if cap is not None and nm is None and stored_bytes(layer) > cap:
            # the round may not store more than the last one: keep fewer entries, the lowest scored go
            # (for the random scorer, more random ones)
            if cfg.scorer == "random":
                scores = torch.rand(current.shape, generator=ctx.generator(zlib.crc32(name.encode()) + 1))
                scores = scores.to(current.device)
            m, n = current.shape
            for _ in range(8):
                excess = stored_bytes(layer) - cap
                if excess <= 0:
                    break
                keep = max(0, int(mask.sum()) - -(-excess // layer.weight.element_size()))
                row = cfg.resolved_scope() == "row"
                capped_rate = 1.0 - ((keep // m) / n if row else keep / (m * n))
                mask = topk_mask(scores, capped_rate, "row" if row else "layer", mask)
                keep_prob = float(mask.float().mean()) / prev_keep
                layer.set_sparse(rescale_values(current, mask, current, cfg.resolved_rescale(), keep_prob), mask)
            info.update(sparsity=1.0 - float(mask.float().mean()), byte_capped=True)
        return info

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        names = self.layer_names(model)
        layers = ctx.layers(names)
        rate = ctx.targets.get(self.name, {}).get("pruning_rate", self.rate_at(ctx.progress, ctx.schedule))
        stats = ctx.stats() if cfg.scorer == "wanda" else None
        per_layer: dict[str, Any] = {}
        for i, (name, layer) in enumerate(layers.items()):
            layer_rate = rate
            if cfg.layer_rates is not None and cfg.nm is None:
                planned = cfg.layer_rates.get(name, 0.0)
                if planned == 0.0:
                    continue
                layer_rate = planned * schedule_fraction(ctx.progress, ctx.schedule)
            per_layer[name] = self._prune_layer(name, layer, ctx, layer_rate, stats)
            ctx.tick(f"dare {name}", i + 1, len(layers))
        kd = {}
        if cfg.fine_tune_epochs > 0:
            params = [p for m in layers.values() for p in m.parameters() if p is not m.bias]
            kd = kd_finetune(model, ctx, params, cfg.fine_tune_epochs, cfg.fine_tune_lr, salt=1)
        total = sum(layers[n].in_features * layers[n].out_features for n in layers)
        kept = sum(layers[n].nnz() for n in layers)
        self.statistics = {
            # shares of entries pruned (not bytes: the cascade's records give those)
            "pruning_rate": rate,
            "achieved_sparsity": 1.0 - kept / max(total, 1),
            "layers": per_layer,
            **kd,
        }
        return model
