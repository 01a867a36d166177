"""``compress_model(..., pipeline="sequential")``: which pipeline a run takes, and the sequential one wired up.

:func:`choose_pipeline` reads ``compression.cascade.pipeline``: ``whole`` or ``sequential`` as asked,
or ``auto``: sequential when the model's bytes exceed ``sequential_memory_share`` of the memory
available (the whole cascade peaks near 2.8x the model), logged with the numbers that decided.
:func:`compress_sequential` runs :class:`~rcc_compression.compression.sequential.SequentialPipeline`
on a model directory (read a block at a time from its safetensors files) or on a model in memory,
with the same calibration defaults, plan and distiller as the whole pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from ..compression.cascade import compression_summary
from ..compression.layers import to_inference
from ..compression.matching import check_section_patterns
from ..compression.placement import CheckpointSource, ResidentSource, model_bytes
from ..compression.rate import achieved_rate
from ..compression.sequential import STATE_DIR, SequentialPipeline, SequentialResult
from ..compression.stage import Distiller
from ..compression.storage import load_compressed
from ..compression.towers import tower_bytes
from ..config import RCCConfig
from ..errors import CompressionError
from ..models.base import ModelWrapper
from ..models.registry import BUNDLED, detect_model_type, get_model, load_processors, unwrap_model, wrap_model
from ..models.tiny import RANDOM_MODELS, TINY_MODELS
from ..utils.logging import get_logger
from ..utils.progress import interactive, progress_bar
from .common import fit_and_holdout

log = get_logger("jobs")

GIB = 2**30
PIPELINES = ("auto", "whole", "sequential")


@dataclass(frozen=True)
class PipelineChoice:
    """The pipeline a run takes and why; the bytes and memory that decided (``None``: not looked at)."""

    name: str
    why: str
    model_bytes: int | None = None
    available_bytes: int | None = None


def model_directory(model: Any) -> Path | None:
    """The local directory a model name or path stands for (a bundled name's), or ``None`` (a hub id, a tiny
    test model, a module)."""
    if isinstance(model, nn.Module):
        return None
    key = str(model)
    if key in TINY_MODELS or key in RANDOM_MODELS:
        return None
    if key in BUNDLED:
        return BUNDLED[key]
    path = Path(os.path.expanduser(key))
    return path if path.is_dir() else None


def choose_pipeline(model: Any, requested: str, cfg: RCCConfig) -> PipelineChoice:
    """``whole`` or ``sequential`` (see the module docstring); ``auto`` decides by the model's bytes."""
    if requested not in PIPELINES:
        raise CompressionError(f"pipeline must be one of {', '.join(PIPELINES)}, got {requested!r}")
    if requested != "auto":
        return PipelineChoice(requested, f"asked for (pipeline={requested})")
    directory = model_directory(model)
    if isinstance(model, nn.Module):
        nbytes = model_bytes(unwrap_model(model))
    elif directory is not None and _weight_files(directory):
        nbytes = sum(f.stat().st_size for f in _weight_files(directory))
    else:
        return PipelineChoice("whole", "auto: the model's size is not known before it is loaded (a hub id or a "
                                       "test model); compressed whole")
    available = psutil.virtual_memory().available
    share = cfg.compression.cascade.sequential_memory_share
    if nbytes > share * available:
        why = (f"auto: the model's {nbytes / GIB:.2f} GiB exceed {share * 100:g} % of the {available / GIB:.2f} GiB of "
               "memory available (compression.cascade.sequential_memory_share): compressed a block at a time")
        log.warning(why)
        return PipelineChoice("sequential", why, nbytes, available)
    why = (f"auto: the model's {nbytes / GIB:.2f} GiB are within {share * 100:g} % of the {available / GIB:.2f} GiB of "
           "memory available: compressed whole")
    log.info(why)
    return PipelineChoice("whole", why, nbytes, available)


def resumed_pipeline(run_dir: Path) -> PipelineChoice:
    """The pipeline a run directory was compressed with (a resumed run keeps it, whatever ``auto`` would say now)."""
    if (run_dir / STATE_DIR).is_dir():
        return PipelineChoice("sequential", "resumed: the run was compressing a block at a time")
    return PipelineChoice("whole", "resumed: the run was compressing the model whole")


def _weight_files(directory: Path) -> list[Path]:
    """A model directory's weight files, whatever their format (safetensors, PyTorch ``.bin``)."""
    return [f for pattern in ("*.safetensors", "*.bin") for f in sorted(directory.glob(pattern)) if f.is_file()]


