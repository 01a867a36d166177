"""Secure data loading: paths confined to the dataset's root, the manifest checked on read, bombs refused."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import ImageFile

from rcc_compression.cli import main
from rcc_compression.data.datasets import (
    ConceptualCaptionsDataset,
    ImageFolderDataset,
    KarpathyCaptionsDataset,
    VQADataset,
    open_dataset,
)
from rcc_compression.data.loaders import build_loader
from rcc_compression.data.secure import MANIFEST_NAME, PathEscape, manifest_mismatches, write_manifest
from rcc_compression.data.transforms import ImageTransform
from rcc_compression.errors import DataError

from .conftest import karpathy_entry, write_png

SMALL = ImageTransform(size=16)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An image outside every dataset root (a file the data must never reach)."""
    return write_png(tmp_path / "secret" / "private.png", 7)


@pytest.fixture
def no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any image decoding fails the test."""
    def refuse(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        raise AssertionError("an image was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def _karpathy(root: Path, filenames: list[str]) -> Path:
    for i in range(2):
        write_png(root / f"img{i}.png", i)
    entries = [karpathy_entry(i, "test", ["a red circle"]) | {"filename": name} for i, name in enumerate(filenames)]
    path = root / "dataset_x.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def test_dot_dot_in_a_karpathy_file_is_refused_in_one_line(tmp_path: Path, outside: Path, no_reading: None) -> None:
    path = _karpathy(tmp_path / "data", ["img0.png", "../secret/private.png"])
    for skip_bad in (False, True):  # an escape is never a bad item to skip
        with pytest.raises(PathEscape) as exc:
            KarpathyCaptionsDataset(path, "test", skip_bad=skip_bad)
        assert "'..'" in str(exc.value) and "nothing read" in str(exc.value) and "\n" not in str(exc.value)


def test_symlinks_out_of_the_root_are_refused(tmp_path: Path, outside: Path, no_reading: None) -> None:
    root = tmp_path / "data"
    path = _karpathy(root, ["img0.png", "img1.png"])
    os.symlink(outside, root / "img1.png.lnk")
    data = json.loads(path.read_text())
    data["images"][1]["filename"] = "img1.png.lnk"
    path.write_text(json.dumps(data))
    with pytest.raises(PathEscape, match="a symbolic link resolves to .*private.png"):
        KarpathyCaptionsDataset(path, "test")
    # a class folder that is a link out of the root
    folders = tmp_path / "classes"
    write_png(folders / "val" / "cat" / "0.png", 1)
    os.symlink(outside.parent, folders / "val" / "dog")
    with pytest.raises(PathEscape, match="outside the dataset root"):
        ImageFolderDataset(folders, "val")
    # a link inside the root stays allowed
    os.remove(folders / "val" / "dog")
    os.symlink(folders / "val" / "cat", folders / "val" / "dog")
    assert len(ImageFolderDataset(folders, "val", transform=SMALL)) == 2


def test_absolute_paths_out_of_the_root_are_refused_in_every_format(tmp_path: Path, outside: Path,
                                                                    no_reading: None) -> None:
    root = tmp_path / "cc"
    write_png(root / "a.png", 1)
    tsv = root / "train.tsv"
    tsv.write_text(f"caption\timage\na red circle\ta.png\na blue star\t{outside}\n")
    with pytest.raises(PathEscape, match="outside the dataset root"):
        ConceptualCaptionsDataset(tsv)
    q = root / "questions.json"
    q.write_text(json.dumps({"questions": [{"question": "what?", "question_id": 1, "image_id": 1,
                                            "image": "../secret/private.png"}]}))
    with pytest.raises(PathEscape):
        VQADataset(q, image_root=root)
    assert main(["evaluate", "-m", "tiny-clip", "-d", str(tsv), "-b", "retrieval"]) == 2


def test_the_manifest_is_checked_on_read(tmp_path: Path) -> None:
    root = tmp_path / "data"
    path = _karpathy(root, ["img0.png", "img1.png"])
    manifest = write_manifest(root)
    assert sorted(manifest["files"]) == ["dataset_x.json", "img0.png", "img1.png"]
    assert manifest_mismatches(root) == {"missing": [], "changed": [], "unlisted": []}
    ds = KarpathyCaptionsDataset(path, "test", transform=SMALL)
    assert all(s["error"] is None for s in (ds[0], ds[1])) and ds.describe()["guard"]["files_checked"] == 3
    write_png(root / "img1.png", 99)  # changed after the manifest was written
    ds = KarpathyCaptionsDataset(path, "test", transform=SMALL)
    assert ds[0]["error"] is None and "does not match the manifest" in ds[1]["error"]
    with pytest.raises(DataError, match="does not match the manifest"):
        list(build_loader(ds, batch_size=2))
    assert manifest_mismatches(root)["changed"] == ["img1.png"]
    (root / "dataset_x.json").write_text(path.read_text() + " ")  # the annotations changed too
    with pytest.raises(DataError, match="dataset_x.json: sha256"):
        KarpathyCaptionsDataset(path, "test")
    assert main(["data", "manifest", str(root), "--check"]) == 2
    assert main(["data", "manifest", str(root)]) == 0 and main(["data", "manifest", str(root), "--check"]) == 0
    write_png(root / "img2.png", 5)
    data = json.loads(path.read_text())
    data["images"][1]["filename"] = "img2.png"  # an image the manifest does not list
    path.write_text(json.dumps(data))
    m = write_manifest(root)
    del m["files"]["img2.png"]
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    assert "not listed in" in KarpathyCaptionsDataset(path, "test", transform=SMALL)[1]["error"]


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path, no_reading: None) -> None:
    root = tmp_path / "bomb"
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "0.png").write_bytes(png_header(9000, 9000))  # 81 M pixels (243 MB decoded) in 70 bytes
    ds = open_dataset(root, "val", task="classification", transform=SMALL)
    with pytest.raises(DataError) as exc:
        list(build_loader(ds, batch_size=1))
    msg = str(exc.value)
    assert "exceeds max_pixels=67108864" in msg and "\n" not in msg
