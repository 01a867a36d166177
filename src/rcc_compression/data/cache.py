"""A disk cache of preprocessed images: uint8 tensors in safetensors shards.

The cache directory is ``cache_dir/<transform fingerprint>-<dataset fingerprint>/`` with
``shard_00000.safetensors``, ... (``pixels``: n x 3 x H x W uint8) and ``manifest.json`` (written
last; the image keys in shard order). Changing the transform (size, crop, resampling) or any image
file (name, size, mtime) changes the key, so a stale cache is never read. Images are stored
before normalisation, which keeps them exact and four times smaller than float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..utils.io import atomic_save_safetensors, atomic_write_json, load_safetensors

CACHE_VERSION = 1


def cache_key(dataset: Any) -> str:
    """``<transform fingerprint>-<dataset fingerprint>``."""
    return f"{dataset.get_transform().fingerprint()}-{dataset.fingerprint()}"


def build_cache(
    dataset: Any, cache_dir: str | os.PathLike[str], shard_size: int = 2048, progress: bool = False
) -> Path:
    """Write (or reuse) the cache of ``dataset``'s images and return its directory.

    An image that cannot be decoded is a ``DataError`` naming it, unless the dataset skips bad
    items: then its slot is marked invalid and loading it reports the error as usual.
    """
    path = Path(cache_dir) / cache_key(dataset)
    if (path / "manifest.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    first: dict[str, int] = {}
    for i in range(len(dataset)):
        k = dataset.image_key(i)
        if k not in first:
            first[k] = i
            keys.append(k)
    shards: list[str] = []
    bad: dict[str, str] = {}
    shape: list[int] | None = None
    iterator: Any = range(0, len(keys), shard_size)
    if progress:
        from rich.progress import track

        iterator = track(iterator, description=f"caching {len(keys)} images")
    for s, start in enumerate(iterator):
        chunk = keys[start : start + shard_size]
        tensors = []
        for k in chunk:
            try:
                t = dataset.transform.to_uint8(dataset.load_raw(first[k]))
            except Exception as exc:  # noqa: BLE001 - any decoder failure
                msg = f"{dataset.records[first[k]].image}: cannot read image: {type(exc).__name__}: {exc}"
                if not dataset.skip_bad:
                    raise DataError(msg + " (pass skip_bad=True / --skip-bad to skip unreadable images)") from None
                bad[k] = msg
                t = None
            if t is not None and shape is None:
                shape = list(t.shape)
            tensors.append(t)
        if shape is None:
            shape = [3, 1, 1]
        stacked = torch.stack(
            [t if t is not None and list(t.shape) == shape else torch.zeros(shape, dtype=torch.uint8) for t in tensors]
        )
        for k, t in zip(chunk, tensors, strict=True):
            if t is not None and list(t.shape) != shape and k not in bad:
                raise DataError(
                    f"{k}: preprocessed to {list(t.shape)}, other images to {shape}; "
                    "the transform must crop to a fixed size to be cached"
                )
        name = f"shard_{s:05d}.safetensors"
        atomic_save_safetensors({"pixels": stacked}, path / name)
        shards.append(name)
    atomic_write_json(
        path / "manifest.json",
        {
            "version": CACHE_VERSION,
            "transform": dataset.get_transform().__dict__,
            "dataset": dataset.fingerprint(),
            "source": dataset.source,
            "count": len(keys),
            "shard_size": shard_size,
            "shape": shape,
            "shards": shards,
            "keys": keys,
            "bad": bad,
        },
    )
    return path


class CachedPixels:
    """Read access to a cache written by :func:`build_cache`; shards are loaded on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        try:
            self.manifest = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{manifest}: unreadable cache manifest ({exc}); delete {self.path} to rebuild") from None
        self.slots = {k: i for i, k in enumerate(self.manifest["keys"])}
        self.shard_size = int(self.manifest["shard_size"])
        self._loaded: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, key: str) -> torch.Tensor:
        """The uint8 pixels of one image key (a ``DataError`` for a key marked unreadable)."""
        if key in self.manifest["bad"]:
            raise DataError(self.manifest["bad"][key])
        slot = self.slots.get(key)
        if slot is None:
            raise DataError(f"{key}: not in the cache at {self.path}; rebuild it")
        s = slot // self.shard_size
        if s not in self._loaded:
            self._loaded[s] = load_safetensors(self.path / self.manifest["shards"][s])["pixels"]
        return self._loaded[s][slot % self.shard_size]

    def all(self) -> torch.Tensor:
        """Every cached image, in key order, as one uint8 tensor (N x 3 x H x W)."""
        parts = [load_safetensors(self.path / name)["pixels"] for name in self.manifest["shards"]]
        return torch.cat(parts)[: len(self.slots)]
