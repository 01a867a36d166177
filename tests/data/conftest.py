"""Small datasets on disk in every supported format, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcc_compression.data.world import WorldSpec, generate_world

TINY_SPEC = dict(train=24, val=8, test=16, cls_train_per_class=1, cls_val_per_class=1, cls_test_per_class=2,
                 vqa_train=20, vqa_val=8, vqa_test=16)


def write_png(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A random RGB image (width x height = ``size``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated world with every split and part, at tiny sizes (seed 0)."""
    root = tmp_path_factory.mktemp("world")
    generate_world(root, WorldSpec(seed=0, **TINY_SPEC))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageNet-style: train/ and val/ class folders (wnid names) and a LOC-style class-name file."""
    root = tmp_path / "imagenet"
    for s, (split, n) in enumerate((("train", 3), ("val", 2))):
        for c, wnid in enumerate(("n0001", "n0002", "n0003")):
            for k in range(n):
                write_png(root / split / wnid / f"{k}.png", 1000 * s + 100 * c + k)  # no image in both splits
    (root / "classnames.txt").write_text("n0001 tench, Tinca tinca\nn0002 goldfish\nn0003 great white shark\n")
    return root


def karpathy_entry(i: int, split: str, captions: list[str], filepath: str | None = None) -> dict:
    entry = {
        "filename": f"img{i}.png",
        "imgid": i,
        "split": split,
        "sentences": [
            {"raw": c, "tokens": c.split(), "imgid": i, "sentid": 10 * i + j} for j, c in enumerate(captions)
        ],
    }
    if filepath is not None:
        entry["filepath"] = filepath
        entry["cocoid"] = 1000 + i
    return entry


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """COCO Karpathy json with images under val2014/ (4 images: train, restval, val, test)."""
    root = tmp_path / "coco"
    splits = ["train", "restval", "val", "test"]
    images = []
    for i, split in enumerate(splits):
        write_png(root / "val2014" / f"img{i}.png", i)
        images.append(karpathy_entry(i, split, [f"caption {i} a", f"caption {i} b"], filepath="val2014"))
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root


@pytest.fixture
def flickr_dir(tmp_path: Path) -> Path:
    """Flickr30k Karpathy json with images in flickr30k-images/."""
    root = tmp_path / "flickr"
    images = []
    for i, split in enumerate(["train", "test", "test"]):
        write_png(root / "flickr30k-images" / f"img{i}.png", 50 + i)
        images.append(karpathy_entry(i, split, [f"a dog {i}", f"two dogs {i}", f"the dog {i}"]))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return root


@pytest.fixture
def cc_tsv(tmp_path: Path) -> Path:
    """A Conceptual Captions tsv (caption, relative image path), two captions for one image."""
    root = tmp_path / "cc"
    for i in range(3):
        write_png(root / "images" / f"{i}.png", 70 + i)
    rows = [
        "a red bus\timages/0.png",
        "a bus that is red\timages/0.png",
        "two cats\timages/1.png",
        "a tree\timages/2.png",
    ]
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    return root / "train.tsv"