def sequential_source(model: Any, cfg: RCCConfig) -> tuple[CheckpointSource | ResidentSource, nn.Module, str]:
    """``(source, the wrapper or module calibration batches are built with, name)`` of a run."""
    directory = model_directory(model)
    dtype = getattr(torch, cfg.model.dtype)
    if directory is not None:
        source = CheckpointSource(directory, cfg.model.type, dtype)
        cfg_data = json.loads((directory / "config.json").read_text())
        img, tok = load_processors(directory, cfg.model.type or detect_model_type(cfg_data))
        return source, wrap_model(source.model, img, tok, name=str(model)), str(model)
    if not isinstance(model, nn.Module):  # a test model (built here) or a hub id (loaded whole)
        model = get_model(model, cfg.model.type, cfg.model.dtype)
    return ResidentSource(unwrap_model(model)), model, str(getattr(model, "name", type(model).__name__))


def compress_sequential(
    model: Any, compression_rate: float | None, method: str, calibration_data: Iterable[Mapping[str, Any]] | None,
    cfg: RCCConfig, chosen: PipelineChoice, *, scope: str = "layers",
    holdout_data: Iterable[Mapping[str, Any]] | None = None, run_dir: str | os.PathLike[str] | None = None,
    seed: int = 0, device: str | torch.device | None = None,
    progress_callback: Callable[[str, int, int], None] | None = None, progress: bool | None = None,
    distill: Distiller | None = None, resume: bool = False,
) -> nn.Module:
    """``compress_model`` on the sequential pipeline; returns the compressed model with ``compression_stats``.

    A model directory is read a block at a time and its checkpoint written to ``run_dir/compressed`` (a
    temporary directory when ``run_dir`` is not given), then loaded back (the compressed model is what
    is returned); a model in memory is compressed in place. ``compression_stats["pipeline"]`` holds the
    choice and every block's time, peak resident set and bytes.
    """
    section = cfg.compression
    section.cascade.stages = list(section.cascade.stages) if method == "cascade" else [method]
    if compression_rate is None and section.cascade.target_rate is not None:
        compression_rate, scope = section.cascade.target_rate, section.cascade.rate_scope
    source, calib_model, name = sequential_source(model, cfg)
    fit, holdout, cal_source = fit_and_holdout(model, calib_model, cfg, seed, calibration_data, holdout_data)
    check_section_patterns(source.model, section)
    temp = None
    if run_dir is None and not source.resident:
        temp = tempfile.mkdtemp(prefix="rcc-sequential-")
        run_dir = temp
    try:
        with progress_bar(interactive() if progress is None else progress, by_first_word=True) as bar:

            def report(what: str, done: int, total: int) -> None:
                bar(what, done, total)
                if progress_callback is not None:
                    progress_callback(what, done, total)

            pipe = SequentialPipeline(section, calibration_data=fit, holdout_data=holdout, rate=compression_rate,
                                      scope=scope, run_dir=run_dir, seed=seed, device=device, distill=distill,
                                      progress_callback=report, run_config=cfg.model_dump(mode="json"))
            result = pipe.run(source, calib_model if isinstance(calib_model, ModelWrapper) else None, resume=resume)
        out = _result_model(calib_model, source, result)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    inner = unwrap_model(out)
    stats: dict[str, Any] = {"pipeline": {**asdict(chosen), "blocks": result.blocks, "notes": result.notes,
                                          "checkpoint": None if temp else (str(result.checkpoint)
                                                                           if result.checkpoint else None)},
                             "plan": result.plan, "summary": compression_summary(inner), "gate": result.gate,
                             "calibration": cal_source, "towers": tower_bytes(inner), "records": [],
                             "model": name}
    if compression_rate is not None:
        stats["achieved_rate"] = achieved_rate(inner, scope)
    out.compression_stats = stats
    return out


def _result_model(held: nn.Module, source: CheckpointSource | ResidentSource, result: SequentialResult
                  ) -> nn.Module:
    """The compressed model: the one held (compressed in place), or the checkpoint written, loaded."""
    if source.resident:
        to_inference(source.model)
        return held
    if result.checkpoint is None:
        raise CompressionError("the sequential run wrote no checkpoint")
    return load_compressed(result.checkpoint)


__all__ = ["PipelineChoice", "choose_pipeline", "compress_sequential", "model_directory", "resumed_pipeline",
           "sequential_source"]
