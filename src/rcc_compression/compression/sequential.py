"""The sequential pipeline: a model compressed one transformer block at a time, peak memory flat in depth.

The whole cascade (:mod:`.cascade`) holds the model, its compressed copy and the teacher's outputs
(about 2.8x the model's bytes). A model bigger than memory is compressed here instead, block by block:

1. the model is built on the meta device and every tensor outside the blocks is read
   (:class:`.placement.CheckpointSource`; a model already in memory is used as it is);
2. with a target rate, a *survey* reads each block once and scores its layers' candidates on the
   inputs the planned prefix produces (:mod:`.streamplan`); one allocation over every layer gives
   each layer its storage and each block its byte budget;
3. the *compression pass* reads each block again, runs the planned stages on it alone
   (:class:`.blocks.BlockView`: statistics on the dense model's inputs to the block, as the whole
   cascade's; recovery distils the block against the dense block's outputs), writes it to the
   checkpoint (:class:`.shards.ShardWriter`) and gives it back: only one block is materialised at a time;
4. the held-out batches are carried through the dense and the compressed blocks, and at the end
   the model's outputs on them (every stack replayed from its last output) are the gate's.

Calibration activations between blocks are a bounded buffer (:mod:`.streams`); with a run
directory they are files, and ``progress.json`` names the last block written, so a killed run
resumes at the next block and reaches the same checkpoint. Each block's time, peak resident set
and bytes are recorded and reported to the progress display.

What needs the whole model is not done here, and the records say so: the gate cannot roll a
finished block back (a failing gate is reported, the checkpoint kept), the end-to-end choice
between the plan and its single-stage alternatives is not measured, and the planner weighs each
layer by its own output error (the output-gradient weights and the towers' measured sensitivity
need a backward pass through the whole model; protections apply by role).
"""

from __future__ import annotations

import copy
import gc
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CompressionError
from ..models.base import ModelWrapper
from ..utils.io import atomic_write_json, directory_lock, remove_stale_temp_files
from ..utils.logging import get_logger
from ..utils.memory import peak_resident_bytes, release_memory, resident_bytes
from .blocks import BlockView, Stack, block_of, find_stacks
from .calibration import flatten_outputs, mean_interval, output_agreement, sample_output_errors
from .layers import CompressedLinear, compressed_layers, replace_module, to_inference
from .offload import TeacherWeights
from .placement import CheckpointSource, ResidentSource, block_devices, check_supported
from .rate import layer_plan_setup, write_plan
from .registry import CascadeConfig, CompressionSection, build_stage
from .shards import ShardWriter
from .stage import CompressionContext, Distiller, Stage, scale_reserve
from .storage import dense_bytes, stored_bytes
from .streamplan import SurveySettings, survey
from .walk import Walk, block_forward

log = get_logger("sequential")

PROGRESS_FILE = "progress.json"
#: where a run directory keeps the pipeline's own state (progress, streams, the checkpoint being built)
STATE_DIR = "sequential"
GIB = 2**30
Source = CheckpointSource | ResidentSource


@dataclass
class BlockContext(CompressionContext):
    """A stage's context for one block: the dense block's outputs on the calibration and held-out
    batches are computed once by the pipeline (they are also the next block's dense inputs)."""

    fit_targets: list[dict[str, torch.Tensor]] = field(default_factory=list)
    holdout_targets: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def teacher_outputs(self) -> list[dict[str, torch.Tensor]]:
        return self.fit_targets

    def teacher_holdout(self) -> list[dict[str, torch.Tensor]]:
        return self.holdout_targets


@dataclass
class SequentialResult:
    """What a sequential run produced: the model (resident: compressed; from a checkpoint: its skeleton),
    the per-block records, the plan, the gate, the checkpoint written (``None`` without an output directory)."""

    model: nn.Module
    blocks: list[dict[str, Any]]
    plan: dict[str, Any] | None
    gate: dict[str, Any]
    checkpoint: Path | None
    manifest: dict[str, Any] | None
    notes: list[str]


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


