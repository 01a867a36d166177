"""``rcc train``: recover a compressed run by distillation from the dense model it came from.

:func:`run_train` streams a training split through the compressed model of a run directory (or
checkpoint) and its dense model, validates on a held-out split as it goes, keeps the best model
and saves it as a new compressed checkpoint; :func:`train_job` adds the run directory, logging,
run record and the process group of a ``torchrun`` launch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.calibration import PRIMARY_OUTPUTS, flatten_outputs, output_agreement, to_device
from ..compression.layers import to_inference
from ..compression.records import step_records
from ..compression.storage import MANIFEST, load_compressed, read_manifest, save_compressed
from ..config import RCCConfig, dump_config, load_config, validate_config
from ..data.loaders import PoissonBatchSampler, split_loader
from ..data.splits import augment_from_config
from ..errors import CheckpointError, ConfigError, DataError
from ..evaluation.suite import evaluate_model
from ..models.base import ModelWrapper
from ..models.registry import get_model
from ..tracking import ExperimentTracker
from ..training.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    LoggingCallback,
    ModelCheckpoint,
    ProgressBar,
    ProgressFile,
    TrackingCallback,
)
from ..training.distributed import (
    DistInfo,
    barrier,
    cleanup,
    device_for,
    gather_with_grad,
    init_distributed,
)
from ..training.losses import DistillationLoss, LossWeights, model_family
from ..training.privacy import PrivateTraining, steps_per_epoch
from ..training.recovery import trainable_parameters
from ..training.teacher import Teacher
from ..training.trainer import CompressionTrainer, DistillationObjective
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger, setup_logging
from ..utils.runs import RunRecord, new_run_dir
from ..utils.seeding import seed_everything
from .common import prepare_run_dir, resolve_device
from .compress import HEADLINE_METRICS
from .data import check_and_record, model_keys, open_role, training_splits

log = get_logger("training")


def resolve_source(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """The compressed checkpoint of a run directory (or the checkpoint itself) and the config it was made with."""
    source = Path(source)
    if (source / MANIFEST).is_file():
        ckpt, run_dir = source, source.parent
    elif (source / "compressed" / MANIFEST).is_file():
        ckpt, run_dir = source / "compressed", source
    else:
        raise CheckpointError(f"{source}: neither a compressed checkpoint ({MANIFEST}) nor a run directory holding "
                              f"one in compressed/")
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():  # read as any config file: a broken one is one line naming the file and the key
        run_cfg = dump_config(load_config(cfg_file))
    else:
        run_cfg = read_manifest(ckpt).get("config") or {}
    if not run_cfg.get("model", {}).get("name"):
        raise CheckpointError(f"{source}: the run's config names no model (model.name); cannot build the teacher")
    return ckpt, run_cfg


def _load_models(ckpt: Path, run_cfg: RCCConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    m = run_cfg.model
    teacher = get_model(m.name, m.type, m.dtype, seed=run_cfg.experiment.seed).to(device)
    reference = None
    if any(info.get("base") for info in read_manifest(ckpt)["layers"].values()):
        ref_name = run_cfg.compression.dare.reference_model
        if not ref_name:
            raise CheckpointError(f"{ckpt}: layers were compressed as deltas but the run names no reference model")
        reference = get_model(ref_name, m.type, m.dtype, seed=run_cfg.experiment.seed)
    student = load_compressed(ckpt, reference_model=reference, device=device)
    return student, teacher


def _monitor_mode(name: str) -> str:
    return "min" if "loss" in name else "max"


def _better(a: float | None, b: float | None, mode: str) -> bool:
    """Whether ``a`` beats ``b`` (a missing or NaN value never does)."""
    if a is None or a != a:
        return False
    if b is None or b != b:
        return True
    return a < b if mode == "min" else a > b


def run_train(cfg: RCCConfig, source: str | Path, run_dir: Path, resume: bool = False, progress: bool = True,
              dist: DistInfo | None = None) -> dict[str, Any]:
    """Recover the compressed model in ``source`` by distillation from its dense model, on ``cfg``'s data.

    The training split (``dataset.train``; else the run's calibration source) streams through
    length-bucketed, augmented batches for ``training.max_steps`` steps or ``training.num_epochs``
    epochs. The validation split (``dataset.val``; else the source's own ``val`` split; else a
    seeded 5 % held out of training) is evaluated every ``training.eval_every_steps`` steps (or at
    epoch ends): the distillation loss, the agreement with the teacher, and any
    ``training.val_benchmarks``; the best model by ``training.monitor`` is kept (the input model
    too, if training never beat it). No training image may be in val or ``dataset.test``.

    Writes ``run_dir/compressed`` (the recovered model, same format), ``checkpoints/{last,best}``
    (trainer states, for ``resume``), ``progress.json`` while it trains, ``data.json`` and
    ``train_results.json``; returns the results. Sends steps, validations and the result to
    ``cfg.tracking``'s backends (rank 0). Works under ``torchrun`` (every rank calls it; rank 0 writes).
    """
    dist = dist or init_distributed()
    tracker = (ExperimentTracker(cfg.tracking, run_dir, run_config=dump_config(cfg)) if dist.is_main
               else ExperimentTracker())
    with tracker:
        results = _run_train(cfg, source, run_dir, resume, progress, dist, tracker)
        for variant in ("before", "after"):
            tracker.log_metrics(results[variant], 0, f"eval/{variant}")
        tracker.log_summary({f"{v}/{k}": x for v in ("before", "after") for k, x in results[v].items()})
        if dist.is_main and cfg.tracking.log_model:
            tracker.log_artifact(run_dir / "compressed", f"{run_dir.name}-compressed", "model",
                                 {"source": results["source"], "steps": results["steps"]})
    return results


@dataclass
class _Models:
    """The checkpoint being recovered, the config it was made with, and the two models of the distillation."""

    ckpt: Path
    run_cfg: RCCConfig
    device: torch.device
    student_w: Any  # the compressed model's wrapper (or bare module)
    teacher_w: ModelWrapper

    @property
    def student(self) -> nn.Module:
        return self.student_w.model if isinstance(self.student_w, ModelWrapper) else self.student_w

    @property
    def teacher(self) -> nn.Module:
        return self.teacher_w.model


@dataclass
class _Data:
    """The training and validation splits, their loaders, and the private-training engine (``None`` without)."""

    train_ds: Any
    val_ds: Any
    train_loader: Any
    val_loader: Any
    private: PrivateTraining | None


def _run_train(cfg: RCCConfig, source: str | Path, run_dir: Path, resume: bool, progress: bool, dist: DistInfo,
               tracker: ExperimentTracker) -> dict[str, Any]:
    models = _open_models(cfg, source, dist)
    data = _open_data(cfg, run_dir, dist, models)
    objective, teacher_fn, family = _objective(cfg, models, dist)
    ckpt_cb = ModelCheckpoint(run_dir / "checkpoints",
                              every_steps=cfg.training.checkpoint_every_steps or cfg.training.eval_every_steps,
                              monitor=cfg.training.monitor, mode=_monitor_mode(cfg.training.monitor))
    trainer = CompressionTrainer(models.student, objective, cfg.training, train_data=data.train_loader,
                                 val_data=data.val_loader,
                                 params=trainable_parameters(models.student, cfg.training.trainable),
                                 callbacks=_callbacks(cfg, run_dir, ckpt_cb, tracker, progress),
                                 seed=cfg.experiment.seed, device=models.device, dist=dist,
                                 metric_fn=_val_metrics(cfg, models, data), privacy=data.private)
    fit = _fit(cfg, trainer, ckpt_cb, models.student, resume)
    to_inference(models.student)  # the float parameters training needed go; the codes take the trained values
    results = {
        "source": str(models.ckpt), "teacher": models.run_cfg.model.name, "family": family,
        "world_size": dist.world_size, **fit,
        "data": {"train": data.train_ds.describe() | {"split": data.train_ds.split, "spec": data.train_ds.spec},
                 "val": data.val_ds.describe() | {"split": data.val_ds.split, "spec": data.val_ds.spec},
                 "batches_per_epoch": len(data.train_loader), "skipped_items": data.train_loader.skipped},
        "teacher_cache": {"hits": teacher_fn.cache_hits, "forward_calls": teacher_fn.forward_calls},
        "privacy": data.private.record() if data.private is not None else None,
    }
    if dist.is_main:
        _save_recovered(cfg, run_dir, models, results)
    return results


def _open_models(cfg: RCCConfig, source: str | Path, dist: DistInfo) -> _Models:
    """Seed, device, the compressed checkpoint (student) and its dense model (teacher)."""
    ckpt, run_cfg_raw = resolve_source(source)
    run_cfg = validate_config(run_cfg_raw, source=str(ckpt))
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
    device = device_for(dist, resolve_device(cfg.experiment.device))
    student_w, teacher_w = _load_models(ckpt, run_cfg, device)
    if cfg.training.batch_size % dist.world_size:
        raise ConfigError(f"training.batch_size {cfg.training.batch_size} must divide by the number of processes "
                          f"({dist.world_size})")
    return _Models(ckpt, run_cfg, device, student_w, teacher_w)


def _open_data(cfg: RCCConfig, run_dir: Path, dist: DistInfo, models: _Models) -> _Data:
    """The training split streamed (length buckets, augmentation, Poisson batches when private), a validation
    split; nothing shared with val or test (the leak check, recorded in ``data.json``)."""
    tcfg, teacher_w = cfg.training, models.teacher_w
    train_ds, val_ds = training_splits(cfg, teacher_w, fallback=models.run_cfg.calibration.source)
    roles: dict[str, list[Any]] = {"train": [train_ds], "val": [val_ds]}
    if cfg.dataset.test:
        roles["test"] = [open_role(cfg, teacher_w, cfg.dataset.test, "test")]
    check_and_record(run_dir if dist.is_main else None, roles, cfg.dataset.leak_check,
                     withhold=("train",) if tcfg.privacy is not None else ())
    common = {"tokenizer": teacher_w.tokenizer, "max_length": teacher_w.max_text_length, "seed": cfg.experiment.seed,
              "num_workers": cfg.dataset.num_workers, "prefetch_factor": cfg.dataset.prefetch_factor,
              "answers_as_labels": getattr(teacher_w, "is_vqa", False), "keys": model_keys(teacher_w),
              "device": models.device}
    private, poisson = _private_training(cfg, len(train_ds))
    train_loader = split_loader(train_ds, "train", tcfg.batch_size // dist.world_size,
                                augment=augment_from_config(cfg.dataset, train_ds.transform),
                                max_tokens=cfg.dataset.max_tokens, bucket=cfg.dataset.bucket_by_length,
                                poisson=poisson, **common)
    val_loader = split_loader(val_ds, "val", max(1, cfg.dataset.batch_size // dist.world_size), **common)
    if len(train_loader) == 0:
        raise DataError(f"{train_ds.source}: {len(train_ds)} items make no training batch of "
                        f"{tcfg.batch_size // dist.world_size}; lower training.batch_size")
    return _Data(train_ds, val_ds, train_loader, val_loader, private)


def _objective(cfg: RCCConfig, models: _Models, dist: DistInfo) -> tuple[DistillationObjective, Teacher, str]:
    """The distillation loss of the model's family against the (cached) teacher; returns it, the teacher and the
    family."""
    tcfg, student, teacher = cfg.training, models.student, models.teacher
    forward_kwargs: dict[str, Any] = {}
    if tcfg.attention_weight:
        for m in (student, teacher):
            m.set_attn_implementation("eager")
        forward_kwargs["output_attentions"] = True
    family = model_family(student)
    smoothing = float(getattr(student.config.text_config, "label_smoothing", 0.0) or 0.0) if family == "blip" else 0.0
    loss = DistillationLoss(family, LossWeights.from_config(tcfg), tcfg.temperature,
                            gather=gather_with_grad if dist.enabled else None, label_smoothing=smoothing)
    teacher_fn = Teacher(teacher, cache_dir=tcfg.teacher_cache, forward_kwargs=forward_kwargs, device=models.device)
    return DistillationObjective(loss, teacher_fn, forward_kwargs), teacher_fn, family


def _val_metrics(cfg: RCCConfig, models: _Models, data: _Data) -> Callable[[nn.Module], dict[str, float]]:
    """Validation metrics besides the loss: agreement with the teacher (its outputs computed once), and the
    ``training.val_benchmarks`` on the validation split."""
    teacher_val: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def val_metrics(model: nn.Module) -> dict[str, float]:
        s_out, t_out = [], []
        for i, batch in enumerate(data.val_loader):
            batch = to_device(batch, models.device)
            if i >= len(teacher_val):
                teacher_val.append(_primary(models.teacher(**batch)))
            s_out.append(_primary(model(**batch)))
            t_out.append(teacher_val[i])
        out = {"val_agreement": output_agreement(s_out, t_out)}
        if cfg.training.val_benchmarks:
            res = evaluate_model(models.student_w, cfg.training.val_benchmarks, [data.val_ds],
                                 batch_size=cfg.dataset.batch_size, bootstrap_samples=0, seed=cfg.experiment.seed)
            for bench, per_dataset in res.get("results", {}).items():
                for r in per_dataset.values():
                    for name in HEADLINE_METRICS:
                        m = r.get("metrics", {}).get(name)
                        if isinstance(m, dict) and "value" in m:
                            out[f"val_{bench}_{name}"] = float(m["value"])
        return out

    return val_metrics


def _callbacks(cfg: RCCConfig, run_dir: Path, ckpt_cb: ModelCheckpoint, tracker: ExperimentTracker,
               progress: bool) -> list[Callback]:
    tcfg = cfg.training
    callbacks: list[Callback] = [LearningRateMonitor(), LoggingCallback(every_steps=50), ckpt_cb,
                                 TrackingCallback(tracker), ProgressFile(run_dir / "progress.json")]
    if tcfg.early_stopping_patience:
        callbacks.insert(0, EarlyStopping(tcfg.monitor, tcfg.early_stopping_patience, mode=_monitor_mode(tcfg.monitor)))
    if progress:
        callbacks.append(ProgressBar("recovery"))
    return callbacks


def _fit(cfg: RCCConfig, trainer: CompressionTrainer, ckpt_cb: ModelCheckpoint, student: nn.Module,
         resume: bool) -> dict[str, Any]:
    """Validate, train (resumed from the last checkpoint when asked), validate; keep the best of the input, the
    best validation and the last step. Returns what the results record of the fit."""
    tcfg = cfg.training
    monitor, mode = tcfg.monitor, _monitor_mode(tcfg.monitor)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    before = trainer.validate()
    if monitor not in before:
        raise ConfigError(f"training.monitor: {monitor!r} is not measured; validation gives: {', '.join(before)} "
                          "(task metrics need training.val_benchmarks)")
    if resume and (ckpt_cb.last / "trainer_state.json").is_file():
        trainer.load_checkpoint(ckpt_cb.last)
        st = trainer.state
        if (tcfg.max_steps is not None and st.step < tcfg.max_steps) or (
                tcfg.max_steps is None and st.epoch < trainer.num_epochs):
            st.should_stop = False  # a longer run than the one that finished: go on
        log.info("resuming from %s at epoch %d, step %d", ckpt_cb.last, st.epoch, st.step)
    state = trainer.fit()
    history, steps, stopped = list(state.history), state.step, state.should_stop
    after = trainer.validate()
    kept = "last"
    best_path = ckpt_cb.directory / "best"
    if _better(before[monitor], after.get(monitor), mode) and not _better(ckpt_cb.best, before[monitor], mode):
        student.load_state_dict(initial)
        kept = "input"
    elif _better(ckpt_cb.best, after.get(monitor), mode) and (best_path / "trainer_state.json").is_file():
        trainer.load_checkpoint(best_path)
        kept = f"step {trainer.state.step}"
    if kept != "last":
        after = trainer.validate()
        log.warning("%s was best at the %s; keeping that model", monitor, kept)
    trainer.close()
    return {"steps": steps, "epochs": state.epoch, "stopped_early": stopped, "kept": kept, "monitor": monitor,
            "before": before, "after": after, "history": history}


def _save_recovered(cfg: RCCConfig, run_dir: Path, models: _Models, results: dict[str, Any]) -> None:
    """The recovered model as a compressed checkpoint (its stage records plus this training's), and the results."""
    records = list(read_manifest(models.ckpt).get("stages") or [])
    step_records(records, where=str(models.ckpt / MANIFEST))  # the steps it carries on are checked, not trusted
    records.append({"stage": "train", "steps": results["steps"], "epochs": results["epochs"],
                    "kept": results["kept"], "before": results["before"], "after": results["after"],
                    **({"privacy": results["privacy"]} if results["privacy"] is not None else {})})
    save_compressed(models.student_w, run_dir / "compressed", config=dump_config(cfg), records=records,
                    overwrite=True)
    atomic_write_json(run_dir / "train_results.json", results)


def _private_training(cfg: RCCConfig, items: int) -> tuple[PrivateTraining | None, PoissonBatchSampler | None]:
    """``training.privacy``'s DP-SGD engine and the Poisson sampler of its batches (``(None, None)`` without)."""
    tcfg = cfg.training
    if tcfg.privacy is None:
        return None, None
    per_epoch = steps_per_epoch(items, tcfg.batch_size)
    planned = tcfg.max_steps if tcfg.max_steps is not None else tcfg.num_epochs * per_epoch
    private = PrivateTraining(tcfg.privacy, items, tcfg.batch_size, planned)
    log.info("private training: %d items, sample rate %.4g, noise multiplier %.4g, %d steps planned (epsilon %.3f "
             "of %g, delta %g)", items, private.sample_rate, private.noise_multiplier, planned,
             private.planned_epsilon, tcfg.privacy.epsilon, tcfg.privacy.delta)
    return private, PoissonBatchSampler(items, private.sample_rate, per_epoch, private.generator)


def _primary(out: Any) -> dict[str, torch.Tensor]:
    flat = flatten_outputs(out)
    keys = [k for k in PRIMARY_OUTPUTS if k in flat] or list(flat)
    return {k: flat[k].detach() for k in keys}


def train_job(cfg: RCCConfig, source: str | Path, output: Path | None = None, resume: bool = False,
              overwrite: bool = False, verbosity: int = 0, progress: bool = True
              ) -> tuple[Path, dict[str, Any] | None]:
    """``rcc train``: run directory, logging and run record (rank 0), :func:`run_train`, process group.

    Returns the run directory and the results (``None`` on ranks other than 0).
    """
    dist = init_distributed()
    try:
        if output is None:
            if dist.enabled:
                raise ConfigError("under torchrun give --output: every rank must use the same run directory")
            run_dir = new_run_dir(cfg.experiment.output_dir, f"{cfg.experiment.name}-train")
        else:
            run_dir = prepare_run_dir(output, overwrite, resume) if dist.is_main else output
        barrier(dist)
        setup_logging(verbosity if dist.is_main else -1, run_dir if dist.is_main else None,
                      default=logging.WARNING)  # the console shows the bar and the result; run.log the steps
        record = RunRecord(run_dir, dump_config(cfg), cfg.experiment.seed) if dist.is_main else None
        with record if record is not None else contextlib.nullcontext():
            results = run_train(cfg, source, run_dir, resume=resume, progress=progress and dist.is_main, dist=dist)
            if record is not None:
                record.update(results={k: results[k] for k in ("source", "teacher", "steps", "epochs", "before",
                                                                "after", "stopped_early", "world_size", "privacy")})
    finally:
        cleanup()
    return run_dir, results if dist.is_main else None
