"""Compression rates: plan per-stage targets that land on a requested rate, and measure the rate reached.

``compress_model`` (:mod:`rcc_compression.jobs.api`) and ``rcc compress`` with
``cascade.target_rate`` write the plan into the compression section before the cascade runs: per
layer bits, rank and sparsity (``quant.layers``, ``nullu.layer_ranks``, ``dare.layer_rates``; the
default ``cascade.planner: layers``), or one ``dare.pruning_rate`` / ``nullu.param_budget`` for all
layers (``planner: split``, or a fixed ``lowrank_share``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CompressionError
from ..utils.logging import get_logger
from .calibration import collect_layer_stats, iter_grams
from .cascade import compression_summary
from .layers import compressed_layers
from .planner import LayerShape, plan_layers, plan_rate, split_error
from .quant import LayerQuant
from .stage import select_layers

log = get_logger("rate")

LOWRANK_SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)


def apply_rate(inner: nn.Module, section: Any, rate: float, scope: str = "layers",
               lowrank_share: float | None = None,
               calibration_data: Iterable[Mapping[str, Any]] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Plan per-stage targets for ``rate`` and write them into ``section`` (in place); returns the plan.

    ``dare.pruning_rate`` and ``nullu.param_budget`` take the planned values (the other rank
    criteria are cleared so the budget decides); a rate out of reach raises :class:`CompressionError`.
    For the cascade, the split between sparse and low-rank bytes is the one whose output error on
    ``calibration_data`` (or, without data, whose weight error) is smallest.
    With ``cascade.planner: layers`` (the default) and a cascade of several stages, or the
    ``quant`` stage, each layer gets its own bits, rank and sparsity (:func:`apply_layer_plan`).
    """
    stages = list(section.cascade.stages)
    shrinking = [s for s in stages if s in ("dare", "nullu", "quant")]
    split = lowrank_share is not None or section.cascade.lowrank_share is not None  # a fixed byte split asked for
    if "quant" in stages or (section.cascade.planner == "layers" and len(shrinking) > 1 and not split):
        return apply_layer_plan(inner, section, rate, scope, calibration_data, progress)
    plan = _plan(inner, section, stages, rate, scope, lowrank_share, calibration_data)
    if plan.get("drop_stage"):
        section.cascade.stages = [s for s in section.cascade.stages if s != plan["drop_stage"]]
        log.info("rate %.4f: %s alone leaves less output error than any split; %s is left out",
                 rate, "dare" if plan["drop_stage"] == "nullu" else "nullu", plan["drop_stage"])
        plan = {k: v for k, v in plan.items() if not (k == "pruning_rate" and plan["drop_stage"] == "dare")
                and not (k == "param_budget" and plan["drop_stage"] == "nullu")}
    if "pruning_rate" in plan:
        section.dare.pruning_rate = plan["pruning_rate"]
        section.dare.nm = None
    if "param_budget" in plan:
        section.nullu.param_budget = plan["param_budget"]
        section.nullu.rank_reduction = None
        section.nullu.energy_threshold = None
        section.nullu.mode = "lowrank"
    return plan


