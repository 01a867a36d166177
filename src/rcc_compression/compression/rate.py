"""Compression rates: plan per-stage targets that land on a requested rate, and measure the rate reached.

``compress_model`` (:mod:`rcc_compression.jobs.api`) and ``rcc compress`` with
``cascade.target_rate`` write the plan into the compression section before the cascade runs: per
layer bits, rank and sparsity (``quant.layers``, ``nullu.layer_ranks``, ``dare.layer_rates``; the
default ``cascade.planner: layers``), or one ``dare.pruning_rate`` / ``nullu.param_budget`` for all
layers (``planner: split``, or a fixed ``lowrank_share``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CompressionError
from ..utils.io import split_aliases
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from .blocks import BlockMemo, find_stacks
from .calibration import calls_per_forward, collect_layer_stats, iter_grams, output_sensitivity, run_outputs
from .cascade import compression_summary
from .layers import compressed_layers
from .planner import Choice, LayerShape, allocate, choice_weight, plan_layers, plan_rate, split_error
from .registry import STAGES, build_stage
from .stage import Stage, select_layers
from .towers import lift_protections, measured_probes, plan_constraints, probe_record, tower_sensitivity

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
    With ``cascade.planner: layers`` (the default) and a cascade of several stages, or a stage
    offering bits, each layer gets its own bits, rank and sparsity (:func:`apply_layer_plan`).
    """
    stages = list(section.cascade.stages)
    built = [build_stage(s, getattr(section, s)) for s in stages]
    shrinking = [st for st in built if st.planned]
    split = lowrank_share is not None or section.cascade.lowrank_share is not None  # a fixed byte split asked for
    if any("bits" in st.planned for st in built) or (
            section.cascade.planner == "layers" and len(shrinking) > 1 and not split):
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


#: the plan dimensions in the order the planner composes them: S pruned, S rounded, factors fitted to
#: what the rounded S leaves (then rounded by the ``bits`` stage again)
DIMENSIONS = ("sparsity", "bits", "rank")


def plan_roles(section: Any, stages: Sequence[str]) -> tuple[dict[str, Stage], list[Stage]]:
    """``(dimension -> the stage carrying it out, recovery stages in order)`` of a planned run.

    Each stage declares its dimensions (:meth:`Stage.plan_dimensions`); a recovery stage runs
    after the plan as configured. A stage that is neither, or a dimension two different stages
    offer, is a :class:`CompressionError` naming the stage and why: a planned run never drops a
    stage. ``bits`` are always planned: when no listed stage offers them, the registered stage that
    does (``quant``) joins with its own config.
    """
    providers: dict[str, Stage] = {}
    recovery: list[Stage] = []
    for name in stages:
        st = build_stage(name, getattr(section, name))
        dims = st.plan_dimensions()
        if not dims and st.recovery:
            recovery.append(st)
            continue
        if not dims:
            raise CompressionError(
                f"stage {name!r} cannot be planned for a target rate: {st.unplannable_reason()}; or leave {name!r} "
                f"out of compression.cascade.stages, or run without a rate (stages: {', '.join(stages)})")
        for d in dims:
            if d in providers and providers[d].name != name:
                raise CompressionError(f"stages {providers[d].name!r} and {name!r} both offer the plan dimension "
                                       f"{d!r}; a planned run takes one stage per dimension")
            providers.setdefault(d, st)
    if "bits" not in providers:
        name = next((n for n, (_, cls) in STAGES.items() if "bits" in cls.planned), None)
        if name is not None:
            providers["bits"] = build_stage(name, getattr(section, name))
    return providers, recovery


