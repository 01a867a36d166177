"""``rcc train``: recover a compressed run by distillation from the dense model it came from.

:func:`run_train` fine-tunes the compressed model of a run directory (or checkpoint) against its
dense model and saves the result as a new compressed checkpoint; :func:`train_job` adds the run
directory, logging, run record and the process group of a ``torchrun`` launch.
"""

from __future__ import annotations

import contextlib
import functools
from math import inf
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.calibration import output_agreement, run_outputs
from ..compression.storage import MANIFEST, load_compressed, read_manifest, save_compressed
from ..config import RCCConfig, dump_config, load_config, validate_config
from ..data.collate import pad_collate
from ..errors import CheckpointError, ConfigError
from ..models.base import ModelWrapper
from ..models.registry import get_model
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
    BatchesDataset,
    DistInfo,
    barrier,
    cleanup,
    device_for,
    gather_with_grad,
    init_distributed,
    make_loader,
)
from ..training.losses import DistillationLoss, LossWeights, model_family
from ..training.recovery import trainable_parameters
from ..training.teacher import Teacher
from ..training.trainer import CompressionTrainer, DistillationObjective
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger, setup_logging
from ..utils.runs import RunRecord, new_run_dir
from ..utils.seeding import seed_everything
from ..utils.tracking import ExperimentTracker
from .common import calibration_batches, prepare_run_dir, resolve_device

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


