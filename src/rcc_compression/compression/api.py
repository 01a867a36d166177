"""``compress_model``: the one-call API (design document section 11.1)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CompressionError
from ..utils.logging import get_logger
from .cascade import CascadePipeline, compression_summary
from .planner import LayerShape, plan_rate, split_error
from .registry import STAGES
from .stage import select_layers

log = get_logger("api")

LOWRANK_SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)


def _resolve_config(config: Any) -> Any:
    from ..config import RCCConfig, load_config

    if config is None:
        return load_config(None)
    if isinstance(config, RCCConfig):
        return config.model_copy(deep=True)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if isinstance(config, Mapping):
        return load_config(None, data=dict(config))
    raise CompressionError(f"config must be a path, a mapping or an RCCConfig, got {type(config).__name__}")


def compress_model(
    model: str | os.PathLike[str] | nn.Module = "rcc-clip-world",
    compression_rate: float | None = 0.5,
    method: str = "cascade",
    calibration_data: Iterable[Mapping[str, Any]] | None = None,
    config: Any = None,
    *,
    scope: str = "layers",
    lowrank_share: float | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress_callback: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """Compress a model to ``compression_rate`` and return it, with ``.compression_stats`` attached.

    ``model`` is a bundled name, a local directory, a hub id, a wrapper, or any ``nn.Module``.
    ``method`` is ``cascade`` (the stages of ``config.compression.cascade.stages``) or one stage
    name. With a rate, per-stage targets are planned so the stored bytes of the compressed layers
    (``scope="layers"``) or of the whole model (``scope="model"``) land on it; a rate that cannot
    be reached raises :class:`CompressionError` saying why, and a run the gate stops early reports
    the rate it did reach and the step that failed.
    """
    from ..models.registry import get_model, unwrap_model

    cfg = _resolve_config(config)
    seed = cfg.experiment.seed if seed is None else seed
    calibration_data = list(calibration_data) if calibration_data is not None else None
    if method != "cascade" and method not in STAGES:
        raise CompressionError(f"unknown method {method!r}; allowed: cascade, {', '.join(STAGES)}")
    wrapper_or_module = model if isinstance(model, nn.Module) else get_model(model, cfg.model.type, cfg.model.dtype)
    inner = unwrap_model(wrapper_or_module)
    section = cfg.compression
    stages = list(section.cascade.stages) if method == "cascade" else [method]
    section.cascade.stages = stages
    plan: dict[str, Any] | None = None
    if compression_rate is None and section.cascade.target_rate is not None:
        compression_rate, scope = section.cascade.target_rate, section.cascade.rate_scope
    if compression_rate is not None:
        plan = apply_rate(inner, section, compression_rate, scope, lowrank_share, calibration_data)
    pipe = CascadePipeline(section, calibration_data=calibration_data, metric_fn=metric_fn, run_dir=run_dir,
                           seed=seed, device=device, progress_callback=progress_callback,
                           run_config=cfg.model_dump(mode="json"), training=cfg.training)
    out = pipe.run(wrapper_or_module)
    summary = compression_summary(inner)
    stats: dict[str, Any] = {"plan": plan, "summary": summary, **pipe.get_stage_results()}
    if plan is not None:
        achieved = _achieved_rate(inner, scope)
        stats["achieved_rate"] = achieved
        layered = plan.get("method") == "layers"
        if layered and achieved >= compression_rate - 1e-9 and abs(achieved - plan["predicted_rate"]) < 1e-6:
            if achieved > compression_rate + 0.01:
                stats["rate_note"] = (f"reached {achieved:.4f}, past the requested {compression_rate:.4f}: no "
                                      "storage that fills the budget leaves less calibration output error")
                log.info(stats["rate_note"])
        elif abs(achieved - compression_rate) > 0.01:
            failed = next((r for r in pipe.records if not r.get("passed", True)), None)
            why = (f"the validation gate stopped step {failed['step']} ({failed['stage']}, round {failed['round']}) at "
                   f"retention {failed['retention']:.4f} < {failed['threshold']}" if failed else
                   "the stages' targets did not translate exactly into stored bytes")
            stats["rate_note"] = f"reached {achieved:.4f} instead of {compression_rate:.4f}: {why}"
            log.warning(stats["rate_note"])
    out.compression_stats = stats
    return out


def apply_rate(inner: nn.Module, section: Any, rate: float, scope: str = "layers",
               lowrank_share: float | None = None,
               calibration_data: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
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
    if "quant" in stages or (section.cascade.planner == "layers" and len(shrinking) > 1):
        return apply_layer_plan(inner, section, rate, scope, calibration_data)
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
    measured on the calibration batches that the cascade fits on (its holdout is left out).
    """
    from .planner import plan_layers
    from .quant import LayerQuant

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
    grams: list[torch.Tensor | None] = [None] * len(names)
    batches = list(calibration_data) if calibration_data is not None else []
    n_hold = min(2, len(batches) // 3)
    fit = batches[:-n_hold] if n_hold else batches
    if fit:
        from .calibration import collect_layer_stats

        stats = collect_layer_stats(inner, names, fit, gram=True)
        grams = [stats[n].gram for n in names]
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
    from .layers import compressed_layers

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
        from .calibration import collect_layer_stats

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
