"""Per-tower budgets: bytes and quality per tower, measured sensitivity, and which layers keep precision.

A vision-language model is several networks in one (:mod:`rcc_compression.models.towers`): a
vision tower, a text tower or a language model, and the projector between them. They do not
tolerate compression alike, so a run measures them apart:

* :func:`tower_bytes`: dense and stored bytes of every tower (every parameter and buffer counted
  once, in the tower its module belongs to), which sum to what the checkpoint stores;
* :func:`tower_sensitivity` and :func:`probe_record`: each tower's layers rounded to a probe format
  together and the relative error that causes in the model's outputs (measured), and each layer's
  probe error per unit of its own output error, estimated to first order from the planner's
  output sensitivity (the record of where a model is fragile);
* :func:`protected_layers`: the layers the defaults keep at ``protect_bits`` or more (the patch
  embedding, the projector, the first and last block of every stack) unless the estimate shows
  they matter no more than a typical layer ("lifted", with the numbers recorded); the planner
  releases the least sensitive where the rate needs their bytes, and the plan without them is
  measured end to end beside the protected one (the protections are a prior, not a rule);
* :func:`tower_quality`: the output agreement of the model with only one tower compressed, so
  a run says which tower its loss comes from.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..models.registry import unwrap_model
from ..models.towers import TOWERS, classify_modules, family, tower_of
from ..utils.io import split_aliases
from ..utils.schema import StrictModel
from .calibration import PRIMARY_OUTPUTS, output_agreement, relative_output_error, run_outputs
from .layers import compressed_layers, replace_module
from .offload import materialize
from .quant import quantize_nearest
from .storage import dense_bytes, stored_bytes

ROLES = ("patch_embedding", "projector", "first_block", "last_block", "embedding", "head")


class TowerBudgetConfig(StrictModel):
    """``compression.towers``: how a rate plan treats the towers of a vision-language model."""

    protect: list[Literal["patch_embedding", "projector", "first_block", "last_block", "embedding", "head"]] = Field(
        default_factory=lambda: ["patch_embedding", "projector", "first_block", "last_block"],
        description="roles whose Linear layers keep protect_bits or more (no pruning, no low rank alone)")
    protect_bits: int = Field(8, ge=2, le=16, description="fewest bits a protected layer may be stored with")
    sensitivity: bool = Field(True, description="in a rate plan, find each layer's and each tower's effect on the "
                                                "outputs of a probe rounding; lift protections it shows idle")
    probe: Literal["measured", "estimated"] = Field(
        "measured", description="measured: each layer rounded alone, a forward pass per layer (the better "
                                "plans); estimated: to first order from the planner's output sensitivity, no pass "
                                "(faster; what the sequential pipeline does)")
    lift: Literal["median", "never"] = Field(
        "median", description="median: a protected layer whose probe sensitivity is at most the median of the "
                              "unprotected layers' is planned like any other; never: always protected")
    probe_bits: int = Field(4, ge=2, le=8, description="bits of the round-to-nearest probe")
    batches: int = Field(1, ge=1, description="calibration batches the measured probes read")


# ------------------------------------------------------------------------------------------- bytes
def tower_bytes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Dense and stored bytes, and layer counts, of every tower; the towers sum to the whole model.

    A compressed layer counts its stored form (what the checkpoint writes) against the dense layer
    it replaced; every other tensor of the ``state_dict`` counts once (tied tensors once, in the
    tower of the first name that holds them), in both columns.
    """
    inner = unwrap_model(model)
    kind = family(inner)
    layers = compressed_layers(inner)
    out: dict[str, dict[str, Any]] = {}

    def entry(tower: str) -> dict[str, Any]:
        return out.setdefault(tower, {"dense_bytes": 0, "stored_bytes": 0, "compressed_layers": 0,
                                      "linear_layers": 0})

    for name, layer in layers.items():
        e = entry(tower_of(kind, name))
        e["dense_bytes"] += dense_bytes(layer)
        e["stored_bytes"] += stored_bytes(layer)
        e["compressed_layers"] += 1
    for name, mod in inner.named_modules():
        if isinstance(mod, nn.Linear):
            entry(tower_of(kind, name))["linear_layers"] += 1
    for name in layers:
        entry(tower_of(kind, name))["linear_layers"] += 1
    skip = tuple(f"{n}." for n in layers)
    tensors, _ = split_aliases({k: t for k, t in inner.state_dict().items() if not k.startswith(skip)})
    for key, t in tensors.items():
        e = entry(tower_of(kind, key))
        e["dense_bytes"] += t.numel() * t.element_size()
        e["stored_bytes"] += t.numel() * t.element_size()
    for e in out.values():
        e["rate"] = 1.0 - e["stored_bytes"] / e["dense_bytes"] if e["dense_bytes"] else 0.0
    return {t: out[t] for t in TOWERS if t in out}


