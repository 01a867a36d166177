"""Transforms match the Hugging Face processors exactly; text cleaning; augmentation keeps colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rcc_compression.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    TrainAugment,
    center_crop,
    clean_caption,
    normalize,
    transform_for,
    truncate_words,
)


@pytest.mark.parametrize("shape", [(50, 70), (70, 50), (64, 64), (300, 224)])
def test_matches_hugging_face_processors_exactly(shape: tuple[int, int]) -> None:
    from transformers import BlipImageProcessor, CLIPImageProcessor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8))
    for proc in (CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                 CLIPImageProcessor(), BlipImageProcessor(size={"height": 48, "width": 48})):
        expected = proc(images=[img], return_tensors="pt")["pixel_values"][0]
        got = transform_for(proc)(img)
        assert got.shape == expected.shape
        assert torch.equal(got, expected)


def test_normalisation_and_crop_by_hand() -> None:
    px = torch.tensor([[[0, 255]], [[255, 0]], [[51, 102]]], dtype=torch.uint8)  # 3 x 1 x 2
    out = normalize(px)
    assert out[0, 0, 0].item() == pytest.approx((0 - CLIP_MEAN[0]) / CLIP_STD[0])
    assert out[2, 0, 1].item() == pytest.approx((0.4 - CLIP_MEAN[2]) / CLIP_STD[2], abs=1e-6)  # float32
    grid = torch.arange(5 * 6).view(1, 5, 6)
    assert center_crop(grid, 2).tolist() == [[[8, 9], [14, 15]]]  # top (5-2)//2=1, left (6-2)//2=2
    assert center_crop(torch.ones(1, 2, 2), 4).sum().item() == 4  # padded with zeros


def test_fingerprint_changes_with_every_parameter() -> None:
    base = ImageTransform(64, 64)
    prints = {
        base.fingerprint(),
        ImageTransform(64, 56).fingerprint(),
        ImageTransform(64, 64, resample="bilinear").fingerprint(),
        ImageTransform(64, 64, mean=(0.5, 0.5, 0.5)).fingerprint(),
        ImageTransform(64, 64, resize_exact=True).fingerprint(),
    }
    assert len(prints) == 5 and base.fingerprint() == ImageTransform(64, 64).fingerprint()


def test_caption_cleaning_and_truncation() -> None:
    assert clean_caption("  A\tred\u00a0circle\n\x07 ") == "A red circle"
    assert clean_caption("ＡＢＣ", lowercase=True) == "abc"
    assert clean_caption(" \n ") == ""
    assert truncate_words("one two three four", 2) == "one two"
    assert truncate_words("one two", None) == "one two"
    with pytest.raises(TypeError):
        clean_caption(None)  # type: ignore[arg-type]


def test_augmentation_is_seeded_and_keeps_hue() -> None:
    px = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    px[:, 0] = 200  # pure red images
    aug = TrainAugment()
    a = aug(px, torch.Generator().manual_seed(1))
    b = aug(px, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    raw = a * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    # still red: brightness and contrast move all channels alike, so green and blue stay equal and far below
    assert (raw[:, 0] - raw[:, 1] > 0.6).all() and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)
    identity = TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0, contrast=0.0)
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(identity(img), normalize(img), atol=1e-4)