def apply_layer_plan(inner: nn.Module, section: Any, rate: float, scope: str = "layers",
                     calibration_data: Iterable[Mapping[str, Any]] | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Plan bits x rank x sparsity per layer for ``rate`` and write the plan into ``section``; returns it.

    The dimensions are the stages': bits always (``quant``), sparsity when ``dare`` runs with the
    magnitude or wanda scorer on the weights, rank when ``nullu`` runs in low-rank mode. The
    cascade becomes one round of ``dare`` (per-layer rates) -> ``quant`` (S) -> ``nullu``
    (per-layer ranks, fitted to what the rounded S leaves) -> ``quant`` (the factors), then
    ``alphaedit`` if it was configured; stages the plan does not use are left out. Errors are
    measured on ``calibration_data``: the batches the cascade fits on, without the gate's holdout.
    """
    stages = list(section.cascade.stages)
    dare, nullu = section.dare, section.nullu
    sparse = ("dare" in stages and dare.nm is None and dare.target == "weights"
              and dare.scorer in ("magnitude", "wanda"))
    lowrank = "nullu" in stages and nullu.mode == "lowrank"
    names: list[str] = []
    for s in [s for s in stages if s in ("dare", "nullu", "quant")] or ["quant"]:
        c = getattr(section, s)
        names += [n for n in select_layers(inner, c.targets, c.ignore) if n not in names]
    if not names:
        raise CompressionError("no Linear layer matches the stages' targets")
    mods = [inner.get_submodule(n) for n in names]
    weights = [m.weight.detach() if isinstance(m, nn.Linear) else m.effective_weight() for m in mods]
    shapes = [LayerShape(w.shape[0], w.shape[1], w.element_size(), m.bias is not None)
              for w, m in zip(weights, mods, strict=True)]
    fit = list(calibration_data) if calibration_data is not None else []  # the callers keep the holdout out
    # second moments streamed in groups of layers: the planner reads each once, in order
    grams: Iterable[torch.Tensor | None] = iter_grams(inner, names, fit) if fit else [None] * len(names)
    skip = tuple(f"{n}." for n in names)
    rest = sum(t.numel() * t.element_size() for k, t in inner.state_dict().items() if not k.startswith(skip))
    scales = "alphaedit" in stages and section.alphaedit.mode == "scaling" and section.alphaedit.num_epochs > 0
    plan = plan_layers(names, weights, grams, shapes, rate, sparse=sparse, lowrank=lowrank, scales=scales,
                       rest_bytes=rest, scope=scope, scorer=dare.scorer, prune_scope=dare.resolved_scope(),
                       damping=section.quant.damping, rounding=section.quant.rounding if fit else "nearest",
                       progress=progress)
    layers = plan["layers"]
    rates = {n: v["pruning_rate"] for n, v in layers.items() if v["pruning_rate"] > 0}
    ranks = {n: v["rank"] for n, v in layers.items() if v["rank"] > 0}
    section.quant.layers = {
        n: LayerQuant(bits=v["bits"] if v["keep_s"] else None, factor_bits=v["factor_bits"],
                      group_size=v["group_size"], symmetric=v["symmetric"])
        for n, v in layers.items() if v["bits"] is not None or v["factor_bits"] is not None}
    planned: list[str] = []
    if rates:
        planned.append("dare")
        dare.layer_rates, dare.nm, dare.fine_tune_epochs = rates, None, 0
    if section.quant.layers:
        planned.append("quant")
    if ranks:
        planned.append("nullu")
        nullu.layer_ranks, nullu.mode = ranks, "lowrank"
        nullu.decomposition_method = "activation_aware" if fit else nullu.decomposition_method
        if any(layers[n]["factor_bits"] is not None for n in ranks):
            planned.append("quant")
    if "alphaedit" in stages:
        planned.append("alphaedit")
    section.cascade.stages = planned or ["quant"]
    section.cascade.rounds = 1
    plan["stages"] = list(section.cascade.stages)
    counts: dict[str, int] = {}
    for v in layers.values():
        counts[v["choice"]] = counts.get(v["choice"], 0) + 1
    log.info("rate %.4f planned per layer (%s): %s; estimated mean output error %.2e", rate,
             " x ".join(plan["dimensions"]), ", ".join(f"{k} x{c}" for k, c in sorted(counts.items(),
                                                                                   key=lambda kv: -kv[1])),
             plan["predicted_error"])
    return plan


def achieved_rate(inner: nn.Module, scope: str) -> float:
    """The compression rate the model stores now, of its compressed layers or of the whole model."""
    return _achieved_rate(inner, scope)


def _achieved_rate(inner: nn.Module, scope: str) -> float:
    s = compression_summary(inner)
    if scope != "model":
        return s["compression_rate"]
    names = tuple(f"{n}." for n in compressed_layers(inner))
    rest = sum(t.numel() * t.element_size() for k, t in inner.state_dict().items() if not k.startswith(names))
    return 1.0 - (s["stored_bytes"] + rest) / (s["dense_bytes"] + rest)


def _plan(
    inner: nn.Module, section: Any, stages: list[str], rate: float, scope: str, lowrank_share: float | None,
    calibration_data: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    sparse = "dare" in stages
    lowrank = "nullu" in stages and section.nullu.mode == "lowrank"
    kind = "cascade" if sparse and lowrank else "dare" if sparse else "nullu" if lowrank else None
    if kind is None:
        raise CompressionError(f"stages {stages} do not shrink the model (need dare and/or nullu) for a rate")
    target_cfgs = [getattr(section, s) for s in stages if s in ("dare", "nullu")]
    names: list[str] = []
    for c in target_cfgs:
        names += [n for n in select_layers(inner, c.targets, c.ignore) if n not in names]
    if not names:
        raise CompressionError("no Linear layer matches the stages' targets")
    mods = [inner.get_submodule(n) for n in names]
    weights = [m.weight if isinstance(m, nn.Linear) else m.effective_weight() for m in mods]
    shapes = [LayerShape(w.shape[0], w.shape[1], w.element_size(), m.bias is not None)
              for w, m in zip(weights, mods, strict=True)]
    scales = "alphaedit" in stages and section.alphaedit.mode == "scaling"
    skip = tuple(f"{n}." for n in names)
    rest = sum(t.numel() * t.element_size() for k, t in inner.state_dict().items() if not k.startswith(skip))
    prune_scope = section.dare.resolved_scope() if sparse else "layer"
    alloc = section.nullu.budget_allocation if lowrank else "layer"
    if kind != "cascade":
        return plan_rate(shapes, rate, kind, scales=scales, rest_bytes=rest, scope=scope, prune_scope=prune_scope,
                         rank_allocation=alloc)
    shares = [lowrank_share] if lowrank_share is not None else list(LOWRANK_SHARES)
    order = [s for s in stages if s in ("dare", "nullu")]
    grams = None
    if calibration_data is not None and len(shares) > 1:
        stats = collect_layer_stats(inner, names, list(calibration_data), gram=True)
        grams = [stats[n].gram for n in names]
    search = len(shares) > 1
    candidates: list[tuple[Any, str, list[str]]] = [(share, "cascade", order) for share in shares]
    if search:  # the single stages compete too: a split is only kept where it beats both
        candidates += [(None, "dare", ["dare"]), (None, "nullu", ["nullu"])]
    best: dict[str, Any] | None = None
    for share, kind_c, order_c in candidates:
        try:
            p = plan_rate(shapes, rate, kind_c, share if share is not None else 0.5, scales, rest, scope,
                          prune_scope, alloc)
        except CompressionError:
            continue
        if kind_c != "cascade":
            p.setdefault("pruning_rate", 1.0)
            p.setdefault("param_budget", 0.0)
            p["drop_stage"] = "nullu" if kind_c == "dare" else "dare"
        p["split_error"] = split_error(
            [w.detach() for w in weights], p, order_c, grams, section.dare.scorer, prune_scope,
            section.nullu.decomposition_method, section.nullu.damping, alloc) if search else None
        if best is None or (p["split_error"] or 0) < (best["split_error"] or 0):
            best = p
    if best is None:
        return plan_rate(shapes, rate, "cascade", shares[0], scales, rest, scope, prune_scope, alloc)  # raises
    best["shares_tried"] = shares
    return best