# ------------------------------------------------------------------------------------- sensitivity
def _probe(weight: torch.Tensor, bits: int) -> torch.Tensor:
    return quantize_nearest(weight.detach().float(), bits, None, False).dequantize(torch.float32).to(weight.dtype)


def _weight_of(mod: nn.Module) -> torch.Tensor:
    return mod.weight if isinstance(mod, nn.Linear) else mod.effective_weight()


def primary_error(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``||s - t||^2 / ||t||^2`` of the outputs the gate compares (embeddings, logits), averaged over them."""
    keys = [k for k in PRIMARY_OUTPUTS if k in teacher] or list(teacher)
    return relative_output_error({k: student[k] for k in keys if k in student}, {k: teacher[k] for k in keys})


@torch.no_grad()
def _perturbed_error(inner: nn.Module, names: Sequence[str], probe_bits: int, batches: Sequence[Mapping[str, Any]],
                     dense_out: Sequence[Mapping[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """(relative error of the model's outputs, each layer's own relative output error) with ``names`` probed."""
    originals: dict[str, nn.Module] = {}
    layer_err: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}
    hooks = []
    for n in names:
        mod = inner.get_submodule(n)
        originals[n] = mod
        w = _weight_of(mod).detach()
        probe = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        probe.weight.copy_(_probe(w, probe_bits))
        if mod.bias is not None:
            probe.bias.copy_(mod.bias.detach())

        def hook(m: nn.Module, args: tuple[Any, ...], y: torch.Tensor, n: str = n, w: torch.Tensor = w) -> None:
            ref = nn.functional.linear(args[0], w, m.bias)
            layer_err[n][0] += float((y - ref).float().pow(2).sum())
            layer_err[n][1] += float(ref.float().pow(2).sum())

        hooks.append(probe.register_forward_hook(hook))
        replace_module(inner, n, probe)
    try:
        outs = run_outputs(inner, batches)
    finally:
        for h in hooks:
            h.remove()
        for n, mod in originals.items():
            replace_module(inner, n, mod)
    err = float(torch.stack([primary_error(s, t) for s, t in zip(outs, dense_out, strict=True)]).mean())
    return err, {n: (a / b if b > 0 else 0.0) for n, (a, b) in layer_err.items()}


@torch.no_grad()
def tower_sensitivity(model: nn.Module, names: Sequence[str], batches: Sequence[Mapping[str, Any]],
                      probe_bits: int = 4, dense_out: Sequence[Mapping[str, torch.Tensor]] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """Each tower's layers of ``names`` rounded to ``probe_bits`` together: the relative error of the
    model's primary outputs (those the gate compares: :func:`primary_error`), measured (one pass per tower).
    Empty for a model of one tower (there is nothing to compare it with). ``dense_out``: the dense outputs on
    ``batches`` when already computed."""
    inner = unwrap_model(model)
    kind = family(inner)
    members = {t: [n for n in names if tower_of(kind, n) == t] for t in TOWERS}
    members = {t: m for t, m in members.items() if m}
    if len(members) < 2:
        return {}
    batches = list(batches)
    dense_out = dense_out if dense_out is not None else run_outputs(inner, batches)
    return {t: {"layers": len(m), "output_error": _perturbed_error(inner, m, probe_bits, batches, dense_out)[0]}
            for t, m in members.items()}


@torch.no_grad()
def measured_probes(model: nn.Module, names: Sequence[str], batches: Sequence[Mapping[str, Any]],
                    probe_bits: int = 4, progress: Any = None,
                    dense_out: Sequence[Mapping[str, torch.Tensor]] | None = None) -> dict[str, dict[str, float]]:
    """Each layer of ``names`` rounded to ``probe_bits`` alone (a forward pass per layer): the relative
    error of the model's primary outputs (``output_error``, :func:`primary_error`), of the layer's own output on
    the same inputs (``layer_error``) and ``weight = output_error / layer_error``, what protections are lifted and
    released by. ``dense_out``: the dense outputs on ``batches`` when already computed."""
    inner = unwrap_model(model)
    batches = list(batches)
    dense_out = dense_out if dense_out is not None else run_outputs(inner, batches)
    layers: dict[str, dict[str, float]] = {}
    for i, n in enumerate(names):
        out_err, own = _perturbed_error(inner, [n], probe_bits, batches, dense_out)
        layers[n] = {"output_error": out_err, "layer_error": own[n],
                     "weight": out_err / own[n] if own[n] > 1e-12 else 0.0}
        if progress is not None:
            progress("sensitivity", i + 1, len(names))
    return layers


def probe_record(model: nn.Module, probes: Mapping[str, Mapping[str, float]], probe_bits: int,
                 towers: Mapping[str, Any] | None = None, batches: int = 0, measured: bool = False
                 ) -> dict[str, Any]:
    """The sensitivity record of a plan: each layer's probe, measured (:func:`measured_probes`) or estimated
    (:func:`~.planner.probe_estimate`), and, when measured, each tower's (:func:`tower_sensitivity`)."""
    kind = family(unwrap_model(model))
    how = ("measured (a forward pass per layer)" if measured else
           "estimated to first order from the output sensitivity (the planner's own weighting)")
    return {"probe": f"int{probe_bits} round to nearest, one scale per row; each layer's effect on the outputs "
                     f"{how}, each tower's measured",
            "batches": batches,
            "layers": {n: {"tower": tower_of(kind, n), **v} for n, v in probes.items()},
            "towers": dict(towers or {})}


def lift_protections(model: nn.Module, names: Sequence[str], config: TowerBudgetConfig,
                     record: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, int]]:
    """The protections of ``names`` (:func:`protected_layers`) lifted by the sensitivity ``record``, and the
    planner's ``min_bits``: the protected layers, most sensitive first (the planner releases from the end)."""
    protection = protected_layers(model, names, config, record)
    if record is not None:
        weight = {n: float(v["weight"]) for n, v in record["layers"].items()}
        order = sorted(protection["protected"], key=lambda n: -weight.get(n, 0.0))
    else:
        rank = {r: i for i, r in enumerate(("projector", "patch_embedding", "first_block", "last_block"))}
        order = sorted(protection["protected"], key=lambda n: rank.get(protection["protected"][n], len(rank)))
    return protection, dict.fromkeys(order, config.protect_bits)


