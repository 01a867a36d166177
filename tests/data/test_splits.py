"""Split specs and the leak check: no training image in val or test, no image in both val and test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rcc_compression.config import DatasetSection
from rcc_compression.data.calibration import build_calibration_batches, calibration_items
from rcc_compression.data.datasets import ImageFolderDataset, open_world
from rcc_compression.data.splits import check_splits, open_split, open_splits, parse_spec
from rcc_compression.data.transforms import ImageTransform
from rcc_compression.errors import DataError
from rcc_compression.models import get_model

SMALL = ImageTransform(16, 16)


def test_parse_spec(tmp_path: Path) -> None:
    assert parse_spec("imagenet@val", "test") == ("imagenet", "val")
    assert parse_spec("/data/coco", "train") == ("/data/coco", "train")
    assert parse_spec("hf:user/set@validation", "test") == ("hf:user/set", "validation")
    odd = tmp_path / "me@home"
    odd.mkdir()
    assert parse_spec(str(odd), "test") == (str(odd), "test")  # an existing path is taken whole


def test_splits_of_one_dataset_are_disjoint(image_folder: Path) -> None:
    cfg = DatasetSection(train=str(image_folder), val=str(image_folder), test=f"{image_folder}@val")
    with pytest.raises(DataError, match=r"split leak: 6 image\(s\) of val are also in test"):
        open_splits(cfg, transform=SMALL)
    parts = open_splits(cfg.model_copy(update={"test": None}), transform=SMALL)
    assert (parts["train"].split, parts["val"].split) == ("train", "val")
    assert len(parts["train"]) == 9 and len(parts["val"]) == 6


def test_a_copied_image_is_found_by_content_not_by_path(image_folder: Path) -> None:
    # the same picture under another name in another class of the training split
    shutil.copy(image_folder / "val" / "n0002" / "1.png", image_folder / "train" / "n0003" / "copy.png")
    train = ImageFolderDataset(image_folder, "train", transform=SMALL)
    val = ImageFolderDataset(image_folder, "val", transform=SMALL)
    with pytest.raises(DataError) as info:
        check_splits({"train": [train], "val": [val]}, "content")
    assert "1 image(s) of train are also in val (by content)" in str(info.value)
    assert "n0003/copy.png" in str(info.value) and "n0002/1.png" in str(info.value)
    assert check_splits({"train": [train], "val": [val]}, "path")["mode"] == "path"
    record = check_splits({"train": [train], "val": [val]}, "off")
    assert record == {"mode": "off", "roles": {"train": {"items": 10}, "val": {"items": 6}}}


def test_calibration_draws_are_checked_as_a_subset(tiny_world: Path) -> None:
    wrapper = get_model("tiny-clip")
    ds, order = calibration_items(wrapper, str(tiny_world), 8, seed=0)
    assert ds.split == "train" and len(order) == 8
    test = open_world(tiny_world, "captions", "test", SMALL)
    record = check_splits({"calibration": [(ds, order)], "test": [test]})
    assert record["mode"] == "content" and record["roles"]["calibration"]["images"] == len(set(order))
    leaky = open_split(f"{tiny_world}@train", "test", transform=SMALL)
    with pytest.raises(DataError, match="of calibration are also in test"):
        check_splits({"calibration": [(ds, order)], "test": [leaky]})
    # the in-memory world scenes are the train split's pixels: a test set of train images is caught too
    mem, mem_order = calibration_items(wrapper, "world", 8, seed=0)
    world_train = open_world(tiny_world, "captions", "train", SMALL)
    with pytest.raises(DataError, match="of calibration are also in test"):
        check_splits({"calibration": [(mem, mem_order)], "test": [world_train]})


def test_calibration_reads_the_train_split_or_the_one_named(image_folder: Path) -> None:
    wrapper = get_model("tiny-clip")
    shutil.rmtree(image_folder / "train")
    with pytest.raises(DataError, match="@SPLIT"):
        build_calibration_batches(wrapper, str(image_folder), 1, 2, seed=0)
    (batch,) = build_calibration_batches(wrapper, f"{image_folder}@val", 1, 2, seed=0)
    assert batch["pixel_values"].shape[0] == 2


def test_hugging_face_splits_by_name_and_their_images_compared(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    def part(values: list[int]) -> object:
        imgs = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in values]
        return datasets.Dataset.from_dict({"image": imgs, "caption": [f"grey {v}" for v in values]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "caption": datasets.Value("string")}))

    datasets.DatasetDict({"train": part([10, 20, 30]), "validation": part([40, 50])}).save_to_disk(tmp_path / "hf")
    cfg = DatasetSection(train=str(tmp_path / "hf"), val=f"{tmp_path / 'hf'}@validation")
    parts = open_splits(cfg, transform=SMALL)
    assert (len(parts["train"]), len(parts["val"]), parts["val"].split) == (3, 2, "validation")
    datasets.DatasetDict({"train": part([10, 20, 30]), "validation": part([40, 20])}).save_to_disk(tmp_path / "hf2")
    with pytest.raises(DataError, match=r"1 image\(s\) of train are also in val"):
        open_splits(DatasetSection(train=str(tmp_path / "hf2"), val=f"{tmp_path / 'hf2'}@validation"),
                    transform=SMALL)
