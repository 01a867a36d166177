"""Padding collate, length-bucketing batches, worker processes, train-only augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcc_compression.config import DatasetSection
from rcc_compression.data.collate import SampleKey, pad_collate
from rcc_compression.data.datasets import open_world
from rcc_compression.data.loaders import DynamicBatchSampler, create_dataloaders, split_loader, text_lengths
from rcc_compression.data.transforms import ImageTransform, TrainAugment, normalize
from rcc_compression.data.world import build_world_tokenizer
from rcc_compression.errors import DataError

SMALL = ImageTransform(16, 16)


def test_pad_collate_pads_right_with_masks_and_ignored_labels() -> None:
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
                "labels": torch.tensor([6, 7]), "pixel_values": torch.ones(3, 2, 2), "image_id": "a"},
               {"input_ids": torch.tensor([5]), "attention_mask": torch.ones(1, dtype=torch.long),
                "labels": torch.tensor([9, 9, 9, 9]), "pixel_values": torch.zeros(3, 2, 2), "image_id": "b"}]
    batch = pad_collate(samples, pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, -100, -100], [9, 9, 9, 9]]
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["image_id"] == ["a", "b"]
    with pytest.raises(DataError, match="only token sequences are padded"):
        pad_collate([{"x": torch.ones(2)}, {"x": torch.ones(3)}])


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_dynamic_batches_cover_every_item_once_per_epoch_and_cut_padding() -> None:
    lengths = torch.randint(3, 40, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    s = DynamicBatchSampler(lengths, batch_size=16, seed=3)
    e0 = s.epoch_batches(0)
    assert sorted(i for b in e0 for i in b) == list(range(500)) and len(s) == 32
    assert e0 == DynamicBatchSampler(lengths, batch_size=16, seed=3).epoch_batches(0) != s.epoch_batches(1)
    plain = DynamicBatchSampler(lengths, batch_size=16, seed=3, bucket=False).epoch_batches(0)
    assert _padding(e0, lengths) < 0.2 * _padding(plain, lengths)
    # the costliest batch first; drop_last leaves only full batches
    assert max(lengths[i] for i in e0[0]) == max(lengths)
    assert all(len(b) == 16 for b in DynamicBatchSampler(lengths, batch_size=16, drop_last=True).epoch_batches(0))


def test_token_budget_gives_variable_batch_sizes_within_budget() -> None:
    lengths = [4] * 60 + [30] * 20 + [100]
    s = DynamicBatchSampler(lengths, max_tokens=120, seed=0)
    batches = s.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 120 for b in batches)
    assert {len(b) for b in batches} >= {1, 4, 30}  # the 100-token item alone, 4 x 30, 30 x 4
    cost = [len(b) * max(lengths[i] for i in b) for b in batches]
    assert cost[0] == max(cost) and [80] in batches
    capped = DynamicBatchSampler(lengths, batch_size=8, max_tokens=120).epoch_batches(0)
    assert max(len(b) for b in capped) == 8


def test_ranks_get_disjoint_equal_shares_and_resume_skips_batches() -> None:
    lengths = list(range(1, 104))
    shares = [DynamicBatchSampler(lengths, batch_size=4, seed=1, num_replicas=3, rank=r).epoch_batches(2)
              for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    seen = [i for s in shares for b in s for i in b]
    assert set(seen) == set(range(103)) and len(seen) - 103 <= 4  # topped up by one batch from the start
    cut = [DynamicBatchSampler(lengths, batch_size=4, seed=1, num_replicas=3, rank=r, drop_last=True)
           for r in range(3)]
    seen = [i for s in cut for b in s.epoch_batches(2) for i in b]
    assert len(seen) == len(set(seen)) == 96  # or cut to 8 full batches per rank
    s = DynamicBatchSampler(lengths, batch_size=4, seed=1, draws=True)
    s.set_epoch(2, start=5)
    tail = list(s)
    assert [[k.index for k in b] for b in tail] == s.epoch_batches(2)[5:]
    assert all(isinstance(k, SampleKey) for b in tail for k in b)


def test_buckets_follow_the_caption_each_item_uses(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "captions", "train", SMALL)
    tok = build_world_tokenizer("clip")
    lengths = text_lengths(ds, tok)
    assert lengths[0] == [len(tok(c)["input_ids"]) for c in ds.records[0].captions]
    assert len({n for ls in lengths for n in ls}) > 3  # real captions vary in length
    shapes = open_world(tiny_world, "shape", "train", SMALL)
    assert text_lengths(shapes) == [[0]] * len(shapes)
    def padding(loader, epoch: int) -> int:
        loader.set_epoch(epoch)
        total = 0
        for batch in loader:
            used = batch["attention_mask"].sum(1)
            # the sampler knew the length of the caption each item uses in this epoch
            sampler = loader.batch_sampler
            if sampler.bucket:
                assert used.tolist() == [sampler.lengths[i] for i in batch["index"].tolist()]
            total += int((batch["input_ids"].shape[1] - used).sum())
        return total

    for epoch in (0, 1):
        bucketed = padding(split_loader(ds, "train", 4, tok, seed=2), epoch)
        assert bucketed < 0.5 * padding(split_loader(ds, "train", 4, tok, seed=2, bucket=False), epoch)


def _epoch(loader, epoch: int) -> list[tuple[list[int], list[str], torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(b["index"].tolist(), b["text"], b["pixel_values"]) for b in loader]


def test_training_batches_are_the_same_with_worker_processes(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "captions", "train", SMALL)
    tok = build_world_tokenizer("clip")
    kw = dict(seed=4, augment=TrainAugment())
    inline = split_loader(ds, "train", 6, tok, **kw)
    workers = split_loader(ds, "train", 6, tok, num_workers=2, prefetch_factor=2, **kw)
    for epoch in (0, 1):
        a, b = _epoch(inline, epoch), _epoch(workers, epoch)
        assert [x[:2] for x in a] == [x[:2] for x in b]
        assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))
    assert [x[1] for x in _epoch(inline, 0)] != [x[1] for x in _epoch(inline, 1)]  # captions re-drawn per epoch
    batch = next(iter(inline))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any()  # padded, masked


def test_augmentation_is_for_the_training_split_only(tiny_world: Path) -> None:
    cfg = DatasetSection(train=str(tiny_world), val=str(tiny_world), batch_size=8)
    loaders = create_dataloaders(cfg, tokenizer=build_world_tokenizer("clip"), transform=SMALL, seed=0)
    ds_train, ds_val = loaders["train"].dataset, loaders["val"].dataset
    tb = next(iter(loaders["train"]))
    raw = torch.stack([ds_train[i]["pixel_values"] for i in tb["index"].tolist()])
    assert not torch.allclose(tb["pixel_values"], normalize(raw))
    vb = next(iter(loaders["val"]))
    assert torch.equal(vb["pixel_values"], normalize(torch.stack([ds_val[i]["pixel_values"] for i in range(8)])))
    off = DatasetSection(train=str(tiny_world), batch_size=8, augment={"enabled": False})
    tb = next(iter(create_dataloaders(off, tokenizer=build_world_tokenizer("clip"), transform=SMALL)["train"]))
    raw = torch.stack([ds_train[i]["pixel_values"] for i in tb["index"].tolist()])
    assert torch.equal(tb["pixel_values"], normalize(raw))