# -------------------------------------------------------------------------------------- protection
def protected_layers(model: nn.Module, names: Sequence[str], config: TowerBudgetConfig,
                     sensitivity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Which of ``names`` keep ``protect_bits`` or more, and why; which protections were lifted, and why.

    A layer is protected by its role (``config.protect``). With a sensitivity measurement and
    ``lift: median``, a protected layer whose weight is at most the median weight of the
    unprotected layers is planned like the others: the measurement shows its precision does not
    matter more than theirs. Roles that hold no Linear layer (the patch embedding is a convolution)
    are reported as such.
    """
    inner = unwrap_model(model)
    places = classify_modules(inner)
    wanted = set(config.protect)
    by_role = {n: places[n].position for n in names if n in places}
    candidates = {n: r for n, r in by_role.items() if r in wanted or (r == "projector" and "projector" in wanted)}
    lifted: dict[str, str] = {}
    if sensitivity is not None and config.lift == "median":
        weights = {n: float(v["weight"]) for n, v in sensitivity["layers"].items()}
        others = [weights[n] for n in names if n not in candidates and n in weights]
        if others:
            median = statistics.median(others)
            for n in list(candidates):
                if n in weights and weights[n] <= median:
                    lifted[n] = (f"sensitivity {weights[n]:.3g} <= median {median:.3g} of the unprotected layers")
    protected = {n: r for n, r in candidates.items() if n not in lifted}
    unmatched = {}
    for role in sorted(wanted):
        holders = [n for n, p in places.items() if p.position == role]
        if not any(h in by_role for h in holders):
            kinds = sorted({type(inner.get_submodule(h)).__name__ for h in holders})
            unmatched[role] = (f"no compressed Linear layer has this role ({', '.join(kinds)}: left as it is)"
                               if holders else "the model has no such module")
    return {"protected": protected, "lifted": lifted, "roles_without_targets": unmatched,
            "bits": config.protect_bits}


# ---------------------------------------------------------------------------------------- quality
@torch.no_grad()
def tower_quality(compressed: nn.Module, dense: nn.Module, batches: Sequence[Mapping[str, Any]]
                  ) -> dict[str, dict[str, float]]:
    """Output agreement with the dense model when only one tower's layers are compressed, per tower.

    ``dense`` is the dense model (its Linear layers where ``compressed`` has compressed ones);
    ``batches`` the held-out batches the gate reads. Also ``all``: every tower compressed.
    """
    comp = unwrap_model(compressed)
    den = unwrap_model(dense)
    kind = family(comp)
    layers = compressed_layers(comp)
    if not layers or not batches:
        return {}
    teacher = run_outputs(den, batches)
    out: dict[str, dict[str, float]] = {}
    every = output_agreement(run_outputs(comp, batches), teacher)
    for t in TOWERS:
        members = {n for n in layers if tower_of(kind, n) == t}
        if not members:
            continue
        if len(members) == len(layers):  # the one tower with compressed layers: that is the whole model
            out[t] = {"agreement": every, "layers": len(members)}
            continue
        probe = copy.deepcopy(comp)
        for n in layers:
            if n not in members:
                replace_module(probe, n, copy.deepcopy(den.get_submodule(n)))
        out[t] = {"agreement": output_agreement(run_outputs(probe, batches), teacher), "layers": len(members)}
        del probe
    out["all"] = {"agreement": every, "layers": len(layers)}
    return out


def tower_record(compressed: nn.Module, dense: nn.Module | None, holdout: Sequence[Mapping[str, Any]]
                 ) -> dict[str, dict[str, Any]]:
    """Per tower: dense and stored bytes, layer counts, and (with a dense model and held-out batches)
    the output agreement with only that tower compressed (``agreement_alone``)."""
    record = tower_bytes(compressed)
    if dense is not None and holdout:
        for tower, q in tower_quality(compressed, materialize(dense), holdout).items():
            if tower in record:
                record[tower]["agreement_alone"] = q["agreement"]
    return record


def plan_constraints(model: nn.Module, names: Sequence[str], config: TowerBudgetConfig) -> dict[str, Any]:
    """The protections of ``names`` (the layers a rate plan covers) by role, before any measurement.

    Returns ``{"sensitivity": None, "protection": ..., "min_bits": {layer: bits}}``; ``min_bits`` is
    what the planner reads (a protected layer's storage keeps at least that many bits, unpruned, with
    its own values: no choice that drops S for low rank alone). The planner lifts protections by its
    probe estimates once the layers are scored (:func:`lift_protections`).
    """
    protection, min_bits = lift_protections(model, names, config, None)
    return {"sensitivity": None, "protection": protection, "min_bits": min_bits}
