"""Bounded image decoding: the declared size is checked from the header, before any pixel is decoded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from rcc_compression.data.images import ImageError, ImageTooLarge, open_image, probe_image
from rcc_compression.errors import DataError


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoding fails the test."""
    def refuse(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_bomb_is_refused_from_its_header(no_decoding: None) -> None:
    bomb = png_bytes(3000, 3000)
    assert len(bomb) < 40_000  # a small file that declares 9 M pixels (36 MB decoded)
    info = probe_image(bomb)
    assert (info.width, info.height, info.format, info.decoded_bytes) == (3000, 3000, "PNG", 36_000_000)
    with pytest.raises(ImageTooLarge, match="max_pixels=1000000") as exc:
        open_image(bomb, max_pixels=1000 * 1000)
    assert (exc.value.limit, exc.value.value, exc.value.maximum) == ("max_pixels", 9_000_000, 1_000_000)
    assert isinstance(exc.value, DataError)
    with pytest.raises(ImageTooLarge, match="side 3000 exceeds max_side=2048"):
        open_image(bomb, max_pixels=None, max_side=2048)


def test_within_limits_decodes_whole(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(path)
    img = open_image(path, max_pixels=40 * 30)  # exactly at the bound
    assert img.mode == "RGB" and img.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(img), arr[..., :3])
    same = open_image(path.read_bytes(), mode=None)  # the file is closed; the pixels stay
    assert same.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(same), arr)
    with path.open("rb") as f:
        assert open_image(f).size == (40, 30)


def test_junk_truncated_and_disallowed_formats(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"not an image")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(_truncated_png())
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(ImageError, match=r"allowed: PNG, JPEG"):
        open_image(gif.getvalue(), formats=("PNG", "JPEG"))
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "missing.png")


def _truncated_png() -> bytes:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]
