"""What every job sets up: the device, calibration batches, the run directory and the checkpoint key."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CalibrationSection, RCCConfig
from ..data.calibration import build_calibration_batches, check_paired_batches
from ..errors import CheckpointError, CompressionError
from ..models.registry import BUNDLED, unwrap_model
from ..models.tiny import TINY_MODELS
from ..utils.crypto import KEY_ENV, load_key
from ..utils.logging import get_logger

log = get_logger("jobs")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def calibration_batches(wrapper: nn.Module, cfg: RCCConfig, source: str | None = None) -> list[dict[str, Any]]:
    """Calibration batches (fit + holdout) for the model from the configured source."""
    cal = cfg.calibration
    total = cal.num_batches + cal.holdout_batches
    src = source or cal.source
    return build_calibration_batches(wrapper, src, total, cal.batch_size, cfg.experiment.seed,
                                     skip_bad=cfg.dataset.skip_bad, root=cfg.dataset.root,
                                     allow_unpaired=cal.allow_unpaired)


def evaluation_datasets(cfg: RCCConfig) -> list[str]:
    """What a run evaluates on: ``evaluation.datasets`` and ``dataset.test``; the world when neither is set."""
    test = [cfg.dataset.test] if cfg.dataset.test else []
    return list(dict.fromkeys([*cfg.evaluation.datasets, *test])) or ["world"]


def checkpoint_key(encrypt: bool = False, key_file: str | Path | None = None, resume_dir: Path | None = None
                   ) -> bytes | None:
    """The key that encrypts a run's checkpoints, or ``None`` for a run without encryption.

    A new run is encrypted when asked (``--encrypt`` or ``--key-file``). A resumed run keeps what it
    was: an encrypted run needs its key again, so that nothing it writes later is in the clear. The
    key comes from ``key_file`` or the ``RCC_CHECKPOINT_KEY`` environment variable.
    """
    was_encrypted = False
    if resume_dir is not None:
        for name in ("run.json", "progress.json"):
            try:
                was_encrypted |= json.loads((resume_dir / name).read_text(encoding="utf-8")).get("encrypted") is True
            except (OSError, ValueError, AttributeError):
                continue
    if not (encrypt or key_file is not None or was_encrypted):
        return None
    key = load_key(key_file)
    if key is None:
        why = "this run's checkpoints are encrypted" if was_encrypted else "--encrypt"
        raise CheckpointError(f"{why}: no key given; set {KEY_ENV} (64 hex digits or base64 of 32 bytes) "
                              "or pass --key-file")
    return key


def prepare_run_dir(path: Path, overwrite: bool, resume: bool) -> Path:
    """Create the run directory; a non-empty one needs ``overwrite`` (or ``resume``)."""
    if path.exists() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise CheckpointError(f"{path}: directory is not empty; pass --overwrite to replace it or --resume")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_name(model: Any, wrapper: nn.Module) -> str | None:
    """The name of a bundled model (one that calibrates on the world by itself), else ``None``."""
    name = model if isinstance(model, (str, os.PathLike)) else getattr(wrapper, "name", None)
    name = str(name) if name is not None else None
    bundled = name is not None and (name in BUNDLED or name in TINY_MODELS)
    return name if bundled and getattr(wrapper, "tokenizer", None) is not None else None


def world_batches(wrapper: nn.Module, cal: CalibrationSection, seed: int) -> list[dict[str, Any]]:
    """``num_batches + holdout_batches`` world-data calibration batches (the holdout last)."""
    batches = build_calibration_batches(wrapper, "world", cal.num_batches + cal.holdout_batches, cal.batch_size, seed)
    log.info("calibrating %s on the world data: %d batches of %d (%d held out for the gate)",
             getattr(wrapper, "name", "the model"), cal.num_batches, cal.batch_size, cal.holdout_batches)
    return batches


def default_calibration(model: Any, wrapper: nn.Module, cfg: RCCConfig, seed: int) -> tuple[list[dict[str, Any]], str]:
    """World-data calibration batches for a bundled model; any other model gets a one-line refusal."""
    if bundled_name(model, wrapper) is None:
        name = model if isinstance(model, (str, os.PathLike)) else getattr(wrapper, "name", None)
        raise CompressionError(
            f"compress_model needs calibration_data for {name or type(unwrap_model(wrapper)).__name__}: a list of "
            f"batches (dicts of keyword arguments for model(**batch)); only the bundled models "
            f"({', '.join(sorted(BUNDLED))} and the tiny test models) calibrate on the world data by themselves")
    return world_batches(wrapper, cfg.calibration, seed), "world"


def fit_and_holdout(model: Any, wrapper: nn.Module, cfg: RCCConfig, seed: int,
                    calibration_data: Iterable[Mapping[str, Any]] | None,
                    holdout_data: Iterable[Mapping[str, Any]] | None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """``(fit batches, gate batches, where the calibration data came from)`` of ``compress_model``.

    Without ``calibration_data`` a bundled model calibrates on the world data (``calibration.holdout_batches``
    of it held out); given batches without ``holdout_data`` keep their last ``min(2, n // 3)`` for the gate
    (none below 3 batches: the gate then says "not measured"). Paired models refuse unpaired batches.
    """
    source = "given"
    if calibration_data is None:
        calibration_data, source = default_calibration(model, wrapper, cfg, seed)
    calibration_data = list(calibration_data)
    check_paired_batches(wrapper, calibration_data, cfg.calibration.allow_unpaired)
    fit, holdout = split_holdout(calibration_data, holdout_data, source, cfg)
    return fit, holdout, source


def split_holdout(calibration_data: list[Any], holdout_data: Iterable[Mapping[str, Any]] | None, source: str,
                  cfg: RCCConfig) -> tuple[list[Any], list[Any] | None]:
    """The calibration batches planning fits on and the holdout the gate scores (kept apart before any planning)."""
    if holdout_data is not None:
        return calibration_data, list(holdout_data)
    if source == "world":
        n_hold = cfg.calibration.holdout_batches
        return (calibration_data[:-n_hold], calibration_data[-n_hold:]) if n_hold else (calibration_data, [])
    if len(calibration_data) >= 3:
        n_hold = min(2, len(calibration_data) // 3)
        return calibration_data[:-n_hold], calibration_data[-n_hold:]
    return calibration_data, None
