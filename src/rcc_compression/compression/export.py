"""Deployable models: load whatever a user points at, and export it (dense Hugging Face or ONNX).

:func:`load_deployable` accepts a compressed checkpoint (``manifest.json``; encrypted ones are
decrypted in memory only), a run directory holding one in ``compressed/``, a plain Hugging Face
model directory (for example one written by :func:`~.storage.export_dense`), or a bundled/tiny
model name. ONNX export lives in :mod:`.onnx_export`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..models.base import ModelWrapper
from ..models.registry import BUNDLED, get_model
from ..models.tiny import RANDOM_MODELS, TINY_MODELS
from .layers import compressed_layers
from .onnx_export import export_onnx
from .storage import MANIFEST, export_dense, load_compressed, read_manifest, tensor_files


@dataclass
class Deployable:
    """A loaded model ready to serve or export, and where it came from."""

    wrapper: ModelWrapper
    name: str
    source: str
    kind: str  # "compressed" | "dense"
    manifest: dict[str, Any] | None = None

    @property
    def compressed(self) -> bool:
        return bool(compressed_layers(self.wrapper.model))


def checkpoint_dir(source: str | os.PathLike[str]) -> Path | None:
    """The compressed checkpoint at ``source`` (itself or a run directory's ``compressed/``), if any."""
    p = Path(source)
    for cand in (p, p / "compressed"):
        if (cand / MANIFEST).is_file():
            return cand
    return None


def load_deployable(source: str | os.PathLike[str], key: bytes | None = None, name: str | None = None,
                    reference_model: nn.Module | None = None) -> Deployable:
    """Load a compressed checkpoint, a run directory, a Hugging Face directory or a bundled/tiny name.

    ``key`` decrypts an encrypted checkpoint in memory (nothing decrypted is written). A checkpoint
    compressed as a delta needs its reference model: given, or loaded by the name its config records.
    """
    text = str(source)
    label = name or (text if text in BUNDLED or text in TINY_MODELS or text in RANDOM_MODELS
                     else Path(text).resolve().name)
    ckpt = None if text in BUNDLED or text in TINY_MODELS or text in RANDOM_MODELS else checkpoint_dir(text)
    if ckpt is None:
        wrapper = get_model(text)
        return Deployable(wrapper.eval(), label, text, "dense")
    manifest = read_manifest(ckpt)
    if reference_model is None and any(isinstance(v, dict) and v.get("base") for v in manifest["layers"].values()):
        ref_name = ((manifest.get("config") or {}).get("model") or {}).get("name")
        if not ref_name:
            raise CheckpointError(f"{ckpt}: layers are stored as deltas and the config names no reference model")
        reference_model = get_model(ref_name)
    loaded = load_compressed(ckpt, reference_model=reference_model, key=key)
    if not isinstance(loaded, ModelWrapper):
        raise CheckpointError(f"{ckpt}: the checkpoint holds no tokenizer/image processor (saved from a bare "
                              f"module); it cannot take images or text")
    return Deployable(loaded.eval(), label, text, "compressed", manifest)


def checkpoint_bytes(ckpt: str | os.PathLike[str]) -> int:
    """Bytes of a compressed checkpoint's tensor files (what its weights take on disk)."""
    return sum((Path(ckpt) / f).stat().st_size for f in tensor_files(read_manifest(ckpt)))


def export_model(source: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "onnx",
                 key: bytes | None = None, overwrite: bool = False, verify: bool = True) -> dict[str, Any]:
    """Export what ``source`` holds as ONNX (compression kept) or as a dense Hugging Face directory.

    Returns a summary: the output, its bytes, and for ONNX the largest difference to PyTorch and the
    compressed checkpoint's tensor bytes to compare with.
    """
    if fmt not in ("onnx", "hf"):
        raise CheckpointError(f"export format {fmt!r}; allowed: onnx, hf")
    dep = load_deployable(source, key=key)
    summary: dict[str, Any] = {"source": str(source), "format": fmt, "output": str(out), "kind": dep.kind}
    ckpt = checkpoint_dir(source) if dep.kind == "compressed" else None
    if ckpt is not None:
        summary["checkpoint_bytes"] = checkpoint_bytes(ckpt)
    if fmt == "hf":
        path = export_dense(dep.wrapper, out, overwrite=overwrite)
        summary["bytes"] = sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
        return summary

    manifest = export_onnx(dep.wrapper, out, verify=verify, overwrite=overwrite, extra={"source": str(source)})
    summary["bytes"] = manifest["onnx_bytes"]
    summary["graphs"] = manifest["graphs"]
    return summary