class SequentialPipeline:
    """Compress a model a block at a time (see the module docstring).

    ``section``: the ``compression`` section (its stages, as ``compress_model`` plans them with
    ``rate``); ``calibration_data``/``holdout_data``: model inputs (the holdout scores the gate);
    ``run_dir``: where progress, streams and the checkpoint being built live (resumable);
    ``output_dir``: where the finished checkpoint goes (default ``run_dir/compressed``; without
    either, nothing is written and only a resident model can be compressed); ``distill``: the
    distiller recovery stages call (block-wise); ``block_callback(record)`` is called after each block.
    """

    def __init__(self, section: Any = None, *, calibration_data: Iterable[Mapping[str, Any]] | None = None,
                 holdout_data: Iterable[Mapping[str, Any]] | None = None, rate: float | None = None,
                 scope: str = "layers", run_dir: str | Path | None = None, output_dir: str | Path | None = None,
                 seed: int = 0, device: str | torch.device | None = None, distill: Distiller | None = None,
                 progress_callback: Callable[[str, int, int], None] | None = None,
                 block_callback: Callable[[dict[str, Any]], None] | None = None,
                 run_config: dict[str, Any] | None = None, encrypt_key: bytes | None = None,
                 max_memory: Mapping[int | str, int | str] | None = None) -> None:
        if section is None or isinstance(section, dict):
            section = CompressionSection.model_validate(section or {})
        self.section = section
        self.cascade: CascadeConfig = section.cascade
        self.fit = list(calibration_data or [])
        self.holdout = list(holdout_data or [])
        self.rate, self.scope = rate, scope
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.output_dir = Path(output_dir) if output_dir is not None else (
            self.run_dir / "compressed" if self.run_dir is not None else None)
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.distill = distill
        self.progress_callback = progress_callback
        self.block_callback = block_callback
        self.run_config = run_config
        self.encrypt_key = encrypt_key
        self.max_memory = max_memory
        self.notes: list[str] = []
        self.plan: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    @property
    def state_dir(self) -> Path | None:
        return self.run_dir / STATE_DIR if self.run_dir is not None else None

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress_callback is not None:
            self.progress_callback(what, done, total)

    def _select(self, model: nn.Module) -> tuple[list[str], list[Stack]]:
        """The layers the stages act on that lie inside block stacks, and the stacks; others are noted."""
        if self.rate is not None:
            names = layer_plan_setup(model, self.section, bool(self.fit)).names
        else:
            names = []
            for st in self._stages():
                names += [n for n in st.layer_names(model) if n not in names]
        stacks = find_stacks(model, names)
        outside = [n for n in names if block_of(n, stacks) is None]
        if outside:
            more = " ..." if len(outside) > 4 else ""
            self.notes.append(f"{len(outside)} selected layer(s) outside the transformer blocks are left as they "
                              f"are by the sequential pipeline: {', '.join(outside[:4])}{more}")
            log.warning(self.notes[-1])
        if not stacks:
            raise CompressionError("the sequential pipeline found no stack of transformer blocks holding the layers "
                                   "to compress; use pipeline='whole'")
        return [n for n in names if n not in outside], stacks

    def _stages(self) -> list[Stage]:
        return [build_stage(name, getattr(self.section, name)) for name in self.cascade.stages]

    # ------------------------------------------------------------------ progress
    def _read_progress(self) -> dict[str, Any] | None:
        if self.state_dir is None or not (self.state_dir / PROGRESS_FILE).is_file():
            return None
        path = self.state_dir / PROGRESS_FILE
        try:
            progress = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        if not isinstance(progress, dict) or progress.get("format") != "rcc-sequential-progress":
            raise CheckpointError(f"{path}: not a sequential pipeline progress file")
        return progress

    def write_progress(self, progress: dict[str, Any]) -> None:
        if self.state_dir is not None:
            atomic_write_json(self.state_dir / PROGRESS_FILE, {"format": "rcc-sequential-progress", "version": 1,
                                                               **progress})

    # ------------------------------------------------------------------ run
    def run(self, source: Source, wrapper: ModelWrapper | None = None, resume: bool = False) -> SequentialResult:
        """Compress ``source``'s model (see the module docstring); ``wrapper`` (processors) is saved with it.

        With ``resume`` and a run directory holding progress, the run continues after the last block written.
        """
        if self.run_dir is None:
            if not source.resident:
                raise CompressionError("a model read from its checkpoint needs a run_dir: its compressed blocks are "
                                       "written there as they are done (and the checkpoint to output_dir, default "
                                       "run_dir/compressed)")
            return self._run(source, wrapper, None)
        with directory_lock(self.run_dir):
            progress = self._read_progress()
            if progress is not None and not resume:
                raise CheckpointError(f"{self.run_dir}: holds an earlier sequential run; resume it (--resume) or use "
                                      "a new directory")
            if resume:
                remove_stale_temp_files(self.run_dir)
            return self._run(source, wrapper, progress if resume else None)

    def _run(self, source: Source, wrapper: ModelWrapper | None, progress: dict[str, Any] | None
             ) -> SequentialResult:
        model = source.model
        check_supported(model)
        names, stacks = self._select(model)
        blocks = [b for s in stacks for b in s.blocks]
        source.load_rest(blocks, self.device)
        devices = block_devices(model, blocks, self.device, self.max_memory)
        progress = progress or {"phase": "survey" if self.rate is not None else "compress"}
        if self.rate is not None and progress.get("phase") == "survey":
            settings = SurveySettings(self.section, self.fit, self.rate, self.scope, self.device, self.state_dir,
                                      self.write_progress, self.report)
            self.plan = survey(settings, source, names, stacks, devices, progress)
            progress = {"phase": "compress", "plan": self.plan}
            self.write_progress(progress)
        elif self.rate is not None:  # resumed after the survey: the plan it made
            self.plan = progress["plan"]
            setup = layer_plan_setup(model, self.section, bool(self.fit))
            write_plan(self.section, self.plan, setup.providers, setup.recovery, bool(self.fit))
        self._selection = [set(st.layer_names(model)) & set(names) for st in self._stages()]
        return self._compress(source, names, stacks, devices, progress, wrapper)

    # ------------------------------------------------------------------ compression pass
    def _compress(self, source: Source, names: list[str], stacks: list[Stack], devices: Mapping[str, torch.device],
                  progress: dict[str, Any], wrapper: ModelWrapper | None) -> SequentialResult:
        model = source.model
        root = self.state_dir / "compress" if self.state_dir is not None else None
        walk = Walk(model, stacks, {"fit_dense": self.fit, "hold_dense": self.holdout, "hold_comp": self.holdout},
                    self.device, root, self.cascade.activation_buffer_mb << 20)
        writer = None
        if self.state_dir is not None and self.output_dir is not None:
            writer = ShardWriter(self.state_dir / "checkpoint", self.encrypt_key)
        resumed = "next_block" in progress
        next_block = int(progress.get("next_block", 0))
        self.records = list(progress.get("blocks", []))
        self.shards = list(progress.get("shards", []))
        order = list(progress.get("stacks_done", []))
        if resumed:
            self._check_resume(writer, walk, order, progress, next_block)
        total = sum(len(s.blocks) for s in stacks)
        g = sum(len(walk.stack(n).blocks) for n in order)
        while len(walk.done) < len(stacks):
            stack = walk.begin_stack(fresh=next_block <= g)
            for name in stack.blocks:
                if g >= next_block:
                    record = self._compress_block(source, walk, stack, name, names, devices[name], writer, g, total)
                    self._commit(walk, order, g + 1, record, progress)
                g += 1
            walk.end_stack(stack)
            order.append(stack.name)
            progress.update(stacks_done=order, tuples=walk.hub.tuples)
            self.write_progress(progress)
        gate = self._gate(walk)
        manifest = None
        if writer is not None:
            manifest = writer.finish(wrapper if wrapper is not None else model, self.output_dir, self.shards,
                                     config=self.run_config, records=[],  # no cascade steps: per-block records
                                     extra={"pipeline": {"name": "sequential", "blocks": self.records},
                                            "gate": gate, "plan": self.plan})
            progress.update(phase="done", gate=gate)
            self.write_progress(progress)
        return SequentialResult(model, self.records, self.plan, gate, self.output_dir if writer else None,
                                manifest, self.notes)

    def _check_resume(self, writer: ShardWriter | None, walk: Walk, order: Sequence[str], progress: Mapping[str, Any],
                      next_block: int) -> None:
        if writer is not None:
            bad = [s["file"] for s in self.shards if not writer.intact(s)]
            if bad:
                raise CheckpointError(f"{writer.staging}: block file(s) {bad[:3]} changed since they were written; "
                                      "start the run again")
        walk.reopen_finals(order)
        walk.hub.tuples.update(progress.get("tuples", {}))
        walk.boundary.reopen(next_block)
        log.info("resuming the sequential run at block %d (%d written)", next_block, len(self.shards))

    def _commit(self, walk: Walk, order: list[str], next_block: int, record: dict[str, Any],
                progress: dict[str, Any]) -> None:
        """The block is written and its outputs are complete: record it, then move the streams on."""
        self.records.append(record)
        progress.update(phase="compress", next_block=next_block, blocks=self.records, shards=self.shards,
                        stacks_done=order, tuples=walk.hub.tuples)
        self.write_progress(progress)
        walk.boundary.advance()
        if self.block_callback is not None:
            self.block_callback(record)

    # ------------------------------------------------------------------ one block
    def _compress_block(self, source: Source, walk: Walk, stack: Stack, name: str, names: list[str],
                        device: torch.device, writer: ShardWriter | None, g: int, total: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        block = source.materialize(name, device)
        fit_in = walk.batches(stack, "fit_dense") if walk.boundary.has("fit_dense") else []
        hold_in = walk.batches(stack, "hold_dense") if walk.boundary.has("hold_dense") else []
        if fit_in:
            walk.note_output_kind(stack, block, fit_in[0], device)
        teacher = _frozen_copy(block)
        teacher_view = BlockView(name, teacher)
        fit_out = block_forward(teacher, fit_in, device)
        hold_out = block_forward(teacher, hold_in, device)
        local = [n for n in names if n.startswith(f"{name}.")]
        for n in local:
            mod = source.model.get_submodule(n)
            if isinstance(mod, nn.Linear):
                replace_module(source.model, n, CompressedLinear.adopt(mod))
        block = source.model.get_submodule(name)
        view = BlockView(name, block)
        ctx = BlockContext(model=view, dense=TeacherWeights(teacher_view, local), dense_model=teacher_view,
                           batches=fit_in, holdout=hold_in, seed=self.seed, device=device, distill=self.distill,
                           fit_targets=[{"hidden_states": y} for y in fit_out],
                           holdout_targets=[{"hidden_states": y} for y in hold_out],
                           progress_callback=self.progress_callback)
        steps = self._run_stages(view, ctx, local)
        comp_in = walk.batches(stack, "hold_comp") if walk.boundary.has("hold_comp") else []
        comp_out = block_forward(view, comp_in, device)
        for stream, outs in (("fit_dense", fit_out), ("hold_dense", hold_out), ("hold_comp", comp_out)):
            for j, y in enumerate(outs):
                walk.boundary.put(stream, j, y.cpu())
        to_inference(block)
        layers = compressed_layers(view)
        record = {"block": name, "stack": stack.name, "index": g, "steps": steps,
                  "dense_bytes": sum(dense_bytes(m) for m in layers.values()),
                  "stored_bytes": sum(stored_bytes(m) for m in layers.values()),
                  "holdout_error": _errors(block_forward(view, hold_in, device), hold_out),
                  "drift": _errors(comp_out, hold_out)}
        if self.plan is not None:
            record["budget"] = self.plan.get("blocks", {}).get(name, {}).get("budget")
        if writer is not None:
            self.shards.append(writer.write_block(g, name, block))
        del teacher, teacher_view, ctx, view, layers, block
        source.release(name)
        gc.collect()  # a block's modules hold reference cycles: free them now, not at some later collection
        release_memory()
        record.update(seconds=round(time.perf_counter() - t0, 3), peak_rss=peak_resident_bytes(),
                      rss=resident_bytes(), resident_tensor_bytes=source.resident_bytes())
        self.report(f"block {g + 1}/{total} {name}: {record['seconds']:.1f} s, peak {_gib(record['peak_rss'])}",
                     g + 1, total)
        log.info("block %d/%d %s: %.1f s, %.4fx of its dense bytes, held-out block error %s, peak resident %s",
                 g + 1, total, name, record["seconds"],
                 record["stored_bytes"] / record["dense_bytes"] if record["dense_bytes"] else 1.0,
                 "n/a" if record["holdout_error"] is None else f"{record['holdout_error'][0]:.2e}",
                 _gib(record["peak_rss"]))
        return record

    def _run_stages(self, view: BlockView, ctx: BlockContext, local: Sequence[str]) -> list[dict[str, Any]]:
        """Every configured round of every stage on the block (recovery skipped or undone as the gate would)."""
        stages = self._stages()
        rounds = self.cascade.rounds or next((r for r in (s.default_rounds() for s in stages) if r is not None), 1)
        schedule = self.cascade.schedule or next((r for r in (s.default_schedule() for s in stages) if r), "linear")
        ctx.schedule = schedule
        steps: list[dict[str, Any]] = []
        for k in range(1, rounds + 1):
            ctx.byte_caps, ctx.scale_reserve = _byte_caps(view, stages, self._selection)
            for j, template in enumerate(stages):
                stage = _restricted(template, [n for n in local if n in self._selection[j]])
                if stage is None:
                    continue
                ctx.step, ctx.round, ctx.progress = (k - 1) * len(stages) + j, k, k / rounds
                t0 = time.perf_counter()
                entry: dict[str, Any] = {"stage": stage.name, "round": k}
                if stage.recovery:
                    entry.update(self._recover(stage, view, ctx))
                else:
                    stage.compress(view, ctx)
                    for layer in compressed_layers(view).values():
                        layer.sync_quant()
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                entry["summary"] = {key: v for key, v in stage.get_statistics().items() if key != "layers"}
                steps.append(entry)
        return steps

    def _recover(self, stage: Stage, view: BlockView, ctx: BlockContext) -> dict[str, Any]:
        """A recovery step on one block: skipped when the block is already within ``recovery_skip_error`` of the
        dense block on the holdout, undone when it raises the block's held-out error."""
        limit = self.cascade.recovery_skip_error
        targets = [t["hidden_states"] for t in ctx.holdout_targets]
        before = _errors(block_forward(view, ctx.holdout, ctx.device), targets) if ctx.holdout else None
        if limit and before is not None and before[2] <= limit:
            return {"skipped": f"the block already passes with margin: held-out relative output error {before[0]:.2e} "
                               f"(95 % interval up to {before[2]:.2e}) <= cascade.recovery_skip_error {limit:g}"}
        saved = {n: m.state() for n, m in compressed_layers(view).items()}
        stage.compress(view, ctx)
        for layer in compressed_layers(view).values():
            layer.sync_quant()
        if before is None:
            return {"error_before": None}
        after = _errors(block_forward(view, ctx.holdout, ctx.device), targets)
        if after is not None and after[0] > before[0]:
            for n, m in compressed_layers(view).items():
                m.load_state(saved[n])
            return {"undone": f"recovery raised the block's held-out output error from {before[0]:.3e} to "
                              f"{after[0]:.3e}; undone", "error_before": before, "error_after": after}
        return {"error_before": before, "error_after": after}

    # ------------------------------------------------------------------ the gate
    def _gate(self, walk: Walk) -> dict[str, Any]:
        """The model's outputs on the holdout, dense and compressed (every stack replayed): the gate's metric."""
        threshold = self.cascade.validation_threshold
        if not self.holdout:
            note = "not measured: no held-out batches (pass holdout_data=..., or 3 or more calibration batches)"
            log.warning("validation gate %s", note)
            return {"retention": None, "threshold": threshold, "passed": True, "gate": note}
        dense = [flatten_outputs(o) for o in walk.outputs("hold_dense")]
        comp = [flatten_outputs(o) for o in walk.outputs("hold_comp")]
        retention = output_agreement(comp, dense)
        mean, lo, hi = mean_interval(sample_output_errors(comp, dense), seed=self.seed)
        passed = retention >= threshold
        gate = {"retention": retention, "threshold": threshold, "passed": passed, "output_error": mean,
                "output_error_ci": [lo, hi],
                "gate": "measured at the end (a finished block is not rolled back: a failing gate is reported)"}
        if not passed:
            log.warning("the compressed model's output agreement %.4f is below the gate's %.4f; the sequential "
                        "pipeline cannot roll finished blocks back: lower the rate, or use pipeline='whole'",
                        retention, threshold)
        return gate


def _frozen_copy(block: nn.Module) -> nn.Module:
    """A frozen copy of a dense block: the teacher the block is compressed against."""
    teacher = copy.deepcopy(block)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _restricted(template: Stage, chosen: Sequence[str]) -> Stage | None:
    """A copy of ``template`` acting on ``chosen`` only (its layers in this block), or ``None`` without any."""
    if not chosen:
        return None
    cfg = template.config.model_copy(update={"targets": [f"^{re.escape(n)}$" for n in chosen], "ignore": []})
    return build_stage(template.name, cfg)


def _byte_caps(view: nn.Module, stages: Sequence[Stage], selection: Sequence[set[str]]
               ) -> tuple[dict[str, int], dict[str, int]]:
    """What each layer stores now (the cap of the round about to start) and the room kept for scales."""
    layers = compressed_layers(view)
    caps = {n: stored_bytes(m) for n, m in layers.items()}
    return caps, scale_reserve(layers, zip(stages, selection, strict=True))


def _errors(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], seed: int = 0
            ) -> list[float] | None:
    """``[mean, low, high]`` of the per-sample relative squared error of block outputs (``None`` without any)."""
    if not outputs:
        return None
    errs = sample_output_errors([{"h": o} for o in outputs], [{"h": t} for t in targets])
    return list(mean_interval(errs, seed=seed))


__all__ = ["BlockContext", "SequentialPipeline", "SequentialResult"]