def rest_bytes(inner: nn.Module, layer_names: Iterable[str]) -> int:
    """Bytes of the model's tensors outside ``layer_names``, each storage once (tied weights: as the files)."""
    skip = tuple(f"{n}." for n in layer_names)
    tensors, _ = split_aliases({k: t for k, t in inner.state_dict().items() if not k.startswith(skip)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class LayerPlanSetup:
    """What a per-layer plan is made over: the layers, each one's dimensions, shape and reserved bytes, how the
    candidates are built (``build``: keywords of :func:`~.planner.layer_choices`), the stages that carry it out."""

    names: list[str]
    dims: list[frozenset[str]]
    shapes: list[LayerShape]
    reserved: list[int]
    build: dict[str, Any]
    providers: dict[str, Stage]
    recovery: list[Stage]


def layer_plan_setup(inner: nn.Module, section: Any, calibrated: bool) -> LayerPlanSetup:
    """The layers a per-layer plan covers and how it is built; reads module names and shapes only, so it works
    on a model whose parameters are on the meta device. ``calibrated``: candidates are scored on calibration data."""
    providers, recovery = plan_roles(section, list(section.cascade.stages))
    targeted = {d: set(select_layers(inner, st.config.targets, st.config.ignore)) for d, st in providers.items()}
    extra = set().union(*(select_layers(inner, st.config.targets, st.config.ignore) for st in recovery))
    wanted = set().union(*targeted.values()) | extra
    names = [n for n in select_layers(inner, [r"."], []) if n in wanted]
    if not any(targeted.values()):
        raise CompressionError("no Linear layer matches the stages' targets")
    dims = [frozenset(d for d in DIMENSIONS if n in targeted.get(d, ())) for n in names]
    mods = [inner.get_submodule(n) for n in names]
    shapes = [LayerShape(m.out_features, m.in_features,
                         m.weight.element_size() if isinstance(m, nn.Linear) else m.element_size, m.bias is not None)
              for m in mods]
    recovery_sets = [set(select_layers(inner, st.config.targets, st.config.ignore)) for st in recovery]
    reserved = [sum(st.reserved_bytes(s.out_features, s.in_features, s.element_size)
                    for st, chosen in zip(recovery, recovery_sets, strict=True) if n in chosen)
                for n, s in zip(names, shapes, strict=True)]
    sp = providers.get("sparsity")
    bits = providers.get("bits")
    build = {"scorer": getattr(sp.config, "scorer", "magnitude") if sp else "magnitude",
             "prune_scope": sp.config.resolved_scope() if sp and hasattr(sp.config, "resolved_scope") else "layer",
             "damping": getattr(bits.config, "damping", 1e-2) if bits else 1e-2,
             "rounding": getattr(bits.config, "rounding", "gptq") if (bits and calibrated) else "nearest",
             # the estimates round as the bits stage will
             "act_order": bool(getattr(bits.config, "act_order", False)) if bits else False,
             "clip_search": bool(getattr(bits.config, "clip_search", False)) if bits else False}
    return LayerPlanSetup(names, dims, shapes, reserved, build, providers, recovery)


def apply_layer_plan(inner: nn.Module, section: Any, rate: float, scope: str = "layers",
                     calibration_data: Iterable[Mapping[str, Any]] | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Plan bits x rank x sparsity per layer for ``rate`` and write the plan into ``section``; returns it.

    The dimensions are the stages' own (:func:`plan_roles`); each layer is planned over the
    dimensions whose stage targets it (a layer a stage ignores gets nothing from that stage). The
    cascade becomes one round of the sparsity stage (per-layer rates) -> the bits stage (S) -> the
    rank stage (per-layer ranks, fitted to what the rounded S leaves) -> the bits stage (the
    factors), then the recovery stages as configured; stages the plan does not use are left out.
    Errors are measured on ``calibration_data``: the batches the cascade fits on, without the gate's holdout.
    """
    fit = list(calibration_data) if calibration_data is not None else []  # the callers keep the holdout out
    calibrated = bool(fit)
    if section.cascade.plan_inputs == "weights":  # the estimates read the weights alone; the stages still calibrate
        fit = []
    setup = layer_plan_setup(inner, section, bool(fit))
    names, build = setup.names, setup.build
    mods = [inner.get_submodule(n) for n in names]
    weights = [m.weight.detach() if isinstance(m, nn.Linear) else m.effective_weight() for m in mods]
    sens = output_sensitivity(inner, names, fit) if fit else None
    if progress is not None and fit:
        progress("sensitivity", 1, 1)
    cfg = section.towers
    towers = plan_constraints(inner, names, cfg)  # protections by role, lifted by the probes
    probing = cfg.sensitivity and bool(cfg.protect) and bool(fit)
    estimate = probing and cfg.probe == "estimated" and bool(sens)
    probe_batches = fit[:cfg.batches]

    def lift(probes: Mapping[str, Mapping[str, float]], measured: bool = False) -> Mapping[str, int]:
        record = probe_record(inner, probes, cfg.probe_bits, per_tower, len(probe_batches), measured)
        towers["sensitivity"] = record
        towers["protection"], towers["min_bits"] = lift_protections(inner, names, cfg, record)
        return towers["min_bits"]

    # the calibration passes change a layer or a prefix at a time: the blocks before it are not run again
    stacks = find_stacks(inner, names)
    with BlockMemo(inner, stacks, slots=len(probe_batches)).active():
        dense_out = run_outputs(inner, probe_batches) if probing else None  # what every probe is compared with
        # measured before the sequential planner installs its provisional choices
        per_tower = tower_sensitivity(inner, names, probe_batches, cfg.probe_bits, dense_out) if probing else {}
        if probing and not estimate:
            lift(measured_probes(inner, names, probe_batches, cfg.probe_bits, progress, dense_out), measured=True)

    sequential = None
    if fit and section.cascade.plan_inputs == "sequential":
        sequential = SequentialInputs(inner, names, weights, fit, build, memo=BlockMemo(inner, stacks, slots=len(fit)))
    # second moments streamed in groups of layers: the planner reads each once, in order
    grams: Iterable[torch.Tensor | None] = (sequential.grams() if sequential is not None else
                                            iter_grams(inner, names, fit) if fit else [None] * len(names))
    try:
        plan = plan_layers(names, weights, grams, setup.shapes, rate, dims=setup.dims, reserved=setup.reserved,
                           sensitivity=[sens.get(n) for n in names] if sens else None,
                           rest_bytes=rest_bytes(inner, names), scope=scope, progress=progress,
                           on_layer=sequential.planned if sequential is not None else None,
                           min_bits=towers["min_bits"], probe_bits=cfg.probe_bits if estimate else None,
                           lift=lift if estimate else None, **build)
    finally:
        if sequential is not None:
            sequential.restore()
    plan["inputs"] = "sequential" if sequential is not None else ("dense" if fit else "none (weights only)")
    plan["towers"] = {k: v for k, v in towers.items() if k != "min_bits"}
    plan["towers"]["protection"]["released"] = plan.pop("released", [])
    write_plan(section, plan, setup.providers, setup.recovery, calibrated)
    log_plan(plan, rate)
    return plan


def log_plan(plan: Mapping[str, Any], rate: float) -> None:
    """One log line: how many layers took each choice, and the estimated error."""
    counts: dict[str, int] = {}
    for v in plan["layers"].values():
        counts[v["choice"]] = counts.get(v["choice"], 0) + 1
    log.info("rate %.4f planned per layer (%s): %s; estimated mean output error %.2e", rate,
             " x ".join(plan["dimensions"]), ", ".join(f"{k} x{c}" for k, c in sorted(counts.items(),
                                                                                   key=lambda kv: -kv[1])),
             plan["predicted_error"])


class SequentialInputs:
    """Second moments of each planned layer measured on the inputs the already planned layers produce.

    As GPTQ and SVD-LLM v2 do, a layer's candidates are scored on what the compressed prefix feeds
    it, not on the dense model's inputs, so errors that travel are seen where they arrive. Layers
    are read in execution (module) order in groups of up to ``group`` consecutive layers (about a
    transformer block; one calibration pass per group). After a group is scored, each of its layers
    gets a provisional choice, the one the knapsack picks over the layers planned so far with their
    share of the byte budget, and computes with it (:func:`~.planner.choice_weight`) while the
    later groups are measured. Departures: provisional choices are not revised when later layers
    are planned, and layers inside one group see the dense outputs of the layers before them in it.
    The model's own weights are put back by :meth:`restore`.
    """

    def __init__(self, inner: nn.Module, names: Sequence[str], weights: Sequence[torch.Tensor],
                 batches: Sequence[Mapping[str, Any]], build: Mapping[str, Any], group: int = 6,
                 max_bytes: int = 1 << 27, memo: BlockMemo | None = None) -> None:
        self.inner, self.names, self.weights, self.batches, self.build = inner, list(names), weights, batches, build
        self.memo = memo
        self.groups: list[list[int]] = []
        held = max_bytes
        for i, n in enumerate(self.names):
            size = 4 * inner.get_submodule(n).in_features ** 2
            if held + size > max_bytes or len(self.groups[-1]) >= group:
                self.groups.append([])
                held = 0
            self.groups[-1].append(i)
            held += size
        self.grams_held: dict[int, torch.Tensor] = {}
        self.originals: dict[str, nn.Parameter] = {}
        self.state: tuple[list[list[Choice]], float] | None = None
        self.dense_total = sum(w.numel() for w in weights)

    def grams(self) -> Iterator[torch.Tensor]:
        """Each layer's second moment, in order; a group is measured after the layers before it are installed."""
        # each layer running once per forward, every pass stops where its group has read its inputs
        once = bool(self.batches) and set(calls_per_forward(self.inner, self.names, self.batches[0]).values()) == {1}
        for k, group in enumerate(self.groups):
            if k:
                self._install(self.groups[k - 1])
            with self.memo.active() if self.memo is not None else contextlib.nullcontext():
                stats = collect_layer_stats(self.inner, [self.names[i] for i in group], self.batches, gram=True,
                                            once=once)
            for i in group:
                self.grams_held[i] = stats.pop(self.names[i]).gram
                yield self.grams_held[i]
            del stats

    def planned(self, i: int, options: list[list[Choice]], budget: float) -> None:
        """``plan_layers``' callback: the candidates of layers ``0..i`` are scored."""
        self.state = (options, budget)

    def _install(self, group: list[int]) -> None:
        options, budget = self.state
        done = len(options)
        share = sum(self.weights[j].numel() for j in range(done)) / max(self.dense_total, 1)
        try:
            sel = allocate(options, budget * share)
        except CompressionError:  # the prefix's share is below its floor: its smallest choices
            sel = [min(range(len(o)), key=lambda k, o=o: (o[k].nbytes, o[k].error)) for o in options]
        for i in group:
            mod = self.inner.get_submodule(self.names[i])
            c = options[i][sel[i]]
            if isinstance(mod, nn.Linear) and (c.keep_s is False or c.bits is not None or c.pruning_rate or c.rank):
                w = choice_weight(self.weights[i], self.grams_held.get(i), c, **self.build)
                self.originals.setdefault(self.names[i], mod.weight)
                mod.weight = nn.Parameter(w.to(mod.weight.dtype), requires_grad=False)
            self.grams_held.pop(i, None)
            release_memory()

    def restore(self) -> None:
        """Put the model's own weights back."""
        for n, p in self.originals.items():
            self.inner.get_submodule(n).weight = p
        self.originals.clear()
        self.grams_held.clear()
        if self.memo is not None:
            self.memo.clear()


#: how the end-to-end choice names each single-stage plan
SINGLE_LABELS = {"bits": "quant only", "rank": "low rank only", "sparsity": "sparsity only",
                 "bits+rank": "quant + low-rank correction"}


def alternative_sections(section: Any, plan: Mapping[str, Any], calibrated: bool) -> dict[str, Any]:
    """The single-stage plans of ``plan`` (``plan["alternatives"]``) as sections to run: label -> section.

    ``section`` is the compression section as it was before the plan was written into it. Each
    alternative runs the stage of its one dimension (its factors rounded by the bits stage where the
    plan says so), no recovery: the cascade measures each on the holdout after the plan's own steps
    and keeps the best (:class:`~rcc_compression.compression.cascade.CascadePipeline`, ``alternatives``).
    """
    out: dict[str, Any] = {}
    for dim, alt in (plan.get("alternatives") or {}).items():
        if "layers" not in alt:
            continue
        sec = section.model_copy(deep=True)
        providers, _ = plan_roles(sec, list(sec.cascade.stages))
        write_plan(sec, dict(alt), providers, [], calibrated)
        out[SINGLE_LABELS.get(dim, dim)] = sec
    return out


def write_plan(section: Any, plan: dict[str, Any], providers: Mapping[str, Stage], recovery: Sequence[Stage],
                calibrated: bool) -> None:
    """Each stage writes its part of ``plan`` into its config; the cascade becomes the planned steps, one round."""
    layers = plan["layers"]
    planned: list[str] = []
    sp, bits, rank = providers.get("sparsity"), providers.get("bits"), providers.get("rank")
    if sp is not None and sp.apply_plan(layers, calibrated):
        planned.append(sp.name)
    if bits is not None and bits.apply_plan(layers, calibrated):
        planned.append(bits.name)
    if rank is not None and rank.apply_plan(layers, calibrated):
        planned.append(rank.name)
        if bits is not None and any(v["factor_bits"] is not None for v in layers.values() if v["rank"]):
            planned.append(bits.name)
    planned += [st.name for st in recovery]
    section.cascade.stages = planned or ([bits.name] if bits is not None else list(section.cascade.stages))
    section.cascade.rounds = 1
    plan["stages"] = list(section.cascade.stages)


def achieved_rate(inner: nn.Module, scope: str) -> float:
    """The compression rate the model stores now, of its compressed layers or of the whole model."""
    return _achieved_rate(inner, scope)


def _achieved_rate(inner: nn.Module, scope: str) -> float:
    s = compression_summary(inner)
    if scope != "model":
        return s["compression_rate"]
    rest = rest_bytes(inner, compressed_layers(inner))
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
    rest = rest_bytes(inner, names)
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
