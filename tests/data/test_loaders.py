"""Collation, seeded loaders, DistributedSampler, the loader factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcc_compression.config import DatasetSection
from rcc_compression.data.collate import Collator, model_inputs
from rcc_compression.data.datasets import open_world
from rcc_compression.data.loaders import build_loader, create_dataloaders
from rcc_compression.data.transforms import ImageTransform, normalize
from rcc_compression.data.world import build_world_tokenizer


def test_collator_tokenises_first_or_random_caption(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "captions", "test", ImageTransform(32, 32))
    tok = build_world_tokenizer("clip")
    samples = [ds[0], ds[1], ds[2]]
    batch = Collator(tokenizer=tok, caption="first")(samples)
    assert batch["text"] == [s["captions"][0] for s in samples]
    assert torch.equal(batch["pixel_values"], normalize(torch.stack([s["pixel_values"] for s in samples])))
    ids = tok(batch["text"][0])["input_ids"]
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert batch["attention_mask"][0].sum().item() == len(ids)
    assert set(model_inputs(batch)) == {"pixel_values", "input_ids", "attention_mask"}
    r1 = Collator(tokenizer=tok, caption="random", seed=3)(samples)["text"]
    r2 = Collator(tokenizer=tok, caption="random", seed=3)(samples)["text"]
    assert r1 == r2 and all(t in s["captions"] for t, s in zip(r1, samples, strict=True))


def test_vqa_answers_become_labels(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "vqa", "test", ImageTransform(32, 32))
    tok = build_world_tokenizer("blip")
    batch = Collator(tokenizer=tok, answers_as_labels=True)([ds[0], ds[1]])
    top = ds.records[0].answers[0]
    expected = tok(top)["input_ids"]
    assert batch["labels"][0, : len(expected)].tolist() == expected
    assert (batch["labels"][0, len(expected):] == -100).all()


def test_loader_is_seeded(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "captions", "train", ImageTransform(16, 16))
    order = [b["index"].tolist() for b in build_loader(ds, 5, shuffle=True, seed=7)]
    again = [b["index"].tolist() for b in build_loader(ds, 5, shuffle=True, seed=7)]
    other = [b["index"].tolist() for b in build_loader(ds, 5, shuffle=True, seed=8)]
    assert order == again != other and sorted(sum(order, [])) == list(range(len(ds)))


def test_distributed_sampler_when_initialised(tiny_world: Path, tmp_path: Path) -> None:
    import torch.distributed as dist

    ds = open_world(tiny_world, "captions", "test", ImageTransform(16, 16))
    assert not isinstance(build_loader(ds, 4).sampler, torch.utils.data.DistributedSampler)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        loader = build_loader(ds, 4, shuffle=True, seed=1)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.set_epoch(1)
        assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(len(ds)))
    finally:
        dist.destroy_process_group()


def test_create_dataloaders_for_train_val_test(tiny_world: Path, tmp_path: Path) -> None:
    cfg = DatasetSection(train=str(tiny_world), val=str(tiny_world), test=None, batch_size=8)
    tok = build_world_tokenizer("clip")
    loaders = create_dataloaders(cfg, tokenizer=tok, transform=ImageTransform(16, 16), cache_dir=tmp_path / "c")
    assert set(loaders) == {"train", "val"}
    train = list(loaders["train"])
    assert len(train) == 24 // 8 and all(b["input_ids"].shape[0] == 8 for b in train)
    val = list(loaders["val"])
    assert [len(b["image_id"]) for b in val] == [8]
    assert len(list((tmp_path / "c").iterdir())) == 2  # one cache per split


def test_batch_size_must_be_positive(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "captions", "test")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, 0)
