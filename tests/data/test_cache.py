"""The tensor cache: exact pixels, reused, keyed by transform and files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rcc_compression.data.cache import CachedPixels, cache_key
from rcc_compression.data.datasets import ImageFolderDataset
from rcc_compression.data.transforms import ImageTransform

from .conftest import write_png


def test_cache_is_exact_reused_and_keyed(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ds = ImageFolderDataset(image_folder, "train", transform=ImageTransform(16, 16))
    direct = [ds[i]["pixel_values"] for i in range(len(ds))]
    path = ds.cache_data(cache)
    assert path.name == cache_key(ds) and (path / "manifest.json").is_file()
    assert [p.name for p in path.glob("*.safetensors")] == ["shard_00000.safetensors"]
    assert all(torch.equal(ds[i]["pixel_values"], direct[i]) for i in range(len(ds)))
    stamp = os.stat(path / "shard_00000.safetensors").st_mtime_ns
    again = ImageFolderDataset(image_folder, "train", transform=ImageTransform(16, 16))
    assert again.cache_data(cache) == path and os.stat(path / "shard_00000.safetensors").st_mtime_ns == stamp
    other = ImageFolderDataset(image_folder, "train", transform=ImageTransform(12, 12))
    assert other.cache_data(cache) != path and other[0]["pixel_values"].shape == (3, 12, 12)
    write_png(image_folder / "train" / "n0001" / "0.png", 999)  # a changed file changes the key
    changed = ImageFolderDataset(image_folder, "train", transform=ImageTransform(16, 16))
    assert cache_key(changed) != path.name


def test_shards_split_and_read_back(image_folder: Path, tmp_path: Path) -> None:
    from rcc_compression.data.cache import build_cache

    ds = ImageFolderDataset(image_folder, "train", transform=ImageTransform(8, 8))
    path = build_cache(ds, tmp_path, shard_size=4)
    assert len(list(path.glob("shard_*.safetensors"))) == 3
    cached = CachedPixels(path)
    assert len(cached) == 9
    assert torch.equal(cached.all(), torch.stack([ds.pixels(i) for i in range(9)]))
