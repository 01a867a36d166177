"""Collation and the loader factory (train/val/test, workers, ``DistributedSampler``).

:class:`Collator` turns samples into a batch: uint8 pixels stacked and normalised (or augmented),
one caption per image (random for training, first for evaluation) or the question tokenised, and
the answers as ``labels`` for VQA. Samples whose image could not be read carry an ``error``; the
collator drops them when skipping bad items and otherwise passes the errors on, and
:class:`SafeLoader` (in the main process) raises them as one :class:`DataError` naming the file.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .transforms import CLIP_MEAN, CLIP_STD, TrainAugment, normalize

#: keys of a batch that are model keyword arguments (the rest is bookkeeping)
MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels")


class Collator:
    """Batch samples into tensors; see the module docstring.

    ``caption``: ``"random"`` (one of each image's captions, for training), ``"first"``, or
    ``"none"`` (no text). ``augment`` replaces normalisation by a :class:`TrainAugment`.
    ``answers_as_labels`` tokenises each question's most common answer into ``labels`` (BLIP VQA).
    ``seed`` makes the random caption choice reproducible (in the main process).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        max_length: int | None = None,
        caption: str = "first",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        augment: TrainAugment | None = None,
        skip_bad: bool = False,
        answers_as_labels: bool = False,
        seed: int | None = None,
    ) -> None:
        if caption not in ("random", "first", "none"):
            raise ValueError(f"caption must be 'random', 'first' or 'none', got {caption!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caption = caption
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.skip_bad = skip_bad
        self.answers_as_labels = answers_as_labels
        self._rng: Any = random.Random(seed) if seed is not None else random

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", 77)
        if limit is None or limit > 10_000:
            limit = 77
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        errors = [s["error"] for s in samples if s.get("error")]
        good = [s for s in samples if not s.get("error")]
        batch: dict[str, Any] = {
            "errors": [] if self.skip_bad else errors,
            "skipped": len(errors) if self.skip_bad else 0,
        }
        if errors and not self.skip_bad:
            return batch
        if not good:
            return batch
        pixels = torch.stack([s["pixel_values"] for s in good])
        batch["pixel_values"] = (
            self.augment(pixels) if self.augment is not None else normalize(pixels, self.mean, self.std)
        )
        batch["index"] = torch.tensor([s["index"] for s in good])
        batch["image_id"] = [s["image_id"] for s in good]
        if good[0].get("label") is not None:
            batch["label"] = torch.tensor([int(s["label"]) for s in good])
        if good[0].get("question") is not None:
            batch["question"] = [s["question"] for s in good]
            batch["question_id"] = [s["question_id"] for s in good]
            batch["answers"] = [s["answers"] for s in good]
            if self.tokenizer is not None:
                batch.update(self._tokenize(batch["question"]))
                if self.answers_as_labels and good[0].get("answers"):
                    top = [Counter(s["answers"]).most_common(1)[0][0] for s in good]
                    ids = self._tokenize(top)
                    batch["labels"] = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
        elif good[0].get("captions"):
            batch["captions"] = [s["captions"] for s in good]
            if self.caption != "none":
                texts = [
                    self._rng.choice(s["captions"]) if self.caption == "random" else s["captions"][0] for s in good
                ]
                batch["text"] = texts
                if self.tokenizer is not None:
                    batch.update(self._tokenize(texts))
        return batch


def model_inputs(batch: dict[str, Any], keys: Sequence[str] = MODEL_KEYS) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``model(**batch)`` in a collated batch."""
    return {k: batch[k] for k in keys if k in batch and isinstance(batch[k], torch.Tensor)}


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
    from .datasets import open_dataset

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