def run_train(cfg: RCCConfig, source: str | Path, run_dir: Path, resume: bool = False, progress: bool = True,
              dist: DistInfo | None = None) -> dict[str, Any]:
    """Fine-tune the compressed model in ``source`` by distillation from its dense model; save into ``run_dir``.

    Writes ``run_dir/compressed`` (the recovered model, same format), ``run_dir/checkpoints/last``
    (trainer state, for ``resume``), ``run_dir/progress.json`` while it trains and
    ``run_dir/train_results.json``; sends steps, validations and the result to ``cfg.tracking``'s
    backends (rank 0). Works under ``torchrun`` (every rank calls it; rank 0 writes).
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


def _run_train(cfg: RCCConfig, source: str | Path, run_dir: Path, resume: bool, progress: bool, dist: DistInfo,
               tracker: ExperimentTracker) -> dict[str, Any]:
    tcfg = cfg.training
    ckpt, run_cfg_raw = resolve_source(source)
    run_cfg = validate_config(run_cfg_raw, source=str(ckpt))
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
    device = device_for(dist, resolve_device(cfg.experiment.device))
    student_w, teacher_w = _load_models(ckpt, run_cfg, device)
    student = student_w.model if isinstance(student_w, ModelWrapper) else student_w
    teacher = teacher_w.model
    if tcfg.batch_size % dist.world_size:
        raise ConfigError(f"training.batch_size {tcfg.batch_size} must divide by the number of processes "
                          f"({dist.world_size})")
    batches = calibration_batches(teacher_w, cfg, cfg.dataset.train or cfg.calibration.source)
    n_hold = cfg.calibration.holdout_batches
    fit, holdout = (batches[:-n_hold], batches[-n_hold:]) if n_hold else (batches, [])
    per_rank = tcfg.batch_size // dist.world_size
    # rows of calibration batches padded to different lengths batch together, padded again
    collate = functools.partial(pad_collate, pad_token_id=getattr(teacher_w.tokenizer, "pad_token_id", None) or 0)
    train_loader = make_loader(BatchesDataset(fit), per_rank, dist, seed=cfg.experiment.seed, collate_fn=collate)
    val_loader = (make_loader(BatchesDataset(holdout), max(1, cfg.calibration.batch_size // dist.world_size), dist,
                              shuffle=False, collate_fn=collate) if holdout else None)
    forward_kwargs: dict[str, Any] = {}
    if tcfg.attention_weight:
        for m in (student, teacher):
            m.set_attn_implementation("eager")
        forward_kwargs["output_attentions"] = True
    family = model_family(student)
    loss = DistillationLoss(family, LossWeights.from_config(tcfg), tcfg.temperature,
                            gather=gather_with_grad if dist.enabled else None,
                            label_smoothing=float(getattr(student.config.text_config, "label_smoothing", 0.0) or 0.0)
                            if family == "blip" else 0.0)
    teacher_fn = Teacher(teacher, cache_dir=tcfg.teacher_cache, forward_kwargs=forward_kwargs, device=device)
    objective = DistillationObjective(loss, teacher_fn, forward_kwargs)
    teacher_holdout = run_outputs(teacher, holdout, device) if holdout else []

    def agreement(model: nn.Module) -> dict[str, float]:
        if not holdout:
            return {}
        return {"val_agreement": output_agreement(run_outputs(model, holdout, device), teacher_holdout)}

    ckpt_cb = ModelCheckpoint(run_dir / "checkpoints", every_steps=tcfg.checkpoint_every_steps,
                              monitor="val_loss" if holdout else None)
    callbacks: list[Callback] = [LearningRateMonitor(), LoggingCallback(every_steps=50), ckpt_cb,
                                 TrackingCallback(tracker), ProgressFile(run_dir / "progress.json")]
    if tcfg.early_stopping_patience:
        callbacks.insert(0, EarlyStopping("val_loss", tcfg.early_stopping_patience))
    if progress:
        callbacks.append(ProgressBar("recovery"))
    trainer = CompressionTrainer(student, objective, tcfg, train_data=train_loader, val_data=val_loader,
                                 params=trainable_parameters(student, tcfg.trainable), callbacks=callbacks,
                                 seed=cfg.experiment.seed, device=device, dist=dist, metric_fn=agreement)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    before = trainer.validate()
    if resume and (ckpt_cb.last / "trainer_state.json").is_file():
        trainer.load_checkpoint(ckpt_cb.last)
        log.info("resuming from %s at epoch %d, step %d", ckpt_cb.last, trainer.state.epoch, trainer.state.step)
    state = trainer.fit()
    history, steps, stopped = list(state.history), state.step, state.should_stop
    after = trainer.validate()
    kept = "last"
    # keep the best of the input and every epoch, by validation loss (NaN counts as worst)
    best = ckpt_cb.best if ckpt_cb.best is not None else inf
    last = after.get("val_loss", inf) if after.get("val_loss") == after.get("val_loss") else inf
    if holdout and before["val_loss"] <= min(last, best):
        student.load_state_dict(initial)
        kept = "input"
    elif holdout and best < last:
        trainer.load_checkpoint(ckpt_cb.directory / "best")
        kept = f"epoch {trainer.state.epoch}"
    if kept != "last":
        after = trainer.validate()
        log.warning("validation loss was lowest at the %s; keeping that model", kept)
    trainer.close()
    results = {
        "source": str(ckpt), "teacher": run_cfg.model.name, "family": family, "world_size": dist.world_size,
        "steps": steps, "epochs": len(history), "stopped_early": stopped, "kept": kept,
        "before": before, "after": after, "history": history,
        "teacher_cache": {"hits": teacher_fn.cache_hits, "forward_calls": teacher_fn.forward_calls},
    }
    if dist.is_main:
        records = list(read_manifest(ckpt).get("stages") or [])
        records.append({"stage": "train", "steps": steps, "epochs": len(history), "kept": kept, "before": before,
                        "after": after})
        save_compressed(student_w, run_dir / "compressed", config=dump_config(cfg), records=records, overwrite=True)
        atomic_write_json(run_dir / "train_results.json", results)
    return results


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
        setup_logging(verbosity if dist.is_main else -1, run_dir if dist.is_main else None)
        record = RunRecord(run_dir, dump_config(cfg), cfg.experiment.seed) if dist.is_main else None
        with record if record is not None else contextlib.nullcontext():
            results = run_train(cfg, source, run_dir, resume=resume, progress=progress and dist.is_main, dist=dist)
            if record is not None:
                record.update(results={k: results[k] for k in ("source", "teacher", "steps", "epochs", "before",
                                                                "after", "stopped_early", "world_size")})
    finally:
        cleanup()
    return run_dir, results if dist.is_main else None
