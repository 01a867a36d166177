"""Batching and the loader factory (train/val/test, workers, prefetching, distributed sharding).

* :class:`DynamicBatchSampler` forms batches of similar caption length (less padding) with a fixed
  size or a token budget (variable size), in an order that is a function of (seed, epoch) only,
  sharded across ``torchrun`` ranks; it tags every item with a *draw*, the seed of that item's
  random choices (caption, augmentation), so a run is the same with 0 or 8 worker processes and
  after a resume.
* :class:`SafeLoader` wraps a ``DataLoader`` (worker processes prefetch ``prefetch_factor``
  batches each); bad items surface in the main process as one :class:`DataError` or a count, and
  on CUDA the next batch is copied to the device while the current one computes.
* :func:`split_loader` and :func:`create_dataloaders`: the loaders of train/val/test splits.

Batches are made by :class:`~rcc_compression.data.collate.Collator` (and
:func:`~rcc_compression.data.collate.pad_collate` for samples already tokenised).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .collate import Collator, SampleKey, caption_choice, draw_seed, model_inputs
from .splits import augment_from_config, open_splits
from .transforms import TrainAugment


# ------------------------------------------------------------------------------ length bucketing
def text_lengths(dataset: Any, tokenizer: Any = None, max_length: int | None = None) -> list[list[int]]:
    """Tokens of every text of every record (its captions, or its question), capped at ``max_length``.

    With a tokenizer, the real token counts (one batched call); without, words + 2. A record with
    no text (class folders) has ``[0]``. :class:`DynamicBatchSampler` buckets on the length of the
    caption each item will use in an epoch.
    """
    records = dataset.records
    texts: list[str] = []
    owner: list[int] = []
    for i, rec in enumerate(records):
        for t in (rec.captions or ([rec.question] if rec.question else [])):
            texts.append(t)
            owner.append(i)
    lengths: list[list[int]] = [[] for _ in records]
    if texts:
        if tokenizer is not None:
            enc = tokenizer(texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
            counts = [len(ids) for ids in enc["input_ids"]]
        else:
            counts = [len(t.split()) + 2 for t in texts]
        for i, n in zip(owner, counts, strict=True):
            lengths[i].append(min(n, max_length) if max_length is not None else n)
    return [ls or [0] for ls in lengths]


class DynamicBatchSampler(Sampler[list[Any]]):
    """Batches of items of similar length, with a fixed size or a token budget (design section 3.3).

    ``lengths`` gives each item's length, or the lengths of its captions (then the length of the
    caption the item's draw picks in that epoch counts, as :class:`Collator` will pick it).
    Each epoch the items are permuted (seeded by ``seed`` and the epoch), cut into pools of
    ``pool_batches`` batches, each pool sorted by length, and the sorted sequence cut into
    batches: ``batch_size`` items each, or (with ``max_tokens``) as many as keep
    ``items x longest <= max_tokens`` (at most ``batch_size`` when both are given). The batch
    with the most tokens comes first (an out-of-memory error shows at step 1), the others in a
    seeded random order. ``bucket=False`` skips the sorting (plain shuffled batches).

    Under ``torchrun`` (``num_replicas`` > 1) the batches are dealt round-robin, every rank
    getting the same number (the list is cut, or with ``pad=True`` topped up from its start).
    With ``draws=True`` every item comes as a :class:`SampleKey` carrying its draw seed.
    ``set_epoch(epoch, start)`` picks the epoch and skips its first ``start`` batches (resume).
    """

    def __init__(
        self,
        lengths: Sequence[int] | Sequence[Sequence[int]],
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        bucket: bool = True,
        pool_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        draws: bool = False,
    ) -> None:
        if batch_size is None and max_tokens is None:
            raise ValueError("DynamicBatchSampler needs batch_size, max_tokens or both")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.options = [[max(int(n), 1) for n in (ls if isinstance(ls, Sequence) else [ls])] or [1]
                        for ls in lengths]
        self.lengths = [ls[0] for ls in self.options]
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed, self.drop_last, self.bucket = shuffle, seed, drop_last, bucket
        self.pool_batches = max(int(pool_batches), 1)
        self.num_replicas, self.rank, self.draws = num_replicas, rank, draws
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s batches from batch ``start`` on."""
        self.epoch, self.start = int(epoch), int(start)

    def _generator(self, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(draw_seed(self.seed, epoch, -1 - salt))

    def _cut(self, order: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        if self.max_tokens is None:
            bs = int(self.batch_size)  # type: ignore[arg-type]
            return [order[i:i + bs] for i in range(0, len(order), bs)]
        current: list[int] = []
        longest = 0
        for i in order:
            n = self.lengths[i]
            grown = max(longest, n)
            full = self.batch_size is not None and len(current) >= self.batch_size
            if current and (full or grown * (len(current) + 1) > self.max_tokens):
                batches.append(current)
                current, grown = [], n
            current.append(i)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one), as dataset indices."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.options)
        self.lengths = [ls[caption_choice(draw_seed(self.seed, epoch, i), len(ls))] if len(ls) > 1 else ls[0]
                        for i, ls in enumerate(self.options)]
        order = (torch.randperm(n, generator=self._generator(epoch, 0)).tolist() if self.shuffle
                 else list(range(n)))
        if self.bucket:
            per_batch = self.batch_size or max(1, self.max_tokens // max(1, int(np.median(self.lengths))))
            pool = per_batch * self.pool_batches
            order = [i for s in range(0, n, pool)
                     for i in sorted(order[s:s + pool], key=lambda i: -self.lengths[i])]
        batches = self._cut(order)
        if self.drop_last and self.max_tokens is None and batches and len(batches[-1]) < int(self.batch_size or 0):
            batches.pop()
        if self.shuffle and len(batches) > 1:
            cost = [len(b) * max(self.lengths[i] for i in b) for b in batches]
            first = batches.pop(int(np.argmax(cost)))
            perm = torch.randperm(len(batches), generator=self._generator(epoch, 1)).tolist()
            batches = [first] + [batches[i] for i in perm]
        if self.num_replicas > 1:
            if self.drop_last or not batches:
                batches = batches[: len(batches) - len(batches) % self.num_replicas]
            else:
                short = -len(batches) % self.num_replicas
                batches = batches + [batches[i % len(batches)] for i in range(short)]
            batches = batches[self.rank::self.num_replicas]
        self._cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches())

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.epoch_batches()[self.start:]:
            yield [SampleKey(i, draw_seed(self.seed, self.epoch, i)) for i in batch] if self.draws else list(batch)


class PoissonBatchSampler(Sampler[list[Any]]):
    """Poisson samples for DP-SGD: every item in every batch independently with probability ``sample_rate``.

    Batch sizes vary (an empty batch is yielded as an empty list: the private step still adds its
    noise). ``generator`` draws the samples and each item's draw seed; for privacy it must not be
    derivable from anything recorded (:class:`~rcc_compression.training.privacy.PrivateTraining`
    seeds it from the operating system's entropy). An epoch is ``steps`` batches.
    """

    def __init__(self, items: int, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        if not 0 < sample_rate < 1:
            raise ValueError(f"sample_rate must be in (0, 1), got {sample_rate}")
        self.items, self.sample_rate, self.steps, self.generator = int(items), float(sample_rate), int(steps), generator
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """A new epoch, of which ``start`` batches are already done (resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[Any]]:
        for _ in range(self.start, self.steps):
            chosen = (torch.rand(self.items, generator=self.generator) < self.sample_rate).nonzero().flatten()
            draws = torch.randint(0, 2**62, (len(chosen),), generator=self.generator)
            yield [SampleKey(int(i), int(d)) for i, d in zip(chosen, draws, strict=True)]


# ----------------------------------------------------------------------------------- the loader
class SafeLoader:
    """A ``DataLoader`` whose bad items surface in the main process, as one ``DataError`` or a count.

    ``skipped`` counts items dropped while iterating (with ``skip_bad``), on top of the dataset's
    own build-time ``skipped`` counts. ``keys``: yield only those batch entries (e.g.
    :data:`MODEL_KEYS`, the model's keyword arguments). ``device``: on CUDA, copy each batch there
    (pinned, asynchronously) while the previous one is in use.
    """

    def __init__(self, loader: DataLoader, skip_bad: bool = False, keys: Sequence[str] | None = None,
                 device: torch.device | str | None = None) -> None:
        self.loader = loader
        self.skip_bad = skip_bad
        self.keys = tuple(keys) if keys is not None else None
        self.device = torch.device(device) if device is not None else None
        self.skipped = 0

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start: int = 0) -> int:
        """Reshuffle for ``epoch``; returns how many of its first ``start`` batches will be skipped.

        A :class:`DynamicBatchSampler` skips them without loading anything (returns ``start``); a
        ``DistributedSampler`` is reshuffled and nothing is skipped (returns 0).
        """
        if isinstance(self.loader.batch_sampler, DynamicBatchSampler | PoissonBatchSampler):
            self.loader.batch_sampler.set_epoch(epoch, start)
            return start
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)
        return 0

    def _batches(self) -> Iterator[dict[str, Any]]:
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
                yield model_inputs(batch, self.keys) if self.keys is not None else batch
            elif batch.get("empty"):  # an empty Poisson sample (private training): its step still happens
                yield {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.device is not None and self.device.type == "cuda":
            return prefetch_to_device(self._batches(), self.device)
        return self._batches()


def prefetch_to_device(batches: Iterable[Mapping[str, Any]], device: torch.device | str) -> Iterator[dict[str, Any]]:
    """Yield ``batches`` on ``device``, copying batch k+1 on a side CUDA stream while batch k is used.

    On a device other than CUDA the batches are moved as they are needed (nothing to overlap).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        for b in batches:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        return
    stream = torch.cuda.Stream(device)

    def ship(b: Mapping[str, Any]) -> dict[str, Any]:
        with torch.cuda.stream(stream):
            return {k: (v.pin_memory() if not v.is_pinned() else v).to(device, non_blocking=True)
                    if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    it = iter(batches)
    nxt = next(it, None)
    pending = ship(nxt) if nxt is not None else None
    while pending is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        current = pending
        for v in current.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(torch.cuda.current_stream(device))
        nxt = next(it, None)
        pending = ship(nxt) if nxt is not None else None
        yield current


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is initialised (then loaders shard with ``DistributedSampler``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    if distributed_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
    batch_sampler: Sampler[list[Any]] | None = None,
    prefetch_factor: int | None = None,
    keys: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> SafeLoader:
    """A seeded loader; sharded by ``DistributedSampler`` when ``torch.distributed`` is initialised.

    ``batch_sampler`` (e.g. a :class:`DynamicBatchSampler`) replaces ``batch_size``/``shuffle``;
    ``num_workers`` processes load and collate, each ``prefetch_factor`` batches ahead;
    ``persistent_workers`` keeps them between epochs. ``keys`` and ``device``: see :class:`SafeLoader`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    skip = bool(getattr(dataset, "skip_bad", False)) if skip_bad is None else skip_bad
    if collate_fn is None:
        collate_fn = dataset.get_collate_fn() if hasattr(dataset, "get_collate_fn") else Collator(skip_bad=skip)
    workers: dict[str, Any] = {}
    if num_workers:
        workers = {"worker_init_fn": _seed_worker, "persistent_workers": persistent_workers,
                   "prefetch_factor": prefetch_factor or 2}
    pin = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if batch_sampler is not None:
        # the loader's own generator seeds the workers: iterating never draws from torch's global generator
        loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                            pin_memory=pin, generator=torch.Generator().manual_seed(seed), **workers)
        return SafeLoader(loader, skip_bad=skip, keys=keys, device=device)
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
        pin_memory=pin,
        **workers,
    )
    return SafeLoader(loader, skip_bad=skip, keys=keys, device=device)


def split_loader(
    dataset: Any,
    split: str,
    batch_size: int,
    tokenizer: Any = None,
    max_length: int | None = None,
    seed: int = 0,
    augment: TrainAugment | None = None,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    max_tokens: int | None = None,
    bucket: bool = True,
    answers_as_labels: bool = False,
    keys: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    lengths: Sequence[int] | None = None,
    poisson: PoissonBatchSampler | None = None,
) -> SafeLoader:
    """The loader of one split: ``train`` shuffles, buckets by length, picks random captions, augments.

    Training batches come from a :class:`DynamicBatchSampler` (seeded per epoch, sharded across
    ranks, the last partial batch dropped); ``val``/``test`` are in order, first caption, no
    augmentation, every item once (each rank a disjoint share under ``torchrun``). ``poisson``
    replaces the training batches by Poisson samples (private training).
    """
    train = split == "train"
    rank, world = _rank_and_world()
    collate = Collator(tokenizer=tokenizer, max_length=max_length, caption="random" if train else "first",
                       mean=dataset.transform.mean, std=dataset.transform.std,
                       augment=augment if train else None, skip_bad=dataset.skip_bad,
                       answers_as_labels=answers_as_labels, seed=seed)
    if poisson is not None:
        return build_loader(dataset, 1, num_workers=num_workers, collate_fn=collate, seed=seed,
                            persistent_workers=num_workers > 0, batch_sampler=poisson,
                            prefetch_factor=prefetch_factor, keys=keys, device=device)
    if lengths is None:
        lengths = text_lengths(dataset, tokenizer, collate.text_limit) if (train and bucket) or max_tokens else \
            [1] * len(dataset)
    sampler = DynamicBatchSampler(
        lengths, batch_size=batch_size, max_tokens=max_tokens if train else None, shuffle=train, seed=seed,
        drop_last=train and len(dataset) >= batch_size * world, bucket=bucket and train,
        num_replicas=world, rank=rank, draws=True)
    if not train and world > 1:
        # evaluation: each rank a disjoint, contiguous share, nothing repeated
        share = math.ceil(len(dataset) / world)
        mine = list(range(rank * share, min(len(dataset), (rank + 1) * share)))
        sampler = _FixedBatches([mine[i:i + batch_size] for i in range(0, len(mine), batch_size)])
    return build_loader(dataset, batch_size, num_workers=num_workers, collate_fn=collate, seed=seed,
                        persistent_workers=train and num_workers > 0, batch_sampler=sampler,
                        prefetch_factor=prefetch_factor, keys=keys, device=device)


class _FixedBatches(Sampler[list[int]]):
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def create_dataloaders(
    dataset_cfg: Any,
    tokenizer: Any = None,
    transform: Any = None,
    seed: int = 0,
    augment: TrainAugment | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
) -> dict[str, SafeLoader]:
    """Loaders for the ``train``/``val``/``test`` specs of a ``DatasetSection`` (those that are set).

    The splits are opened by :func:`~rcc_compression.data.splits.open_splits`, which refuses any
    item shared between the training split and val or test. ``augment`` (default: the section's
    ``augment`` settings) applies to the training split only. See :func:`split_loader`.
    """
    datasets = open_splits(dataset_cfg, transform=transform, cache_dir=cache_dir)
    if augment is None:
        augment = augment_from_config(dataset_cfg, transform)
    out: dict[str, SafeLoader] = {}
    for split, ds in datasets.items():
        out[split] = split_loader(
            ds, split, dataset_cfg.batch_size, tokenizer, max_length=max_length, seed=seed, augment=augment,
            num_workers=dataset_cfg.num_workers, prefetch_factor=getattr(dataset_cfg, "prefetch_factor", None),
            max_tokens=getattr(dataset_cfg, "max_tokens", None), bucket=getattr(dataset_cfg, "bucket_by_length", True))
    return out

