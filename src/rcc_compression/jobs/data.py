"""What a job reads: the splits its config names, checked for leaks, recorded in ``data.json``.

Every job opens its data here: ``rcc compress`` its calibration draws, the gate's held-out split
and the evaluation datasets; ``rcc train`` its training and validation splits; ``rcc evaluate``
its test sets. :func:`check_and_record` refuses any image that a model learns from (calibration,
train) and is also measured on (val, test), and writes what each role read, with the identities of
its images, to the run directory's ``data.json``. ``rcc evaluate`` reads the ``data.json`` of the
runs a model came from (its compression run, then each recovery run) and checks its test sets
against them too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import RCCConfig
from ..data.calibration import captions_for_classes
from ..data.datasets import MultimodalDataset
from ..data.splits import check_splits, describe_parts, image_identities, open_split, parse_spec
from ..data.transforms import transform_for
from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger

log = get_logger("jobs")

DATA_FILE = "data.json"
#: identities are written to data.json for roles up to this many images (beyond: count and hash only)
MAX_LISTED = 200_000
#: at most this many items are carved out of a training split that has no val split of its own
CARVE_MAX, CARVE_FRACTION = 1000, 0.05


def open_role(cfg: RCCConfig, wrapper: Any, text: str, default_split: str, task: str | None = None
              ) -> MultimodalDataset:
    """``SPEC[@SPLIT]`` opened for ``wrapper`` (its image transform), cached when ``dataset.cache_dir`` says so."""
    ds = open_split(text, default_split, task=task or cfg.dataset.task, transform=transform_for(wrapper),
                    skip_bad=cfg.dataset.skip_bad, root=cfg.dataset.root)
    if cfg.dataset.cache_dir:
        ds.cache_data(cfg.dataset.cache_dir)
    return ds


def _carve(ds: MultimodalDataset, seed: int) -> tuple[MultimodalDataset, MultimodalDataset]:
    """(train, val) views of one split: a seeded ``CARVE_FRACTION`` (at most ``CARVE_MAX``) held out."""
    n = len(ds)
    k = max(1, min(CARVE_MAX, int(round(n * CARVE_FRACTION))))
    if n < 2 * k:
        raise DataError(f"{ds.source}: {n} items are too few to hold out a validation split; name one with --val")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:k])
    train, val = copy.copy(ds), copy.copy(ds)
    train.records = [r for i, r in enumerate(ds.records) if i not in held]
    val.records = [ds.records[i] for i in sorted(held)]
    val.split = f"{ds.split} (held out: {k} items)"
    train.split = f"{ds.split} (less {k} held out)"
    return train, val


def training_splits(cfg: RCCConfig, wrapper: Any, fallback: str | None = None
                    ) -> tuple[MultimodalDataset, MultimodalDataset]:
    """The (train, val) datasets of ``rcc train``: see :func:`rcc_compression.jobs.train.run_train`."""
    spec = cfg.dataset.train or (fallback if fallback not in (None, "synthetic") else None)
    if not spec:
        raise ConfigError("rcc train needs training data: --data SPEC (dataset.train), e.g. --data world or "
                          "--data /data/coco; the compressed run calibrated on synthetic inputs")
    task = "vqa" if getattr(wrapper, "is_vqa", False) else None
    train = captions_for_classes(open_role(cfg, wrapper, spec, "train", task))
    if cfg.dataset.val:
        val = open_role(cfg, wrapper, cfg.dataset.val, "val", task)
    else:
        base, split = parse_spec(spec, "train")
        try:
            val = open_role(cfg, wrapper, f"{base}@val", "val", task)
        except DataError:
            val = None
        if val is not None and val.source != train.source:
            log.info("validating on the val split of %s (set dataset.val / --val to choose another)", base)
        else:  # no val split, or a format without splits (one tsv, one folder of classes)
            train, val = _carve(train, cfg.experiment.seed)
            log.info("%s has no val split: %s", base, val.split)
    val = captions_for_classes(val)
    if cfg.training.val_max_items and len(val) > cfg.training.val_max_items:
        keep = sorted(torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.experiment.seed))
                      [:cfg.training.val_max_items].tolist())
        val = copy.copy(val)
        val.records = [val.records[i] for i in keep]
    return train, val


def check_and_record(run_dir: Path | None, roles: Mapping[str, Sequence[Any]], mode: str,
                     extra: Mapping[str, Any] | None = None, withhold: Sequence[str] = ()) -> dict[str, Any]:
    """Leak-check ``roles`` (see :func:`~rcc_compression.data.splits.check_splits`) and write ``data.json``.

    The identities of the roles in ``withhold`` are not written (private training: a list of the
    pixel hashes or paths of every training image would tell anyone holding a photo whether it
    was trained on); the lineage check of ``rcc evaluate`` then cannot see them.
    """
    record = check_splits(roles, mode, identities=True)
    identities = {role: ids for role, ids in record.pop("identities", {}).items()
                  if len(ids) <= MAX_LISTED and role not in withhold}
    out = {"leak_check": record, "roles": describe_parts(roles), "identities": identities, **(extra or {})}
    if withhold:
        out["identities_withheld"] = {role: "training.privacy: a membership list is not recorded"
                                      for role in withhold if role in roles}
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / DATA_FILE, out)
    return out


def lineage(model: str | Path) -> list[Path]:
    """The run directories a saved model came from: its own run, then each run it was trained from."""
    path = Path(str(model))
    run = path.parent if (path / "manifest.json").is_file() else path
    out: list[Path] = []
    while (run / DATA_FILE).is_file() and run not in out:
        out.append(run)
        try:
            source = json.loads((run / "train_results.json").read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError):
            break
        if not source:
            break
        src = Path(source)
        run = src.parent if (src / "manifest.json").is_file() else src
    return out


def check_against_lineage(model: str | Path, datasets: Sequence[MultimodalDataset]) -> list[str]:
    """Refuse test datasets holding an image that a run in the model's lineage learned from.

    Returns the run directories checked (empty when the model has no recorded lineage).
    """
    checked = []
    for run in lineage(model):
        record = json.loads((run / DATA_FILE).read_text(encoding="utf-8"))
        mode = record.get("leak_check", {}).get("mode", "off")
        learned = {i for role in ("calibration", "train") for i in record.get("identities", {}).get(role, [])}
        if mode == "off" or not learned:
            continue
        for ds in datasets:
            shared = set(image_identities(ds, None, mode)) & learned
            if shared:
                raise DataError(f"split leak: {len(shared)} image(s) of {ds.source} were used to calibrate or train "
                                f"the model (run {run}, by {mode}); evaluate on data it never saw")
        checked.append(str(run))
    return checked


def model_keys(wrapper: Any) -> tuple[str, ...]:
    """The batch entries a model's forward takes (BLIP VQA also its answer tokens as ``labels``)."""
    if getattr(wrapper, "is_vqa", False):
        return ("pixel_values", "input_ids", "attention_mask", "labels")
    return ("pixel_values", "input_ids", "attention_mask")
