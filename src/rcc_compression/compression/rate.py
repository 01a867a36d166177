"""Compression rates: plan per-stage targets that land on a requested rate, and measure the rate reached.

``compress_model`` (:mod:`rcc_compression.jobs.api`) and ``rcc compress`` with
``cascade.target_rate`` write the planned ``dare.pruning_rate`` / ``nullu.param_budget`` into the
compression section before the cascade runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..errors import CompressionError
from ..utils.logging import get_logger
from .calibration import collect_layer_stats
from .cascade import compression_summary
from .layers import compressed_layers
from .planner import LayerShape, plan_rate, split_error
from .stage import select_layers

log = get_logger("rate")

LOWRANK_SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)


def apply_rate(inner: nn.Module, section: Any, rate: float, scope: str = "layers",
               lowrank_share: float | None = None,
               calibration_data: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Plan per-stage targets for ``rate`` and write them into ``section`` (in place); returns the plan.

    ``dare.pruning_rate`` and ``nullu.param_budget`` take the planned values (the other rank
    criteria are cleared so the budget decides); a rate out of reach raises :class:`CompressionError`.
    For the cascade, the split between sparse and low-rank bytes is the one whose output error on
    ``calibration_data`` (or, without data, whose weight error) is smallest.
    """
    plan = _plan(inner, section, list(section.cascade.stages), rate, scope, lowrank_share, calibration_data)
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
