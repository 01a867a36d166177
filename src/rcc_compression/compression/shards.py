"""A compressed checkpoint written a block at a time (format version 4): each block's file whole, the manifest last.

The sequential pipeline (:mod:`.sequential`) compresses one transformer block at a time and writes
it before it reads the next: ``blocks/NNNNN.safetensors`` holds the block's compressed layers (as
``layers.safetensors`` stores them, keys ``<layer>::<part>``) and its other tensors (norms, layers
left dense). The files are built in a staging directory, each written atomically; what a file
holds (its layers' manifest entries, its size and sha256) is returned for the caller to commit to
its progress file, so a run killed between blocks resumes after the last committed block and a
file without its record is written again. :meth:`ShardWriter.finish` writes what lies outside the
blocks (``layers.safetensors``, ``rest.safetensors``), the processors and the manifest, and moves
the directory into place whole (the target holds the previous checkpoint or the new one, never a mix).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..models.base import ModelWrapper
from ..utils.io import atomic_write_json, replace_directory, sha256_file
from .layers import compressed_layers
from .storage import (
    LAYERS_FILE,
    MANIFEST,
    REST_FILE,
    SHARD_DIR,
    build_manifest,
    encode_layers,
    listed_files,
    rest_state,
    write_tensors,
)


class ShardWriter:
    """Write a compressed checkpoint block by block into ``staging``, then move it to its target.

    ``encrypt_key``: every tensor file AES-256-GCM encrypted (mode 0600), as :func:`~.storage.save_compressed` does.
    """

    def __init__(self, staging: str | os.PathLike[str], encrypt_key: bytes | None = None) -> None:
        self.staging = Path(staging)
        self.encrypt_key = encrypt_key
        (self.staging / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def write_block(self, index: int, name: str, block: nn.Module) -> dict[str, Any]:
        """Write block ``name`` (the module itself: compressed layers and all) as shard ``index``; returns its
        record: ``file``, ``sha256``, ``bytes``, ``layers`` (manifest entries) and ``rest_bytes``."""
        local = compressed_layers(block)
        tensors, info = encode_layers({f"{name}.{n}": m for n, m in local.items()})
        plain, aliases = rest_state(block, tuple(f"{n}." for n in local))
        tensors.update({f"{name}.{k}": v for k, v in plain.items()})
        rel = f"{SHARD_DIR}/{index:05d}.safetensors"
        path = self.staging / rel
        try:
            write_tensors(path, tensors, self.encrypt_key)
        except OSError as exc:
            raise CheckpointError(f"{path}: could not write block {name}: {exc.strerror or exc}; the blocks "
                                  "written before it are intact: free space and resume the run") from exc
        return {"block": name, "file": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "layers": info, "aliases": {f"{name}.{a}": f"{name}.{b}" for a, b in aliases.items()},
                "rest_bytes": sum(t.numel() * t.element_size() for t in plain.values())}

    def intact(self, record: Mapping[str, Any]) -> bool:
        """Whether the shard a committed ``record`` names is there with its recorded size and sha256."""
        path = self.staging / str(record.get("file", ""))
        return (path.is_file() and path.stat().st_size == record.get("bytes")
                and sha256_file(path) == record.get("sha256"))

    def finish(self, model: nn.Module, target: str | os.PathLike[str], blocks: Sequence[Mapping[str, Any]],
               *, config: dict[str, Any] | None = None, records: list[dict[str, Any]] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write what lies outside the blocks and the manifest, then replace ``target`` with the checkpoint.

        ``model`` (a wrapper saves its processors too) holds everything outside the blocks; ``blocks``
        are the records :meth:`write_block` returned, in order. Returns the manifest.
        """
        wrapper = model if isinstance(model, ModelWrapper) else None
        inner = wrapper.model if wrapper is not None else model
        prefixes = tuple(f"{b['block']}." for b in blocks)
        outside = {n: m for n, m in compressed_layers(inner).items() if not n.startswith(prefixes)}
        layer_tensors, layer_info = encode_layers(outside)
        rest, aliases = rest_state(inner, prefixes + tuple(f"{n}." for n in outside))
        for name, fname, tensors in (("layers", LAYERS_FILE, layer_tensors), ("rest", REST_FILE, rest)):
            try:
                write_tensors(self.staging / fname, tensors, self.encrypt_key)
            except OSError as exc:
                raise CheckpointError(f"{self.staging / fname}: could not write the {name} outside the blocks: "
                                      f"{exc.strerror or exc}; free space and resume the run") from exc
        if wrapper is not None:
            wrapper.save_processors(self.staging / "processor")
        files = listed_files(self.staging, frozenset(b["file"] for b in blocks))
        for b in blocks:  # hashed when written: a shard is not read again
            files[b["file"]] = {"sha256": b["sha256"], "bytes": b["bytes"]}
        all_layers = {k: v for b in blocks for k, v in b["layers"].items()} | layer_info
        for b in blocks:
            aliases.update(b.get("aliases", {}))
        rest_bytes = sum(t.numel() * t.element_size() for t in rest.values()) + sum(b["rest_bytes"] for b in blocks)
        manifest = build_manifest(
            inner, wrapper, all_layers, rest_bytes, aliases, dict(sorted(files.items())), config=config,
            records=records, shards=[b["file"] for b in blocks], extra=extra, encrypt_key=self.encrypt_key,
            quantized=any(v.get("quant") for v in all_layers.values()),
            activations=any(v.get("activations") for v in all_layers.values()))
        atomic_write_json(self.staging / MANIFEST, manifest, mode=0o600 if self.encrypt_key else None)
        replace_directory(self.staging, Path(target))
        return manifest


__all__ = ["ShardWriter"]
