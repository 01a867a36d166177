"""Every on-disk format loads exactly; bad input is one clear DataError naming the file, or a counted skip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rcc_compression.data.collate import Collator
from rcc_compression.data.datasets import (
    ConceptualCaptionsDataset,
    Flickr30kDataset,
    HFDataset,
    ImageFolderDataset,
    KarpathyCaptionsDataset,
    VQADataset,
    open_dataset,
    open_world,
)
from rcc_compression.data.loaders import build_loader
from rcc_compression.data.transforms import ImageTransform
from rcc_compression.errors import DataError

from .conftest import write_png

SMALL = ImageTransform(size=16, crop=16)


def test_image_folder_with_imagenet_class_names(image_folder: Path) -> None:
    ds = ImageFolderDataset(image_folder, "train", transform=SMALL)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    assert len(ds) == 9 and ds.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    s = ds[4]
    assert s["pixel_values"].dtype == torch.uint8 and s["pixel_values"].shape == (3, 16, 16)
    assert s["label"] == 1 and s["image_id"] == "n0002/1.png" and s["error"] is None
    assert len(ImageFolderDataset(image_folder, "val", transform=SMALL)) == 6
    assert isinstance(open_dataset(image_folder, split="val"), ImageFolderDataset)


def test_image_folder_without_class_file_uses_folder_names(tmp_path: Path) -> None:
    for c in ("red_circle", "blue_star"):
        write_png(tmp_path / "test" / c / "0.png", 1)
    ds = ImageFolderDataset(tmp_path, "test")
    assert ds.classnames == ["blue star", "red circle"] and ds.labels == [0, 1]


def test_class_file_that_does_not_fit_the_folders_is_named(image_folder: Path) -> None:
    (image_folder / "classnames.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(DataError, match=r"classnames\.txt: 2 class names for 3 class folders"):
        ImageFolderDataset(image_folder, "train")
    with pytest.raises(DataError, match="no such split directory"):
        ImageFolderDataset(image_folder, "test")


def test_coco_karpathy_splits_and_paths(coco_dir: Path) -> None:
    train = KarpathyCaptionsDataset(coco_dir / "dataset_coco.json", "train", transform=SMALL)
    assert [r.image_id for r in train.records] == ["1000", "1001"]  # train + restval
    test = open_dataset(coco_dir, split="test", transform=SMALL)
    assert type(test).__name__ == "COCOCaptionsDataset"
    assert len(test) == 1 and test[0]["captions"] == ["caption 3 a", "caption 3 b"]
    assert test.records[0].image == str(coco_dir / "val2014" / "img3.png")


def test_flickr_karpathy(flickr_dir: Path) -> None:
    ds = open_dataset(flickr_dir / "dataset_flickr30k.json", split="test", transform=SMALL)
    assert isinstance(ds, Flickr30kDataset) and len(ds) == 2
    assert ds.records[1].captions == ["a dog 2", "two dogs 2", "the dog 2"]


def test_conceptual_captions_tsv_groups_captions_per_image(cc_tsv: Path) -> None:
    ds = ConceptualCaptionsDataset(cc_tsv, transform=SMALL)
    assert [r.captions for r in ds.records] == [["a red bus", "a bus that is red"], ["two cats"], ["a tree"]]
    flipped = cc_tsv.with_name("flipped.tsv")
    flipped.write_text("image\tcaption\nimages/2.png\ta tall tree\n")
    assert ConceptualCaptionsDataset(flipped).records[0].captions == ["a tall tree"]


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    imgs = [Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    caps = datasets.Dataset.from_dict(
        {"image": imgs, "caption": [["a", "b"], ["c"], ["d e"]]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}),
    )
    datasets.DatasetDict({"test": caps}).save_to_disk(str(tmp_path / "caps"))
    ds = open_dataset(tmp_path / "caps", split="test", transform=SMALL)
    assert isinstance(ds, HFDataset) and ds.task == "captions"
    assert [r.captions for r in ds.records] == [["a", "b"], ["c"], ["d e"]]
    assert int(ds[2]["pixel_values"][0, 0, 0]) == 80
    labelled = datasets.Dataset.from_dict(
        {"image": imgs, "label": [1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}),
    )
    labelled.save_to_disk(str(tmp_path / "cls"))
    ds = HFDataset(tmp_path / "cls", transform=SMALL)
    assert ds.task == "classification" and ds.classnames == ["cat", "dog"] and ds.labels == [1, 0, 1]
    with pytest.raises(DataError, match="no image column 'picture'"):
        HFDataset(tmp_path / "cls", image_column="picture")
    with pytest.raises(DataError, match="cannot load the Hugging Face dataset"):
        HFDataset("no-such-org/no-such-dataset-here")


def test_vqa_format(tiny_world: Path) -> None:
    ds = open_world(tiny_world, "vqa", "test", SMALL)
    assert isinstance(ds, VQADataset) and len(ds) == 16
    anns = json.loads((tiny_world / "vqa" / "annotations_test.json").read_text())["annotations"]
    assert ds.records[0].answers == [a["answer"] for a in anns[0]["answers"]]
    assert ds.records[0].meta["answer_type"] == anns[0]["answer_type"]
    batch = Collator(tokenizer=None)([ds[0], ds[1]])
    assert batch["question"] == [ds.records[0].question, ds.records[1].question]


def test_world_parts_open_by_spec(tiny_world: Path) -> None:
    assert open_dataset(tiny_world, split="test").format_name == "karpathy"
    cs = open_dataset(tiny_world, split="test", task="classification")
    assert len(cs.classnames) == 64 and cs.templates == "world" and len(cs.meta["held_out_pairs"]) == 16
    colour = open_world(tiny_world, "colour", "test")
    assert colour.classnames[:3] == ["red", "green", "blue"] and colour.templates == "world_colour"


# ------------------------------------------------------------------------------ bad input
def test_malformed_json_names_file_and_position(coco_dir: Path) -> None:
    path = coco_dir / "dataset_coco.json"
    path.write_text('{"images": [ {"filename": "img0.png",, } ]}')
    with pytest.raises(DataError, match=r"dataset_coco\.json: malformed JSON at line 1, column 38"):
        KarpathyCaptionsDataset(path, "test")
    path.write_text('{"annotations": []}')
    with pytest.raises(DataError, match="not a Karpathy captions file"):
        KarpathyCaptionsDataset(path, "test")
    path.write_text('{"images": [{"split": "test"}]}')
    with pytest.raises(DataError, match=r"images\[0\]: expected an object with 'filename'"):
        KarpathyCaptionsDataset(path, "test")


def test_missing_image_names_the_file_or_is_counted(coco_dir: Path, flickr_dir: Path, cc_tsv: Path) -> None:
    (coco_dir / "val2014" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"val2014/img1\.png: image file not found \(listed in .*dataset_coco\.json"):
        KarpathyCaptionsDataset(coco_dir / "dataset_coco.json", "train")
    ds = KarpathyCaptionsDataset(coco_dir / "dataset_coco.json", "train", skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"missing image": 1}
    (cc_tsv.parent / "images" / "1.png").unlink()
    with pytest.raises(DataError, match=r"images/1\.png: image file not found \(listed in .*train\.tsv:3\)"):
        ConceptualCaptionsDataset(cc_tsv)
    assert ConceptualCaptionsDataset(cc_tsv, skip_bad=True).skipped == {"missing image": 1}


def test_empty_caption_names_the_file_or_is_counted(flickr_dir: Path, cc_tsv: Path) -> None:
    path = flickr_dir / "dataset_flickr30k.json"
    data = json.loads(path.read_text())
    data["images"][1]["sentences"][1]["raw"] = "   "
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"dataset_flickr30k\.json: images\[1\] \(img1\.png\): sentence 1 is an empty caption"
    ):
        Flickr30kDataset(path, "test")
    ds = Flickr30kDataset(path, "test", skip_bad=True)
    assert ds.skipped == {"empty caption": 1} and ds.records[0].captions == ["a dog 1", "the dog 1"]
    cc_tsv.write_text("\timages/0.png\na tree\timages/2.png\n")
    with pytest.raises(DataError, match=r"train\.tsv:1: empty caption for images/0\.png"):
        ConceptualCaptionsDataset(cc_tsv)
    cc_tsv.write_text("only one column\n")
    with pytest.raises(DataError, match=r"train\.tsv:1: expected 2 tab-separated columns"):
        ConceptualCaptionsDataset(cc_tsv)


def test_all_items_bad_is_an_error(coco_dir: Path) -> None:
    for p in (coco_dir / "val2014").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"no usable items \(4 skipped as bad\)"):
        KarpathyCaptionsDataset(coco_dir / "dataset_coco.json", "all", skip_bad=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_surfaces_in_the_main_process(image_folder: Path, workers: int) -> None:
    bad = image_folder / "val" / "n0002" / "1.png"
    bad.write_bytes(b"this is not a png")
    ds = ImageFolderDataset(image_folder, "val", transform=SMALL)
    loader = build_loader(ds, batch_size=2, num_workers=workers)
    with pytest.raises(DataError) as info:
        list(loader)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: not a readable image (allowed: PNG") and "--skip-bad" in msg
    assert "Traceback" not in msg and "worker" not in msg
    ds = ImageFolderDataset(image_folder, "val", transform=SMALL, skip_bad=True)
    loader = build_loader(ds, batch_size=2, num_workers=workers)
    batches = list(loader)
    assert loader.skipped == 1 and sum(len(b["image_id"]) for b in batches) == 5
    assert sorted(i for b in batches for i in b["image_id"]) == [
        "n0001/0.png",
        "n0001/1.png",
        "n0002/0.png",
        "n0003/0.png",
        "n0003/1.png",
    ]


def test_unknown_formats_are_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RCC_DATA_ROOT", raising=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        open_dataset(tmp_path)
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        open_dataset(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"RCC_DATA_ROOT"):
        open_dataset("imagenet")
    with pytest.raises(DataError, match=r"imagenet does not exist"):
        open_dataset("imagenet", root=tmp_path)
