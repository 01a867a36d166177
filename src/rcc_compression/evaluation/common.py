"""Shared evaluation plumbing: batched image embedding through the data loaders, progress bars."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

from ..data.collate import Collator
from ..data.loaders import build_loader
from ..utils.logging import console

T = TypeVar("T")


def progress_iter(items: Iterable[T], total: int | None, description: str, enabled: bool) -> Iterator[T]:
    """``items`` with a rich progress bar when ``enabled`` (on stderr), plain otherwise."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def image_batches(
    dataset: Any, batch_size: int, progress: bool = False, what: str = "images"
) -> Iterator[dict[str, Any]]:
    """Normalised image batches of a dataset, in order (bad items raise or are counted, as the dataset says)."""
    collate = Collator(
        caption="none", mean=dataset.transform.mean, std=dataset.transform.std, skip_bad=dataset.skip_bad
    )
    loader = build_loader(dataset, batch_size, shuffle=False, collate_fn=collate)
    yield from progress_iter(loader, len(loader), what, progress)
    if loader.skipped:
        dataset.skipped["unreadable image"] += loader.skipped


@torch.no_grad()
def embed_images(
    wrapper: Any, dataset: Any, batch_size: int, progress: bool = False, what: str = "images"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised image embeddings N x D, dataset indices N) for a CLIP wrapper."""
    embs, idx = [], []
    for batch in image_batches(dataset, batch_size, progress, what):
        embs.append(
            wrapper.encode_image(batch["pixel_values"].to(wrapper.device, wrapper.dtype), normalize=True).float()
        )
        idx.append(batch["index"])
    return torch.cat(embs), torch.cat(idx)


def subset(dataset: Any, max_items: int | None, seed: int = 0) -> Any:
    """The dataset itself, or a seeded random subset of ``max_items`` records (same object type)."""
    if max_items is None or max_items >= len(dataset):
        return dataset

    gen = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(dataset), generator=gen)[:max_items].tolist())
    small = copy.copy(dataset)
    small.records = [dataset.records[i] for i in keep]
    return small
