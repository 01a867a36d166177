"""The per-layer plan of a model read a block at a time: statistics streamed, one global allocation, block budgets.

The same plan the whole planner makes (:func:`.rate.apply_layer_plan`), reorganised so no more
than a block is resident: each block is read once, its layers' second moments are gathered on the
inputs the planned prefix feeds it (``cascade.plan_inputs: sequential``, each earlier block
computing with its provisional choices, as the whole planner's
:class:`~.rate.SequentialInputs`; ``dense``: the dense model's; ``weights``: none, the weights
alone), and its candidates are scored (:func:`.planner.score_layer`) and kept: a few dozen
``(bytes, error)`` pairs per layer. After the last block one allocation over every layer
(:func:`.planner.finish_plan`) picks each layer's storage, which sets each block's byte budget
(``plan["blocks"]``) for the compression pass.

With calibration data, each layer's errors are weighed by its output sensitivity as the whole
planner weighs them, computed in a forward and a reverse sweep over the blocks (:mod:`.streamsens`).
The towers' protections are lifted, as the whole planner lifts them, by a first-order estimate of
each layer's probe rounding's effect on the outputs (from the same output sensitivity). Departures
from the whole planner, recorded in the plan: each tower's probe is not measured, and the
single-stage alternatives are listed but not measured end to end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CompressionError
from ..utils.io import atomic_save_safetensors, atomic_write_json, load_safetensors
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from .blocks import BlockView, Stack
from .calibration import collect_layer_stats
from .placement import CheckpointSource, ResidentSource
from .planner import Choice, allocate, choice_weight, finish_plan, plan_budget, probe_estimate, score_layer
from .rate import LayerPlanSetup, layer_plan_setup, log_plan, write_plan
from .streamsens import streamed_sensitivity
from .towers import lift_protections, plan_constraints, probe_record
from .walk import Walk, block_forward

log = get_logger("streamplan")


def _choice_dict(c: Choice) -> dict[str, Any]:
    return dataclasses.asdict(c)


@dataclass
class SurveySettings:
    """What the survey reads of the run: the ``compression`` section (the plan is written into it), the
    calibration batches, the rate and its scope, the compute device, the run's state directory (``None``:
    nothing persisted), and the callbacks that commit progress and report it."""

    section: Any
    fit: list[dict[str, Any]]
    rate: float
    scope: str
    device: torch.device
    state_dir: Path | None
    write_progress: Callable[[dict[str, Any]], None]
    report: Callable[[str, int, int], None]


class Survey:
    """One planning pass over the blocks (see the module docstring); :meth:`run` returns the plan."""

    def __init__(self, pipe: SurveySettings, source: CheckpointSource | ResidentSource, names: Sequence[str],
                 stacks: Sequence[Stack], devices: Mapping[str, torch.device]) -> None:
        self.pipe, self.source, self.stacks, self.devices = pipe, source, list(stacks), devices
        cascade = pipe.section.cascade
        self.calibrated = bool(pipe.fit) and cascade.plan_inputs != "weights"
        self.inputs = cascade.plan_inputs if self.calibrated else "weights"
        self.setup: LayerPlanSetup = layer_plan_setup(source.model, pipe.section, self.calibrated)
        keep = set(names)
        self.index = {n: i for i, n in enumerate(self.setup.names) if n in keep}
        planned = list(self.index)
        self.shapes = {n: self.setup.shapes[i] for n, i in self.index.items()}
        self.total = sum(s.out_features * s.in_features for s in self.shapes.values())
        self.towers = plan_constraints(source.model, planned, pipe.section.towers)  # by role
        #: per layer, the probe rounding's estimated effect on the outputs (what lifts protections)
        self.probes: dict[str, dict[str, Any]] = {}
        self.rest = _rest_bytes(source.model, planned)
        reserved = [self.setup.reserved[i] for i in self.index.values()]
        self.budget = plan_budget(list(self.shapes.values()), pipe.rate, reserved, self.rest, pipe.scope)[0]
        self.options: dict[str, list[Choice]] = {}
        self.full: dict[str, list[Choice]] = {}
        self.blocks: dict[str, list[str]] = {}
        self.root = pipe.state_dir / "survey" if pipe.state_dir is not None else None
        #: per layer, its output sensitivity per output channel (``None``: errors are each layer's own)
        self.sensitivity: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- one block
    def _layers(self, block: str) -> list[str]:
        return [n for n in self.index if n.startswith(f"{block}.")]

    def _score(self, block_name: str, block: nn.Module, grams: Mapping[str, torch.Tensor | None]) -> None:
        min_bits = self.towers["min_bits"]
        for n in self._layers(block_name):
            mod = block.get_submodule(n[len(block_name) + 1:])
            w = mod.weight.detach() if isinstance(mod, nn.Linear) else mod.effective_weight()
            dims = self.setup.dims[self.index[n]]
            weight = self.sensitivity.get(n) if self.sensitivity is not None else None
            opts, full = score_layer(w, grams.get(n), self.shapes[n], dims, min_bits=min_bits.get(n),
                                     row_weight=weight, **self.setup.build)
            self.options[n] = opts
            if full is not None:
                self.full[n] = full
            if weight is not None and grams.get(n) is not None:
                self.probes[n] = probe_estimate(w, grams[n], weight, self.pipe.section.towers.probe_bits)
            release_memory()
        self.blocks[block_name] = self._layers(block_name)

    def _provisional(self, block_name: str, block: nn.Module, grams: Mapping[str, torch.Tensor | None]) -> nn.Module:
        """A copy of the block computing with the choices the prefix's share of the budget gives its layers."""
        names = list(self.options)
        share = sum(self.shapes[n].out_features * self.shapes[n].in_features for n in names) / max(self.total, 1)
        options = [self.options[n] for n in names]
        try:
            sel = allocate(options, self.budget * share)
        except CompressionError:  # the prefix's share is below its floor: its smallest choices
            sel = [min(range(len(o)), key=lambda k, o=o: (o[k].nbytes, o[k].error)) for o in options]
        prov = copy.deepcopy(block)
        for n, k in zip(names, sel, strict=True):
            if n not in self.blocks[block_name]:
                continue
            c = self.options[n][k]
            mod = prov.get_submodule(n[len(block_name) + 1:])
            if isinstance(mod, nn.Linear) and (c.keep_s is False or c.bits is not None or c.pruning_rate or c.rank):
                w = choice_weight(mod.weight, grams.get(n), c, **self.setup.build)
                mod.weight = nn.Parameter(w.to(mod.weight.dtype), requires_grad=False)
        return prov

    def _block(self, walk: Walk | None, stack: Stack, name: str) -> None:
        device = self.devices[name]
        block = self.source.materialize(name, device)
        grams: dict[str, torch.Tensor | None] = {}
        if walk is not None:
            batches = walk.batches(stack, "plan")
            walk.note_output_kind(stack, block, batches[0], device)
            stats = collect_layer_stats(BlockView(name, block), self._layers(name), batches, gram=True, device=device)
            grams = {n: st.gram for n, st in stats.items()}
            del stats
        self._score(name, block, grams)
        if walk is not None:
            runner = self._provisional(name, block, grams) if self.inputs == "sequential" else block
            for j, y in enumerate(block_forward(runner, walk.batches(stack, "plan"), device)):
                walk.boundary.put("plan", j, y.cpu())
            del runner
        del block, grams
        self.source.release(name)
        release_memory()

    # ---------------------------------------------------------------- progress
    def _save_block(self, g: int, name: str) -> None:
        if self.root is None:
            return
        atomic_write_json(self.root / "blocks" / f"{g:05d}.json", {"block": name, "layers": {
            n: {"options": [_choice_dict(c) for c in self.options[n]],
                "full": [_choice_dict(c) for c in self.full[n]] if n in self.full else None,
                "probe": self.probes.get(n)}
            for n in self.blocks[name]}})

    def _load_blocks(self, upto: int) -> None:
        for g in range(upto):
            path = self.root / "blocks" / f"{g:05d}.json"
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: the survey's record of block {g} is unreadable ({exc}); start the "
                                      "run again") from None
            self.blocks[data["block"]] = list(data["layers"])
            for n, v in data["layers"].items():
                self.options[n] = [Choice(**c) for c in v["options"]]
                if v["full"] is not None:
                    self.full[n] = [Choice(**c) for c in v["full"]]
                if v.get("probe") is not None:
                    self.probes[n] = v["probe"]

    # ---------------------------------------------------------------- output sensitivity
    def _sensitivity(self, progress: dict[str, Any]) -> None:
        """The output-gradient weights of every layer (:mod:`.streamsens`), once; kept in the run directory."""
        if not self.calibrated:
            return
        path = self.root / "sensitivity.safetensors" if self.root is not None else None
        if progress.get("sensitivity") == "done" and path is not None and path.is_file():
            self.sensitivity = load_safetensors(path)
        elif progress.get("sensitivity") != "none":
            self.sensitivity = streamed_sensitivity(
                self.source, self.stacks, list(self.index), self.pipe.fit, self.pipe.device, self.devices,
                self.root / "sensitivity" if self.root is not None else None,
                self.pipe.section.cascade.activation_buffer_mb << 20, report=self.pipe.report)
            if self.sensitivity is not None and path is not None:
                atomic_save_safetensors(self.sensitivity, path)
                shutil.rmtree(self.root / "sensitivity", ignore_errors=True)
            progress["sensitivity"] = "none" if self.sensitivity is None else "done"
            self.pipe.write_progress(progress)
        if self.sensitivity is not None and set(self.sensitivity) != set(self.index):
            self.sensitivity = None  # a layer the outputs do not reach: weigh every layer alike

    # ---------------------------------------------------------------- protections
    def _protections(self, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, int]]:
        """The towers' protections of the planned layers, lifted where the probe estimate shows a protected
        layer matters no more than the median unprotected one (:func:`.towers.lift_protections`), most important
        first; a lifted layer is planned over all of its candidates."""
        cfg = self.pipe.section.towers
        record = self._probe_record() if (self.probes and cfg.sensitivity and cfg.protect) else None
        protection, min_bits = lift_protections(self.source.model, names, cfg, record)
        for n in protection["lifted"]:
            if n in self.full:
                self.options[n] = self.full.pop(n)
        return protection, {n: b for n, b in min_bits.items() if n in self.options}

    def _probe_record(self) -> dict[str, Any]:
        return probe_record(self.source.model, self.probes, self.pipe.section.towers.probe_bits)

    # ---------------------------------------------------------------- the pass
    def run(self, progress: dict[str, Any]) -> dict[str, Any]:
        self._sensitivity(progress)
        next_block = int(progress.get("next_block", 0)) if progress.get("phase") == "survey" else 0
        order = list(progress.get("stacks_done", [])) if next_block else []
        walk = None
        if self.calibrated:
            walk = Walk(self.source.model, self.stacks, {"plan": self.pipe.fit}, self.pipe.device,
                        self.root / "streams" if self.root is not None else None,
                        self.pipe.section.cascade.activation_buffer_mb << 20)
        if next_block:
            self._load_blocks(next_block)
            if walk is not None:
                walk.reopen_finals(order)
                walk.hub.tuples.update(progress.get("tuples", {}))
                walk.boundary.reopen(next_block)
        total = sum(len(s.blocks) for s in self.stacks)
        g = sum(len(s.blocks) for s in self.stacks if s.name in order)
        todo = [s for s in self.stacks if s.name not in order]
        while todo:
            stack = walk.begin_stack(fresh=next_block <= g) if walk is not None else todo[0]
            for name in stack.blocks:
                if g >= next_block:
                    self._block(walk, stack, name)
                    self._save_block(g, name)
                    progress.update(phase="survey", next_block=g + 1, stacks_done=order,
                                    tuples=walk.hub.tuples if walk is not None else {})
                    self.pipe.write_progress(progress)
                    if walk is not None:
                        walk.boundary.advance()
                    self.pipe.report(f"survey {g + 1}/{total} {name}", g + 1, total)
                g += 1
            if walk is not None:
                walk.end_stack(stack)
            order.append(stack.name)
            todo = [s for s in self.stacks if s.name not in order]
            progress.update(stacks_done=order)
            self.pipe.write_progress(progress)
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        names = [n for b in self.blocks.values() for n in b]  # in the order they were scored
        idx = [self.index[n] for n in names]
        protection, min_bits = self._protections(names)
        plan = finish_plan(names, [self.options[n] for n in names],
                           {i: self.full[n] for i, n in enumerate(names) if n in self.full},
                           [self.shapes[n] for n in names], self.pipe.rate, dims=[self.setup.dims[i] for i in idx],
                           reserved=[self.setup.reserved[i] for i in idx], rest_bytes=self.rest, scope=self.pipe.scope,
                           rounding=self.setup.build["rounding"], weighted=self.sensitivity is not None,
                           min_bits=min_bits)
        plan["inputs"] = {"sequential": "sequential", "dense": "dense"}.get(self.inputs, "none (weights only)")
        plan["towers"] = {"sensitivity": self._probe_record() if self.probes else None,
                          "protection": {**protection, "released": plan.pop("released", [])}}
        plan["blocks"] = {b: {"budget": sum(plan["layers"][n]["bytes"] for n in layers),
                              "dense": sum(plan["layers"][n]["dense_bytes"] for n in layers)}
                          for b, layers in self.blocks.items()}
        plan["pipeline"] = ("sequential: candidates scored a block at a time, one allocation over every layer; "
                            + ("output-gradient weights streamed a block at a time" if self.sensitivity is not None
                               else "errors per layer (no output-gradient weights)")
                            + "; protections by role (not measured); the single-stage alternatives not measured "
                              "end to end")
        write_plan(self.pipe.section, plan, self.setup.providers, self.setup.recovery, bool(self.pipe.fit))
        log_plan(plan, self.pipe.rate)
        return plan


def _rest_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes of the model's tensors outside ``names`` (meta or not; each tensor once)."""
    skip = tuple(f"{n}." for n in names)
    seen: set[int] = set()
    total = 0
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if key.startswith(skip) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def survey(settings: SurveySettings, source: CheckpointSource | ResidentSource, names: Sequence[str],
           stacks: Sequence[Stack], devices: Mapping[str, torch.device], progress: dict[str, Any]) -> dict[str, Any]:
    """Plan ``settings.rate`` over the layers ``names`` a block at a time; writes the plan into the section."""
    return Survey(settings, source, names, stacks, devices).run(progress)


__all__ = ["Survey", "SurveySettings", "survey"]
