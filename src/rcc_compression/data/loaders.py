"""The loader factory (train/val/test, workers, ``DistributedSampler``).

Batches are made by :class:`~rcc_compression.data.collate.Collator`; samples whose image could not
be read carry an ``error``, which :class:`SafeLoader` (in the main process) raises as one
:class:`DataError` naming the file unless bad items are skipped.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .collate import Collator
from .datasets import open_dataset
from .transforms import TrainAugment


class SafeLoader:
    """A ``DataLoader`` whose bad items surface in the main process, as one ``DataError`` or a count.

    ``skipped`` counts items dropped while iterating (with ``skip_bad``), on top of the dataset's
    own build-time ``skipped`` counts.
    """

    def __init__(self, loader: DataLoader, skip_bad: bool = False) -> None:
        self.loader = loader
        self.skip_bad = skip_bad
        self.skipped = 0

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a ``DistributedSampler`` for a new epoch (no-op otherwise)."""
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader)
        for batch in it:
            errors = batch.pop("errors", [])
            if errors:
                # stop the workers now: the raised error's traceback would keep them alive until collected
                getattr(it, "_shutdown_workers", lambda: None)()
                more = f" (and {len(errors) - 1} more bad items in this batch)" if len(errors) > 1 else ""
                raise DataError(f"{errors[0]}{more}; pass skip_bad=True / --skip-bad to skip unreadable images")
            self.skipped += int(batch.pop("skipped", 0))
            if "pixel_values" in batch:
                yield batch


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is initialised (then loaders shard with ``DistributedSampler``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    collate_fn: Any = None,
    seed: int = 0,
    drop_last: bool = False,
    skip_bad: bool | None = None,
    persistent_workers: bool = False,
) -> SafeLoader:
    """A seeded loader; sharded by ``DistributedSampler`` when ``torch.distributed`` is initialised.

    ``persistent_workers`` keeps worker processes between epochs (multi-epoch training).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    skip = bool(getattr(dataset, "skip_bad", False)) if skip_bad is None else skip_bad
    if collate_fn is None:
        collate_fn = dataset.get_collate_fn() if hasattr(dataset, "get_collate_fn") else Collator(skip_bad=skip)
    sampler = None
    if distributed_ready():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers else None,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return SafeLoader(loader, skip_bad=skip)


def create_dataloaders(
    dataset_cfg: Any,
    tokenizer: Any = None,
    transform: Any = None,
    seed: int = 0,
    augment: TrainAugment | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, SafeLoader]:
    """Loaders for the ``train``/``val``/``test`` specs of a ``DatasetSection`` (those that are set).

    The train loader shuffles, drops the last partial batch, picks a random caption per image and
    applies ``augment``; val and test are in order with the first caption.
    """
    out: dict[str, SafeLoader] = {}
    for split in ("train", "val", "test"):
        spec = getattr(dataset_cfg, split, None)
        if not spec:
            continue
        ds = open_dataset(
            spec,
            split=split,
            transform=transform,
            skip_bad=dataset_cfg.skip_bad,
            root=getattr(dataset_cfg, "root", None),
        )
        if cache_dir is not None:
            ds.cache_data(cache_dir)
        train = split == "train"
        collate = ds.get_collate_fn(
            tokenizer, caption="random" if train else "first", augment=augment if train else None
        )
        out[split] = build_loader(
            ds,
            dataset_cfg.batch_size,
            shuffle=train,
            num_workers=dataset_cfg.num_workers,
            collate_fn=collate,
            seed=seed,
            drop_last=train,
            persistent_workers=train,
        )
    return out
