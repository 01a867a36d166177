"""What every job sets up: the device, calibration batches, the run directory and the checkpoint key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RCCConfig
from ..data.calibration import build_calibration_batches
from ..errors import CheckpointError
from ..utils.crypto import KEY_ENV, load_key


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
