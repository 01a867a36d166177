"""Calibration batches: every source, every model kind, deterministic per seed, ready for model(**batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcc_compression.data.calibration import build_calibration_batches
from rcc_compression.errors import DataError
from rcc_compression.models import get_model

KEYS = {
    "clip": {"pixel_values", "input_ids", "attention_mask"},
    "blip": {"pixel_values", "input_ids", "attention_mask"},
    "blip_vqa": {"pixel_values", "input_ids", "attention_mask", "labels"},
}


@pytest.mark.parametrize("name,kind", [("tiny-clip", "clip"), ("tiny-blip", "blip"), ("tiny-blip-vqa", "blip_vqa")])
def test_every_source_feeds_the_model(name: str, kind: str, tiny_world: Path) -> None:
    wrapper = get_model(name)
    for source in ("synthetic", "world", str(tiny_world)):
        batches = build_calibration_batches(wrapper, source, num_batches=2, batch_size=3, seed=0)
        assert len(batches) == 2
        for b in batches:
            assert set(b) == KEYS[kind]
            assert b["pixel_values"].shape == (3, 3, 32, 32)
            with torch.no_grad():
                out = wrapper.model(**b)
            if kind == "blip_vqa":
                assert torch.isfinite(out.loss)
            elif kind == "blip":
                assert out.logits.shape[:2] == b["input_ids"].shape


def test_deterministic_per_seed(tiny_world: Path) -> None:
    wrapper = get_model("tiny-clip")
    for source in ("world", str(tiny_world)):
        a = build_calibration_batches(wrapper, source, 2, 4, seed=5)
        b = build_calibration_batches(wrapper, source, 2, 4, seed=5)
        c = build_calibration_batches(wrapper, source, 2, 4, seed=6)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
        assert not torch.equal(a[0]["pixel_values"], c[0]["pixel_values"])


def test_world_source_uses_the_world_train_split() -> None:
    from rcc_compression.data.transforms import transform_for
    from rcc_compression.data.world import world_scenes

    wrapper = get_model("tiny-clip")
    (batch,) = build_calibration_batches(wrapper, "world", 1, 4, seed=0)
    transform = transform_for(wrapper)
    expected = torch.stack([transform(it.image) for it in world_scenes(0, "train", 4)])
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch["pixel_values"], expected[order])


def test_bad_sources(tmp_path: Path) -> None:
    wrapper = get_model("tiny-clip")
    with pytest.raises(DataError, match="no such file or directory"):
        build_calibration_batches(wrapper, str(tmp_path / "missing"), 1, 2, 0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON"):
        build_calibration_batches(wrapper, str(bad), 1, 2, 0)
    with pytest.raises(ValueError):
        build_calibration_batches(wrapper, "synthetic", 0, 2, 0)


def test_calibration_from_every_caption_format(
    coco_dir: Path, flickr_dir: Path, cc_tsv: Path, image_folder: Path
) -> None:
    wrapper = get_model("tiny-clip")
    for source in (coco_dir, flickr_dir / "dataset_flickr30k.json", cc_tsv, image_folder):
        (batch,) = build_calibration_batches(wrapper, str(source), 1, 3, seed=0)
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["input_ids"].shape[0] == 3
        assert (batch["input_ids"][:, 0] == wrapper.tokenizer.bos_token_id).all()
    (batch,) = build_calibration_batches(wrapper, str(image_folder), 1, 2, seed=0)
    texts = wrapper.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("a photo of a") for t in texts)  # class folders calibrate with "a photo of a {class}."
