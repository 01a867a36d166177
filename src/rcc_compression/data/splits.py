"""Train / val / test splits of a run's data, and the check that no split leaks into another.

A split is named by a dataset *spec* (what :func:`~rcc_compression.data.datasets.open_dataset`
reads: a path, ``hf:NAME``, ``world[:PART]``, a known name) and a split name, which is the
config key's (``dataset.train`` reads the ``train`` split) unless the spec ends in ``@SPLIT``:
``imagenet@val`` as a test set, ``/data/coco@restval``.

:func:`check_splits` takes every role of a run (``calibration`` and ``train`` on the training
side, ``val`` and ``test`` held out) and refuses, with one :class:`~rcc_compression.errors.DataError`
that names examples, any image of the training side that is also in a held-out role, and any image
shared by val and test. Images are identified by their decoded pixels (``content``: the same
picture under two file names, or once as a file and once in memory, is one image) or by their
resolved file path (``path``: cheap, for very large datasets; in-memory images still by content).
``auto`` hashes content up to :data:`CONTENT_LIMIT` images and paths beyond.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..utils.logging import get_logger
from .datasets import MultimodalDataset, open_dataset
from .transforms import CLIP_MEAN, CLIP_STD, TrainAugment, to_pil

log = get_logger("data")

#: roles whose items a model learns from, and roles that must not contain them
TRAINING_ROLES = ("calibration", "train")
HELD_OUT_ROLES = ("val", "test")
#: ``leak_check: auto`` identifies images by content up to this many, by path beyond
CONTENT_LIMIT = 20_000
_SPLIT_SUFFIX = re.compile(r"^(?P<spec>.+)@(?P<split>[A-Za-z0-9_.-]+)$")


def parse_spec(text: str, default_split: str) -> tuple[str, str]:
    """``"SPEC@SPLIT"`` -> ``(SPEC, SPLIT)``; ``"SPEC"`` -> ``(SPEC, default_split)``.

    A path that exists with an ``@`` in its name is taken whole.
    """
    text = str(text)
    m = _SPLIT_SUFFIX.match(text)
    if m and not Path(os.path.expanduser(text)).exists():
        return m["spec"], m["split"]
    return text, default_split


def open_split(
    text: str,
    default_split: str,
    task: str | None = None,
    transform: Any = None,
    skip_bad: bool = False,
    root: str | None = None,
) -> MultimodalDataset:
    """Open ``SPEC[@SPLIT]`` (the split defaults to ``default_split``)."""
    spec, split = parse_spec(text, default_split)
    ds = open_dataset(spec, split=split, task=task, transform=transform, skip_bad=skip_bad, root=root)
    ds.split = split
    ds.spec = text
    return ds


def open_splits(
    dataset_cfg: Any,
    transform: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    check: bool = True,
    splits: Sequence[str] = ("train", "val", "test"),
) -> dict[str, MultimodalDataset]:
    """The datasets of a ``DatasetSection``'s ``train``/``val``/``test`` keys that are set, leak-checked.

    ``cache_dir`` (default: the section's ``cache_dir``) keeps preprocessed images between runs.
    """
    out: dict[str, MultimodalDataset] = {}
    cache = cache_dir if cache_dir is not None else getattr(dataset_cfg, "cache_dir", None)
    for split in splits:
        text = getattr(dataset_cfg, split, None)
        if not text:
            continue
        ds = open_split(text, split, getattr(dataset_cfg, "task", None), transform, dataset_cfg.skip_bad,
                        getattr(dataset_cfg, "root", None))
        if cache is not None:
            ds.cache_data(cache)
        out[split] = ds
    if check and len(out) > 1:
        check_splits({k: [v] for k, v in out.items()}, getattr(dataset_cfg, "leak_check", "auto"))
    return out


def augment_from_config(dataset_cfg: Any, transform: Any = None) -> TrainAugment | None:
    """The training-split augmentation a ``DatasetSection`` asks for (``None`` when off)."""
    aug = getattr(dataset_cfg, "augment", None)
    if aug is None or not aug.enabled:
        return None
    mean = tuple(getattr(transform, "mean", CLIP_MEAN))
    std = tuple(getattr(transform, "std", CLIP_STD))
    return TrainAugment(scale=tuple(aug.scale), ratio=tuple(aug.ratio), brightness=aug.brightness,
                        contrast=aug.contrast, hflip=aug.hflip, mean=mean, std=std)


# --------------------------------------------------------------------------------- identities
def _pixel_hash(image: Any) -> str:
    arr = np.ascontiguousarray(np.asarray(to_pil(image), dtype=np.uint8))
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(arr.tobytes())
    return "px:" + h.hexdigest()[:32]


def image_identities(ds: MultimodalDataset, indices: Sequence[int] | None = None, mode: str = "content"
                     ) -> dict[str, str]:
    """``{identity: description}`` of the images behind ``indices`` (default: every record).

    ``content``: a hash of the decoded RGB pixels; ``path``: the resolved file path (images that
    are not files, in memory or inside a Hugging Face dataset, are hashed by content). An image
    that cannot be decoded is identified by its path (it is never used, but stays visible).
    """
    if mode not in ("content", "path"):
        raise ValueError(f"mode must be 'content' or 'path', got {mode!r}")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for i in (range(len(ds)) if indices is None else indices):
        key = ds.image_key(i)
        if key in seen:
            continue
        rec = ds.records[i]
        is_file = isinstance(rec.image, (str, os.PathLike)) and Path(rec.image).is_file()
        if mode == "path" and is_file:
            ident = "path:" + os.path.realpath(rec.image)
        else:
            try:
                ident = _pixel_hash(ds.load_raw(i))
            except Exception:  # noqa: BLE001 - an unreadable image keeps a name, it is not used anyway
                ident = "path:" + (os.path.realpath(rec.image) if is_file else key)
        seen[key] = ident
        out.setdefault(ident, f"{ds.source}: {rec.image_id}")
    return out



def check_splits(roles: Mapping[str, Sequence[Any]], mode: str = "auto", identities: bool = False
                 ) -> dict[str, Any]:
    """Refuse any image of a training role in a held-out role, and any image shared by val and test.

    ``roles`` maps a role (``calibration``, ``train``, ``val``, ``test``) to the parts it uses:
    datasets, or ``(dataset, indices)`` pairs for a subset (calibration draws). Returns a record
    for the run directory: the mode, and per role the number of distinct images and a sha256 of
    their sorted identities (with ``identities``, also the identities themselves, under
    ``identities``). ``mode="off"`` checks nothing (and says so in the record).
    """
    if mode not in ("auto", "content", "path", "off"):
        raise ValueError(f"leak check mode must be auto, content, path or off, got {mode!r}")
    parts: dict[str, list[tuple[MultimodalDataset, Sequence[int] | None]]] = {
        role: [p if isinstance(p, tuple) else (p, None) for p in items] for role, items in roles.items() if items}
    if mode == "off":
        return {"mode": "off", "roles": {r: {"items": sum(len(ix) if ix is not None else len(d) for d, ix in p)}
                                         for r, p in parts.items()}}
    if mode == "auto":
        total = sum(len(ix) if ix is not None else len(d) for p in parts.values() for d, ix in p)
        mode = "content" if total <= CONTENT_LIMIT else "path"
        if mode == "path":
            log.info("leak check by file path (%d items > %d); set dataset.leak_check=content to hash pixels",
                     total, CONTENT_LIMIT)
    cache: dict[tuple[int, tuple[int, ...] | None], dict[str, str]] = {}
    idents: dict[str, dict[str, str]] = {}
    for role, plist in parts.items():
        merged: dict[str, str] = {}
        for ds, ix in plist:
            k = (id(ds), tuple(ix) if ix is not None else None)
            if k not in cache:
                cache[k] = image_identities(ds, ix, mode)
            for ident, desc in cache[k].items():
                merged.setdefault(ident, desc)
        idents[role] = merged
    pairs = [(a, b) for a in TRAINING_ROLES for b in HELD_OUT_ROLES] + [("val", "test")]
    for a, b in pairs:
        if a not in idents or b not in idents:
            continue
        shared = idents[a].keys() & idents[b].keys()
        if shared:
            examples = "; ".join(f"{idents[a][s]} = {idents[b][s]}" for s in sorted(shared)[:3])
            raise DataError(
                f"split leak: {len(shared)} image(s) of {a} are also in {b} (by {mode}), e.g. {examples}; "
                f"use disjoint splits (SPEC@SPLIT names one), or set dataset.leak_check=off to allow it")
    record: dict[str, Any] = {"mode": mode, "roles": {
        role: {"images": len(ids), "sha256": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()}
        for role, ids in idents.items()}}
    if identities:
        record["identities"] = {role: sorted(ids) for role, ids in idents.items()}
    return record


def describe_parts(roles: Mapping[str, Sequence[Any]]) -> dict[str, list[dict[str, Any]]]:
    """What each role read: spec, split, format, source and item count, for ``data.json``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for role, items in roles.items():
        for p in items:
            ds, ix = p if isinstance(p, tuple) else (p, None)
            out.setdefault(role, []).append({
                "spec": getattr(ds, "spec", ds.source), "split": getattr(ds, "split", None),
                "format": ds.format_name, "source": ds.source,
                "items": len(ds) if ix is None else len(ix), "skipped": dict(ds.skipped)})
    return out
