"""The cascade: stages in configured order, rounds along a schedule, a validation gate, rollback, resume.

``CascadePipeline`` runs ``rounds`` rounds; in round k every stage acts at k/rounds of its final
target along the schedule. After each stage a gate
compares the compressed model with the dense one (default: agreement of their outputs on
held-out calibration batches, so no labels are needed; or a task metric callable) and requires
``validation_threshold`` retention. A failed gate rolls the model back to the last passing state
and stops: the result is the most compressed model that meets the floor, with a record of every
step. With a run directory, a checkpoint is written every ``checkpoint_frequency`` passing steps
and an interrupted run resumes from it to the same result.

Crash safety rests on ordering: a checkpoint directory appears whole (``save_compressed``), then
``progress.json`` is replaced atomically to point at it, and only then are older checkpoints
deleted. A process killed at any moment leaves ``progress.json`` naming a complete checkpoint (or
no ``progress.json``: start again), and resuming removes what the killed writes left behind.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import load_image
from ..errors import CheckpointError, CompressionError
from ..models.base import ModelWrapper
from ..models.registry import unwrap_model, wrap_model
from ..utils.io import atomic_write_json, directory_lock, remove_stale_temp_files
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from .calibration import mean_interval, output_agreement, run_outputs, sample_output_errors
from .layers import CompressedLinear, LayerState, compressed_layers, replace_module, to_working, unpack_bits
from .offload import Handle, StoredTensors, TeacherWeights, TensorStore, teacher_copy
from .planner import LayerShape
from .records import StepRecord, step_records
from .registry import STAGES, CascadeConfig, CompressionSection, build_stage
from .schedule import joint_schedule
from .stage import CompressionContext, Distiller, Stage, scale_reserve, schedule_fraction, select_layers
from .storage import (
    dense_bytes,
    install_layers,
    install_rest,
    load_layer_tensors,
    read_manifest,
    save_compressed,
    stored_bytes,
    verify_files,
)

log = get_logger("cascade")

PROGRESS_FILE = "progress.json"


def compression_summary(model: nn.Module) -> dict[str, Any]:
    """Sparsity (of the S parts that exist), ranks and stored/dense bytes of the compressed layers right now.

    ``compression_rate`` is against the dense layers in the dtype the model was given
    (``dense_dtype``); ``compression_rate_vs_fp32`` against the same layers in float32.
    """
    layers = compressed_layers(model)
    dense = sum(dense_bytes(m) for m in layers.values())
    dense32 = sum(dense_bytes(m, torch.float32) for m in layers.values())
    stored = sum(stored_bytes(m) for m in layers.values())
    with_s = [m for m in layers.values() if m.weight is not None]
    numel = sum(m.in_features * m.out_features for m in with_s)
    nnz = sum(m.nnz() for m in with_s)
    dtypes = sorted({str(m.dtype).removeprefix("torch.") for m in layers.values()})
    return {
        "layers": len(layers),
        "dense_dtype": ",".join(dtypes),
        "dense_bytes": dense,
        "stored_bytes": stored,
        "compression_rate": 1.0 - stored / dense if dense else 0.0,
        "dense_bytes_fp32": dense32,
        "compression_rate_vs_fp32": 1.0 - stored / dense32 if dense32 else 0.0,
        # share of zero entries in S, over the layers that have an S (a purely low-rank layer has none)
        "sparsity": 1.0 - nnz / numel if numel else None,
        "layers_with_sparse_part": len(with_s),
        "layers_with_low_rank_part": sum(1 for m in layers.values() if m.rank > 0),
        "mean_rank": sum(m.rank for m in layers.values()) / max(len(layers), 1),
    }


class CascadePipeline:
    """Run compression stages as a validated, checkpointed, resumable cascade.

    ``distill`` is the distillation the stages call (``dare`` between rounds, ``alphaedit``
    scaling); the engine does not train, so without one a stage that asks for epochs raises.
    ``rcc_compression.CompressionPipeline`` is this class with the training layer's distiller
    wired in from a ``training`` section.

    >>> pipe = CascadePipeline().add_stage("dare", {"pruning_rate": 0.5, "fine_tune_epochs": 0})
    >>> model = pipe.compress(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: Any = None,
        *,
        calibration_data: Iterable[Mapping[str, Any]] | None = None,
        holdout_data: Iterable[Mapping[str, Any]] | None = None,
        preserve_data: Iterable[Mapping[str, Any]] | None = None,
        metric_fn: Callable[[nn.Module], float] | None = None,
        reference_model: nn.Module | None = None,
        run_dir: str | Path | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress_callback: Callable[[str, int, int], None] | None = None,
        step_callback: Callable[[dict[str, Any]], None] | None = None,
        run_config: dict[str, Any] | None = None,
        num_synthetic_batches: int = 6,
        encrypt_key: bytes | None = None,
        distill: Distiller | None = None,
        plan: Mapping[str, Any] | None = None,
        alternatives: Mapping[str, Any] | None = None,
    ) -> None:
        if config is None:
            section = None
        elif isinstance(config, dict):
            section = CompressionSection.model_validate(config)
        else:
            section = config
        self.section = section
        self.distill = distill
        self.cascade = section.cascade if section is not None else CascadeConfig(stages=["dare"])
        self.stages: list[Stage] = []
        if section is not None:
            for name in self.cascade.stages:
                self.stages.append(build_stage(name, getattr(section, name)))
        self.calibration = list(calibration_data) if calibration_data is not None else None
        self.holdout = list(holdout_data) if holdout_data is not None else None
        self.preserve = list(preserve_data) if preserve_data is not None else []
        self.metric_fn = metric_fn
        self.reference_model = reference_model
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.progress_callback = progress_callback
        self.step_callback = step_callback
        self.run_config = run_config
        self.num_synthetic_batches = num_synthetic_batches
        self.encrypt_key = encrypt_key
        self._checkpoint: str | None = None
        self._store: TensorStore | None = None
        #: where the calibration batches came from (``given``, ``synthetic noise``, ``none``)
        self.calibration_source = "given"
        #: why the validation gate is not measured (``None``: it is)
        self.gate_note: str | None = None
        self.records: list[dict[str, Any]] = []
        self.stage_results: dict[str, dict[str, Any]] = {}
        self._snapshots: dict[str, dict[str, dict[str, Any]]] = {}
        self._last_snap: dict[str, dict[str, Any]] = {}
        self._fresh: set[str] = set()
        self._model: nn.Module | None = None
        self._ctx: CompressionContext | None = None
        self._dense_score: float | None = None
        self._joint: list[dict[str, float]] | None = None
        #: (caps, scale reserve) of the current round: what each layer stored when it began
        self._round_caps: tuple[dict[str, int], dict[str, int]] | None = None
        self.stopped_early = False
        self._last_detail: dict[str, Any] | None = None
        #: steps before this index belong to a per-layer plan whose parts only make sense together (S rounded
        #: to 2 bits before its low-rank correction): they are measured, not gated; the plan is gated whole
        self._deferred_until = -1
        #: label -> compression section of each single-stage plan at the same bytes (:func:`.rate.alternative_sections`)
        self.alternatives = dict(alternatives or {})
        #: what the end-to-end choice measured: the plan and each alternative on the holdout, and the one kept
        self.plan_choice: dict[str, Any] | None = None
        self._initial_snap: dict[str, dict[str, Any]] | None = None
        if plan is not None and plan.get("method") == "layers" and self.rounds == 1:
            shrink = [j for j, st in enumerate(self.stages) if not st.recovery]
            self._deferred_until = max(shrink) if shrink else -1

    # ------------------------------------------------------------------ building
    def add_stage(self, stage: str | Stage, config: dict[str, Any] | Any = None) -> CascadePipeline:
        """Append a stage (a registered name with its config, or a built :class:`Stage`); chainable."""
        self.stages.append(stage if isinstance(stage, Stage) else build_stage(stage, config))
        return self

    @property
    def rounds(self) -> int:
        if self.cascade.rounds is not None:
            return self.cascade.rounds
        return next((r for r in (s.default_rounds() for s in self.stages) if r is not None), 1)

    @property
    def schedule(self) -> str:
        if self.cascade.schedule is not None:
            return self.cascade.schedule
        return next((r for r in (s.default_schedule() for s in self.stages) if r is not None), "linear")

    def steps(self) -> list[tuple[int, int]]:
        """(round, stage index) pairs in execution order."""
        return [(k, j) for k in range(1, self.rounds + 1) for j in range(len(self.stages))]

    # ------------------------------------------------------------------ preparation
    def _prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        wrapper = model if isinstance(model, ModelWrapper) else None
        inner = wrapper.model if wrapper is not None else model
        if not self.stages:
            raise CompressionError("the pipeline has no stages; add_stage() or pass a config")
        names: list[str] = []
        for st in self.stages:
            for n in st.layer_names(inner):
                if n not in names:
                    names.append(n)
        device = self.device or next(inner.parameters()).device
        self.device = device
        self._store = TensorStore(self.cascade.offload, self.cascade.offload_dir)
        # the teacher's frozen weights are the targets (no second copy); offloaded, they are read when used
        dense_model = teacher_copy(inner, self._store if self._store.mode == "disk" else None)
        dense = TeacherWeights(dense_model, names)
        self._fresh = set()
        for name in names:
            mod = inner.get_submodule(name)
            if isinstance(mod, nn.Linear):
                replace_module(inner, name, CompressedLinear.adopt(mod))
                self._fresh.add(name)
        batches = self.calibration
        self.calibration_source = "given"
        if batches is None:
            batches = _synthetic_batches(inner, wrapper, self.num_synthetic_batches, self.seed)
            self.calibration_source = "synthetic noise" if batches else "none"
            if batches:
                log.warning("no calibration data given: calibrating and gating on random inputs (Gaussian images, "
                            "random token ids); pass calibration_data=... for figures that mean something")
        holdout = self.holdout
        self.gate_note = None
        if holdout is None:
            n_hold = min(2, len(batches) // 3)
            if n_hold:
                holdout, batches = batches[-n_hold:], batches[:-n_hold]
            else:  # never gate on the fit set: a model fitted to those batches would look better than it is
                holdout = []
                self.gate_note = (f"not measured: {len(batches)} calibration batch(es), fewer than 3, leave none "
                                  "to hold out; pass holdout_data=... (or more batches) or metric_fn=..."
                                  if batches else "not measured: no calibration or holdout data")
        elif not holdout:
            self.gate_note = "not measured: holdout_data is empty; pass held-out batches or metric_fn=..."
        if self.metric_fn is not None:
            self.gate_note = None
        elif self.gate_note is not None:
            log.warning("validation gate %s", self.gate_note)
        reference = None
        if self.reference_model is not None:
            ref = unwrap_model(self.reference_model)
            reference = StoredTensors({n: self._store.put(ref.get_submodule(n).weight) for n in names
                                       if isinstance(ref.get_submodule(n), nn.Linear)})
        self._ctx = CompressionContext(
            model=inner, dense=dense, dense_model=dense_model, batches=list(batches), holdout=list(holdout),
            preserve=self.preserve, reference=reference, seed=self.seed, schedule=self.schedule, device=device,
            progress_callback=self.progress_callback, distill=self.distill,
            tokenizer=getattr(wrapper, "tokenizer", None),
            image_loader=(lambda imgs, w=wrapper: _load_images(w, imgs)) if wrapper is not None else None,
            memo={} if self.alternatives else None,  # the end-to-end choice reruns stages from the dense start
        )
        self._model = inner
        self._joint = self._joint_schedule(inner)
        return inner, wrapper

    def _joint_schedule(self, inner: nn.Module) -> list[dict[str, float]] | None:
        """Per-round targets of dare and nullu from their joint byte schedule (:mod:`.schedule`), or ``None``.

        It applies where both shrink the same layers toward byte targets known up front: ``dare``
        by ``pruning_rate`` (no N:M), ``nullu`` in ``lowrank`` mode by ``param_budget`` alone (as
        ``compress_model`` plans them). Other settings keep each stage's own schedule; the byte
        caps still hold every step to what the previous round stored.
        """
        dare = next((s for s in self.stages if s.name == "dare"), None)
        nullu = next((s for s in self.stages if s.name == "nullu"), None)
        if dare is None or nullu is None or self.rounds < 2:
            return None
        nc = nullu.config
        if (dare.config.nm is not None or nc.mode != "lowrank" or nc.param_budget is None
                or nc.rank_reduction is not None or nc.energy_threshold is not None):
            return None
        names = dare.layer_names(inner)
        if set(names) != set(nullu.layer_names(inner)):
            return None

        shapes = []
        for n in names:
            m = inner.get_submodule(n)
            shapes.append(LayerShape(m.out_features, m.in_features, m.element_size, m.bias is not None))
        fractions = [schedule_fraction(k / self.rounds, self.schedule) for k in range(1, self.rounds + 1)]
        return joint_schedule(shapes, dare.config.pruning_rate, nc.param_budget, fractions,
                              dare.config.resolved_scope(), nc.budget_allocation)

    def _round_targets(self, k: int) -> dict[str, dict[str, float]]:
        if self._joint is None:
            return {}
        t = self._joint[k - 1]
        return {"dare": {"pruning_rate": t["pruning_rate"]}, "nullu": {"param_budget": t["param_budget"]}}

    def _byte_caps(self) -> tuple[dict[str, int], dict[str, int]]:
        """What each layer stores now (the cap of the round about to start) and the room kept for scales."""
        layers = compressed_layers(self._model)
        caps = {n: stored_bytes(m) for n, m in layers.items()}
        if not self._ctx.batches:
            return caps, {}
        return caps, scale_reserve(layers, ((st, st.layer_names(self._model)) for st in self.stages))

    @property
    def dense_model(self) -> nn.Module | None:
        """The frozen dense copy of the model taken before compression (the teacher)."""
        return self._ctx.dense_model if self._ctx is not None else None

    # ------------------------------------------------------------------ the gate
    @torch.no_grad()
    def _score(self, model: nn.Module) -> float | None:
        """The gate's metric, or ``None`` where nothing measures it (no holdout, no ``metric_fn``).

        With the default gate, the continuous second metric (per-sample relative squared output
        error to the dense model, its mean and a 95 % bootstrap interval) is kept in ``_last_detail``.
        """
        self._last_detail = None
        if self.metric_fn is not None:
            return float(self.metric_fn(model))
        ctx = self._ctx
        if not ctx.holdout:
            return None
        outs, teacher = run_outputs(model, ctx.holdout, ctx.device), ctx.teacher_holdout()
        mean, lo, hi = mean_interval(sample_output_errors(outs, teacher), seed=self.seed)
        self._last_detail = {"output_error": mean, "output_error_ci": [lo, hi]}
        return output_agreement(outs, teacher)

    def _retention(self, model: nn.Module) -> tuple[float | None, float | None, bool]:
        """``(metric, retention, finite)``; metric and retention are ``None`` where the gate is not measured."""
        finite = all(torch.isfinite(p).all().item() for m in compressed_layers(model).values() for p in m.parameters())
        if not finite:
            return float("nan"), 0.0, False
        score = self._score(model)
        if score is None:
            return None, None, True
        if self.metric_fn is None:
            retention = score
        else:
            if self._dense_score is None:
                with torch.no_grad():
                    self._dense_score = float(self.metric_fn(self._ctx.dense_model))
            retention = score / self._dense_score if self._dense_score else 0.0
        if retention != retention:  # NaN outputs
            return score, 0.0, False
        return score, retention, True

    def validate_stage(self, stage_name: str) -> bool:
        """Re-run the gate on the current model; record and return whether it passes."""
        if self._model is None:
            raise CompressionError("validate_stage needs a model: call run() first")
        score, retention, finite = self._retention(self._model)
        passed = self._passes(retention, finite)
        record = {"stage": stage_name, "validation_only": True, "metric": score, "retention": retention,
                  "passed": passed}
        if retention is None:
            record["gate"] = self.gate_note
        self.records.append(record)
        return passed

    def _passes(self, retention: float | None, finite: bool) -> bool:
        """A step passes with finite weights and retention at the threshold; an unmeasured gate stops nothing."""
        return finite and (retention is None or retention >= self.cascade.validation_threshold)

    # ------------------------------------------------------------------ state
    def _snapshot(self, initial: bool = False) -> dict[str, dict[str, Any]]:
        """A compact copy of every compressed layer for rollback, sharing what did not change since the last one.

        ``initial``: the layers that were plain Linear layers a moment ago are recorded as "the teacher's", so
        the starting state costs no copy.
        """
        snap: dict[str, dict[str, Any]] = {}
        for n, m in compressed_layers(self._model).items():
            if initial and n in self._fresh:
                snap[n] = {"teacher": n}
            else:
                snap[n] = _snap_layer(m, self._last_snap.get(n), self._store)
                release_memory()  # the layer's copies went to the store: hand their pages back
        self._last_snap = {n: v for n, v in snap.items() if "teacher" not in v}
        return snap

    def _stored_bytes(self) -> int:
        return sum(stored_bytes(m) for m in compressed_layers(self._model).values())

    def _restore(self, snap: dict[str, dict[str, Any]]) -> None:
        for n, m in compressed_layers(self._model).items():
            s = snap[n]
            if "teacher" in s:  # the dense layer it started as: the teacher's copy
                t = self._ctx.dense_model.get_submodule(n)
                bias = None if t.bias is None else t.bias.detach()
                m.load_state(LayerState({"weight": t.weight.detach(), "bias": bias}, None, None, {}))
            else:
                _unsnap_layer(m, s)

    def rollback_to_stage(self, stage_name: str) -> None:
        """Restore the model to its state after the last passing step of ``stage_name``."""
        if stage_name not in self._snapshots:
            raise CompressionError(f"no passing state recorded after stage {stage_name!r}; "
                                   f"known: {', '.join(self._snapshots) or 'none'}")
        self._restore(self._snapshots[stage_name])
        self.records.append({"stage": stage_name, "rollback": True})

    def get_stage_results(self) -> dict[str, Any]:
        """Every step's record and each stage's latest statistics."""
        return {"records": list(self.records), "stages": dict(self.stage_results),
                "stopped_early": self.stopped_early, "rounds": self.rounds,
                "calibration": self.calibration_source, "gate": self.gate_note or "measured",
                "plan_choice": self.plan_choice}

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self, step: int, done: bool = False) -> None:
        """Save the model as ``checkpoints/step-NNNNN``, point ``progress.json`` at it, drop older ones."""
        assert self.run_dir is not None
        ckpt_root = self.run_dir / "checkpoints"
        target = ckpt_root / f"step-{step:05d}"
        try:
            save_compressed(self._model, target, config=self.run_config, records=self.records, overwrite=True,
                            encrypt_key=self.encrypt_key)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. {self._where_to_resume()}") from exc.__cause__
        self._checkpoint = target.relative_to(self.run_dir).as_posix()
        self._write_progress(step + 1, done)
        for old in ckpt_root.iterdir():
            if old.is_dir() and old != target:
                shutil.rmtree(old, ignore_errors=True)

    def _write_progress(self, next_step: int, done: bool) -> None:
        assert self.run_dir is not None and self._checkpoint is not None
        try:
            atomic_write_json(self.run_dir / PROGRESS_FILE, {
                "format": "rcc-cascade-progress", "format_version": 1, "next_step": next_step,
                "total_steps": len(self.steps()),
                "checkpoint": self._checkpoint, "records": self.records, "stage_results": self.stage_results,
                "done": done, "stopped_early": self.stopped_early, "encrypted": self.encrypt_key is not None,
                "round_caps": None if self._round_caps is None else {"caps": self._round_caps[0],
                                                                     "scale_reserve": self._round_caps[1]},
            })
        except OSError as exc:
            raise CheckpointError(f"{self.run_dir / PROGRESS_FILE}: could not write: {exc.strerror or exc}. "
                                  f"{self._where_to_resume()}") from exc

    def _where_to_resume(self) -> str:
        if self._checkpoint is None:
            return "No checkpoint of this run was completed"
        return (f"The last complete checkpoint, {self.run_dir / self._checkpoint}, is intact: "
                f"free space and continue with rcc compress --resume {self.run_dir}")

    def _read_progress(self) -> dict[str, Any] | None:
        assert self.run_dir is not None
        pfile = self.run_dir / PROGRESS_FILE
        if not pfile.is_file():
            return None
        try:
            progress = json.loads(pfile.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"{pfile}: malformed: {str(exc)[:200]}") from None
        if not isinstance(progress, dict) or progress.get("format") != "rcc-cascade-progress":
            raise CheckpointError(f"{pfile}: not a cascade progress file")
        ok = (isinstance(progress.get("next_step"), int) and isinstance(progress.get("checkpoint"), str)
              and isinstance(progress.get("records", []), list) and isinstance(progress.get("stage_results", {}), dict))
        if not ok or progress.get("format_version") != 1:
            raise CheckpointError(f"{pfile}: unknown format_version {progress.get('format_version')!r} or missing "
                                  "fields (next_step, checkpoint)")
        return progress

    def _resume_state(self) -> int:
        if self.run_dir is None:
            return 0
        removed = remove_stale_temp_files(self.run_dir)
        if removed:
            log.info("removed %d leftovers of interrupted writes: %s", len(removed),
                     ", ".join(p.relative_to(self.run_dir).as_posix() for p in removed[:5]))
        progress = self._read_progress()
        if progress is None:
            return 0
        ckpt = self.run_dir / progress["checkpoint"]
        if self.run_dir.resolve() not in ckpt.resolve().parents:
            raise CheckpointError(f"{self.run_dir / PROGRESS_FILE}: checkpoint {progress['checkpoint']!r} lies "
                                  "outside the run directory")
        manifest = read_manifest(ckpt)
        verify_files(ckpt, manifest)
        install_layers(self._model, manifest, load_layer_tensors(ckpt, manifest, self.encrypt_key), self._ctx.reference)
        install_rest(ckpt, manifest, self._model, self.encrypt_key)
        to_working(self._model)  # the stages work on float parameters
        self._checkpoint = progress["checkpoint"]
        caps = progress.get("round_caps")
        if isinstance(caps, dict) and isinstance(caps.get("caps"), dict):
            self._round_caps = ({str(k): int(v) for k, v in caps["caps"].items()},
                                {str(k): int(v) for k, v in caps.get("scale_reserve", {}).items()})
        step_records(progress.get("records", []), where=str(self.run_dir / PROGRESS_FILE))  # refuses a bad record
        self.records = list(progress.get("records", []))
        self.stage_results = dict(progress.get("stage_results", {}))
        log.info("resuming from %s (step %d of %d)", ckpt, progress["next_step"], len(self.steps()))
        if progress.get("done"):
            self.stopped_early = bool(progress.get("stopped_early"))
            return len(self.steps())
        return int(progress["next_step"])

    # ------------------------------------------------------------------ run
    def compress(self, model: nn.Module, resume: bool = False) -> nn.Module:
        """Compress ``model`` in place through every step; returns it (the wrapper, if given one).

        With ``resume=True`` and a run directory holding a checkpoint, continue from it.
        """
        if self.run_dir is None:
            return self._run(model, resume)
        with directory_lock(self.run_dir):
            if not resume and (self.run_dir / PROGRESS_FILE).exists():
                raise CheckpointError(f"{self.run_dir}: holds an earlier run; resume it (--resume) or use a new "
                                      "directory")
            return self._run(model, resume)

    def _run(self, model: nn.Module, resume: bool) -> nn.Module:
        inner, wrapper = self._prepare(model)
        ctx = self._ctx
        steps = self.steps()
        start = self._resume_state() if resume else 0
        last_pass = self._snapshot(initial=start == 0)
        self._initial_snap = last_pass if start == 0 else None
        # the smallest passing state (stored bytes, step, snapshot): where a failed gate goes back to
        best: tuple[int, int, dict[str, dict[str, Any]]] = (self._stored_bytes(), start - 1, last_pass)
        last_retention = next((r.get("retention") for r in reversed(self.records)
                               if r.get("passed") and "step" in r), 1.0 if start == 0 else None)
        since_ckpt, saved_current, last_step = 0, start > 0, start - 1
        last_gate: dict[str, Any] | None = next((r for r in reversed(self.records) if r.get("passed") and "step" in r
                                                 and "skipped" not in r), None)
        for idx in range(start, len(steps)):
            k, j = steps[idx]
            stage = self.stages[j]
            ctx.step, ctx.progress, ctx.round = idx, k / self.rounds, k
            ctx.targets = self._round_targets(k)
            if j == 0 or not ctx.byte_caps:
                if j == 0 or self._round_caps is None:
                    self._round_caps = self._byte_caps()
                ctx.byte_caps, ctx.scale_reserve = self._round_caps
            margin = self._recovery_margin(stage, last_gate)
            if margin is not None:  # nothing for a recovery step to win that the gate could see: skip it
                record = self._skipped_step(stage, idx, k, margin, last_retention)
                last_step = idx
                if self.step_callback is not None:
                    self.step_callback(record)
                continue
            record = self._run_step(stage, idx, k, deferred=idx < self._deferred_until)
            last_step = idx
            worse = record["passed"] and stage.recovery and self._lowered(record, last_retention, last_gate)
            if worse:  # a recovery step that lowers the gate metric is undone; the run goes on
                self._restore(last_pass)
                record.update(undone=f"recovery {worse}; the step was undone",
                              rejected_retention=record["retention"], retention=last_retention,
                              achieved=compression_summary(inner))
                log.warning("step %d (%s, round %d): %s", idx, stage.name, k, record["undone"])
            choose = (idx == self._deferred_until and bool(self.alternatives) and self._initial_snap is not None
                      and "error" not in record)
            if choose and not record["passed"]:  # a single-stage plan may pass where the per-layer plan does not
                record = self._choose_plan(record)
                choose = False
            if self.step_callback is not None:
                self.step_callback(record)
            if not record["passed"]:
                self._restore(best[2])
                self.stopped_early, saved_current = True, False
                record.update(rolled_back=True, rolled_back_to_step=best[1])
                why = record.get("error") or (f"retention {record['retention']:.4f} < "
                                              f"{self.cascade.validation_threshold:.4f}")
                back = f"step {best[1]}" if best[1] >= 0 else "the state it started from"
                log.warning("step %d (%s, round %d) failed the gate (%s); went back to the smallest passing state "
                            "(%s) and stopped", idx, stage.name, k, why, back)
                break
            if worse:
                continue
            self.stage_results[stage.name] = stage.get_statistics()
            if choose:
                record = self._choose_plan(record)
            last_pass = self._snapshot()
            self._snapshots[stage.name] = last_pass
            last_retention = record["retention"]
            last_gate = record
            if record["achieved"]["stored_bytes"] <= best[0] and not record.get("deferred"):
                best = (record["achieved"]["stored_bytes"], idx, last_pass)
            ret = "not measured" if record["retention"] is None else f"{record['retention']:.4f}"
            log.info("step %d/%d %s round %d: retention %s, layer compression %.4f", idx + 1, len(steps),
                     stage.name, k, ret, record["achieved"]["compression_rate"])
            since_ckpt += 1
            saved_current = False
            if self.run_dir is not None and self.cascade.checkpoint_frequency and (
                since_ckpt >= self.cascade.checkpoint_frequency
            ):
                self._write_checkpoint(idx)
                since_ckpt, saved_current = 0, True
        if self.run_dir is not None:
            if saved_current:
                self._write_progress(len(steps), done=True)
            else:
                self._write_checkpoint(max(last_step, 0), done=True)
        return wrapper if wrapper is not None else inner

    @staticmethod
    def _rank(r: Mapping[str, Any]) -> tuple[float, float]:
        """Order of candidates on the holdout: the gate's metric, then the continuous output error (lower)."""
        ret = r.get("retention")
        err = r.get("output_error")
        return (-1.0 if ret is None else float(ret), -(float("inf") if err is None else float(err)))

    def _choose_plan(self, record: dict[str, Any]) -> dict[str, Any]:
        """The end-to-end choice: measure each single-stage plan at the same bytes where the plan's steps left
        the model, keep the best on the holdout by the gate's metric, record all of them.

        Each alternative runs from the dense start (the teacher's weights) and is gated like the plan;
        the returned model is never worse on the holdout than any of them. Returns the record of the
        state kept (``record`` itself when the plan wins).
        """
        inner, ctx = self._model, self._ctx
        keys = ("retention", "metric", "output_error", "output_error_ci")
        results = {"per-layer plan": {"stages": [st.name for st in self.stages[:self._deferred_until + 1]],
                                      "stored_bytes": record["achieved"]["stored_bytes"], "passed": record["passed"],
                                      **{k: record.get(k) for k in keys}}}
        best = ("per-layer plan", self._rank(record), self._snapshot(), record) if record["passed"] else None
        for label, sec in self.alternatives.items():
            self._restore(self._initial_snap)
            t0 = time.perf_counter()
            stages = [build_stage(n, getattr(sec, n)) for n in sec.cascade.stages]
            error = None
            try:
                for st in stages:
                    st.compress(inner, ctx)
                    for layer in compressed_layers(inner).values():
                        layer.sync_quant()
            except (RuntimeError, torch.linalg.LinAlgError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            score, retention, finite = (float("nan"), 0.0, False) if error else self._retention(inner)
            res: dict[str, Any] = {"stages": list(sec.cascade.stages), "stored_bytes": self._stored_bytes(),
                                   "metric": score, "retention": retention,
                                   "seconds": round(time.perf_counter() - t0, 2),
                                   **((self._last_detail or {}) if not error else {})}
            passed = self._passes(retention, finite) and not error
            if error:
                res["error"] = error
            res["passed"] = passed
            results[label] = res
            if passed and (best is None or self._rank(res) > best[1]):
                best = (label, self._rank(res), self._snapshot(),
                        {**record, **{k: res.get(k) for k in keys}, "passed": True})
            ctx.tick(f"choice {label}", len(results) - 1, len(self.alternatives))
        ctx.memo = None  # nothing runs from the dense start again
        if best is None:  # none passes the gate: the caller goes back to the last passing state
            self.plan_choice = {"chosen": None, "candidates": results, "metric": "gate retention, then output error",
                                "why": "no plan at this rate keeps the gate's threshold on the holdout"}
            record["plan_choice"] = self.plan_choice
            log.warning("end-to-end choice: no plan at this rate passes the gate (%s)", ", ".join(
                f"{k} {v['retention']:.4f}" for k, v in results.items() if v.get("retention") is not None))
            return record
        self._restore(best[2])
        label, _, _, kept = best
        kept.pop("error", None)
        kept = {**kept, "achieved": compression_summary(inner)}
        self.plan_choice = {"chosen": label, "candidates": results, "metric": "gate retention, then output error"}
        kept["plan_choice"] = self.plan_choice
        self.records[-1] = kept
        log.info("end-to-end choice on the holdout: %s kept (%s)", label, ", ".join(
            f"{k} {v['retention']:.4f}" if v.get("retention") is not None else f"{k} not measured"
            for k, v in results.items()))
        return kept

    def _recovery_margin(self, stage: Stage, last: dict[str, Any] | None) -> str | None:
        """Why a recovery step can be skipped (the model passes with margin), or ``None`` to run it.

        It is skipped when the default gate measured the model before it within
        ``cascade.recovery_skip_error`` of the dense outputs (upper end of the 95 % interval of the
        relative squared output error): distillation has nothing left to win that the gate could see.
        """
        limit = self.cascade.recovery_skip_error
        if not stage.recovery or not limit or last is None or last.get("output_error_ci") is None:
            return None
        hi = last["output_error_ci"][1]
        if hi > limit:
            return None
        return (f"the model already passes with margin: held-out relative output error {last['output_error']:.2e} "
                f"(95 % interval up to {hi:.2e}) <= cascade.recovery_skip_error {limit:g}")

    def _skipped_step(self, stage: Stage, idx: int, k: int, why: str, retention: float | None) -> dict[str, Any]:
        record: dict[str, Any] = {"step": idx, "round": k, "stage": stage.name, "skipped": why, "passed": True,
                                  "retention": retention, "threshold": self.cascade.validation_threshold,
                                  "achieved": compression_summary(self._model), "seconds": 0.0, "targets": {},
                                  "summary": {}, "metric": None}
        record = StepRecord.model_validate(record).as_json()
        self.records.append(record)
        log.info("step %d (%s, round %d) skipped: %s", idx, stage.name, k, why)
        return record

    @staticmethod
    def _lowered(record: dict[str, Any], last_retention: float | None, last: dict[str, Any] | None) -> str:
        """How a recovery step made the gate's metric worse ("" if it did not).

        With the default gate the continuous metric judges (the mean relative output error must not
        rise); with a task metric, retention must not fall.
        """
        if record.get("output_error") is not None and last is not None and last.get("output_error") is not None:
            before, after = last["output_error"], record["output_error"]
            return f"raised the held-out output error from {before:.3e} to {after:.3e}" if after > before else ""
        if record["retention"] is not None and last_retention is not None and record["retention"] < last_retention:
            return f"lowered retention from {last_retention:.4f} to {record['retention']:.4f}"
        return ""

    def _run_step(self, stage: Stage, idx: int, k: int, deferred: bool = False) -> dict[str, Any]:
        """Apply one stage once, gate it (or only measure it: ``deferred``), and record what happened."""
        ctx, inner = self._ctx, self._model
        t0 = time.perf_counter()
        error = None
        try:
            stage.compress(inner, ctx)
            for layer in compressed_layers(inner).values():
                layer.sync_quant()  # what the gate measures is what the codes store
        except (RuntimeError, torch.linalg.LinAlgError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        score, retention, finite = (float("nan"), 0.0, False) if error else self._retention(inner)
        detail = None if error else self._last_detail
        passed = finite if (deferred and not error) else self._passes(retention, finite)
        stats = stage.get_statistics()
        record: dict[str, Any] = {
            "step": idx, "round": k, "stage": stage.name,
            "targets": ({k: round(v, 6) for k, v in ctx.targets[stage.name].items()} if stage.name in ctx.targets
                        else stage.target_description(ctx.progress, ctx.schedule)),
            "achieved": compression_summary(inner),
            "metric": score, "retention": retention, "threshold": self.cascade.validation_threshold,
            "passed": passed, "seconds": round(time.perf_counter() - t0, 4),
            "summary": {key: v for key, v in stats.items() if key != "layers"},
        }
        if detail:
            record.update(detail)
        if deferred and not error:
            record["deferred"] = True
            record["gate"] = ("deferred: a part of the per-layer plan, measured but not gated; the plan is gated "
                              f"whole after step {self._deferred_until}")
        elif retention is None and not error:
            record["gate"] = self.gate_note
        if error:
            record["error"] = error
        elif not finite:
            record["error"] = "non-finite weights or outputs"
        record = StepRecord.model_validate(record).as_json()  # the typed form, checked as it is written
        self.records.append(record)
        return record


_SNAP_PARTS = ("weight", "lr_A", "lr_B", "a_in", "a_out", "bias")


def _snap_layer(layer: CompressedLinear, prev: dict[str, Any] | None, store: TensorStore) -> dict[str, Any]:
    """A compact rollback copy of a layer in ``store``: S as its kept values and a bit mask (about its stored
    bytes, not a dense tensor and a byte per mask entry), and any part equal to ``prev``'s shared with it."""
    out: dict[str, Any] = {"base": layer.base,  # frozen: a reference will do
                           "quant": {k: q.clone() for k, q in layer.quant.items()} if layer.quant else None,
                           "act_bits": layer.act_bits}
    for k in _SNAP_PARTS:
        t = getattr(layer, k)
        if t is None:
            out[k] = None
            continue
        bits = layer.mask_bits if k == "weight" else None
        mask = layer.mask if bits is not None else None
        now = t.detach()[mask] if mask is not None else t.detach()
        old = prev.get(k) if prev is not None else None
        if old is not None and ("bits" in old) == (mask is not None) and (
                bits is None or torch.equal(old["bits"], bits)):
            held: Handle = old["values"] if mask is not None else old["dense"]
            if tuple(held.shape) == tuple(now.shape) and held.dtype == now.dtype and torch.equal(held.load(), now):
                out[k] = old  # unchanged (compared by value: stages also write through ``.data``)
                continue
        out[k] = ({"values": store.put(now), "bits": bits.clone(), "shape": tuple(t.shape)}
                  if mask is not None else {"dense": store.put(t)})
    return out


def _unsnap_layer(layer: CompressedLinear, snap: dict[str, Any]) -> None:
    params: dict[str, torch.Tensor | None] = {}
    bits = None
    for k in _SNAP_PARTS:
        e = snap[k]
        if e is None:
            params[k] = None
        elif "dense" in e:
            params[k] = e["dense"].load()
        else:
            v = e["values"].load()
            mask = unpack_bits(e["bits"], e["shape"]).to(v.device)
            w = torch.zeros(e["shape"], dtype=v.dtype, device=v.device)
            w[mask] = v
            params[k], bits = w, e["bits"]
    layer.load_state(LayerState(params, bits, snap["base"], snap.get("quant") or {}, snap.get("act_bits")))


def _synthetic_batches(model: nn.Module, wrapper: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Random inputs for CLIP/BLIP when no calibration data is given (enough for gates and KD)."""
    try:
        w = wrapper if wrapper is not None else wrap_model(model)
    except Exception:  # noqa: BLE001 - a custom module: no synthetic inputs possible
        return []
    g = torch.Generator().manual_seed(seed + 12345)
    return [w.synthetic_batch(4, g) for _ in range(n)]


def _load_images(wrapper: Any, images: list[Any]) -> torch.Tensor:
    if any(i is None for i in images):
        raise CompressionError("BLIP hallu_space pairs need an 'image' path for every pair")
    return wrapper.prepare_images([load_image(i) for i in images])  # bounded, allow-listed formats


__all__ = ["STAGES", "CascadeConfig", "CascadePipeline", "compression_summary", "select_layers"]
