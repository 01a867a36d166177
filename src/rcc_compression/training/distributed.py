"""Data-parallel training with ``torchrun``: process group, sampler, model wrapping, reductions.

Launch any training entry point under ``torchrun --nproc_per_node N``; :func:`init_distributed`
reads the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables torchrun sets and joins the group
(NCCL on CUDA, gloo on the CPU). Without them everything here degrades to a single process.
Every rank sees a disjoint share of each global batch through ``DistributedSampler`` (seeded,
reshuffled per epoch); gradients are averaged by DDP, metrics by :func:`all_reduce_mean`, and
only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.collate import pad_collate
from ..errors import DataError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group (``world_size == 1``: not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, local, world)


def current() -> DistInfo:
    """The group this process belongs to (initialised elsewhere), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())
    return DistInfo()


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def device_for(info: DistInfo, requested: str | torch.device | None = None) -> torch.device:
    """This rank's device: its local GPU under NCCL, else ``requested`` (or the CPU)."""
    if info.enabled and torch.cuda.is_available() and (requested is None or torch.device(requested).type == "cuda"):
        return torch.device("cuda", info.local_rank)
    return torch.device(requested) if requested is not None else torch.device("cpu")


def all_reduce_mean(values: Mapping[str, float], info: DistInfo, device: torch.device | str = "cpu"
                    ) -> dict[str, float]:
    """Average scalar metrics over ranks (identical on every rank afterwards); NaN-free keys only."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_grads(params: Sequence[nn.Parameter], info: DistInfo) -> None:
    """Average gradients of parameters DDP does not manage (e.g. the loss's projections)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= info.world_size


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient of this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows[0]:ctx.rows[1]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from every rank along dim 0; the local part keeps its gradient.

    The backward pass sums the gradients every rank computes for this rank's slice, so a loss
    that each rank evaluates on the gathered batch, with DDP's gradient averaging on top, trains
    exactly as that loss on one process holding the whole batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around ``model`` when distributed (masks and other buffers are identical: not re-broadcast)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


class BatchesDataset(Dataset):
    """The samples of a list of batch dicts, one per index (tensors split along dim 0)."""

    def __init__(self, batches: Sequence[Mapping[str, Any]]) -> None:
        self.index: list[tuple[int, int]] = []
        self.batches = list(batches)
        for b, batch in enumerate(self.batches):
            sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
            if len(sizes) != 1:
                raise DataError(f"batch {b}: tensors disagree on the batch size ({sorted(sizes)})")
            self.index += [(b, i) for i in range(sizes.pop())]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        b, i = self.index[idx]
        return {k: (v[i] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in self.batches[b].items()}


def make_loader(dataset: Dataset, batch_size: int, info: DistInfo, seed: int = 0, shuffle: bool = True,
                drop_last: bool = False, num_workers: int = 0, collate_fn: Any = None) -> DataLoader:
    """A loader giving this rank ``batch_size`` samples per step through a seeded ``DistributedSampler``.

    Samples are batched by ``collate_fn``, by default :func:`~rcc_compression.data.collate.pad_collate`
    (token sequences of different lengths padded, with pad id 0; pass a ``functools.partial`` of it
    with the tokenizer's pad id).

    The global batch is ``batch_size * world_size``; with one process it is the same permutation
    as with many (the sampler's order depends on seed and epoch only), so runs agree across
    world sizes when the dataset divides evenly.
    """
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn or pad_collate, drop_last=drop_last)
