"""Resolve a model by bundled short name, tiny test name, local directory or hub id.

``get_model`` always returns a :class:`~rcc_compression.models.base.ModelWrapper`; the model type
(``clip``, ``blip``, ``blip_vqa``) is read from the Hugging Face config when not given.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelLoadError
from .base import ModelWrapper, image_processor_class
from .blip import BLIPWrapper
from .clip import CLIPWrapper
from .tiny import RANDOM_MODELS, TINY_MODELS, build_tiny

#: bundled reference models: short name -> directory inside the package (filled by models/reference)
BUNDLED: dict[str, Path] = {}

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def register_bundled(name: str, path: str | os.PathLike[str]) -> None:
    """Make a model directory loadable by a short name."""
    BUNDLED[name] = Path(path)


def _discover_bundled() -> None:
    root = Path(__file__).resolve().parent / "reference"
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if (sub / "config.json").is_file():
                BUNDLED.setdefault(sub.name, sub)


_discover_bundled()


def detect_model_type(config: Any) -> str:
    """``clip``, ``blip`` or ``blip_vqa`` from a Hugging Face config object or dict."""
    d = config if isinstance(config, dict) else config.to_dict()
    mtype = d.get("model_type", "")
    archs = d.get("architectures") or []
    if mtype == "clip":
        return "clip"
    if mtype == "blip":
        return "blip_vqa" if any("QuestionAnswering" in a for a in archs) else "blip"
    raise ModelLoadError(f"unsupported model type {mtype!r} (architectures {archs}); supported: clip, blip, blip_vqa")


def _model_class(model_type: str) -> Any:
    import transformers

    names = {"clip": "CLIPModel", "blip": "BlipForConditionalGeneration", "blip_vqa": "BlipForQuestionAnswering"}
    if model_type not in names:
        raise ModelLoadError(f"unknown model type {model_type!r}; allowed: {', '.join(names)}")
    return getattr(transformers, names[model_type])


def wrap_model(model: nn.Module, image_processor: Any = None, tokenizer: Any = None, name: str = "") -> ModelWrapper:
    """Wrap a ``transformers`` CLIP or BLIP model (or return a wrapper unchanged)."""
    if isinstance(model, ModelWrapper):
        return model

    cls_name = type(model).__name__
    if cls_name == "CLIPModel":
        return CLIPWrapper(model, image_processor, tokenizer, name)
    if cls_name in ("BlipForConditionalGeneration", "BlipForQuestionAnswering"):
        return BLIPWrapper(model, image_processor, tokenizer, name)
    raise ModelLoadError(f"cannot wrap {cls_name}: supported are CLIPModel, BlipForConditionalGeneration, "
                         "BlipForQuestionAnswering (any nn.Module can still be compressed directly)")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain ``nn.Module`` inside a wrapper (or the module itself)."""
    return model.model if isinstance(model, ModelWrapper) else model


def _load_processors(path: str, model_type: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tok = img = None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        tok = None
    try:
        img = image_processor_class("clip" if model_type == "clip" else "blip").from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        img = None
    return img, tok


def _from_directory(path: Path, model_type: str | None, dtype: str, name: str) -> ModelWrapper:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json); save one with model.save_pretrained()")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: malformed JSON: {exc}") from None
    mtype = model_type or detect_model_type(cfg)
    model = _load_weights(_model_class(mtype), str(path), dtype)
    img, tok = _load_processors(str(path), mtype)
    return wrap_model(model.eval(), img, tok, name)


def _load_weights(cls: Any, where: str, dtype: str) -> Any:
    """``cls.from_pretrained`` with every failure (missing or corrupt weights, a refused pickle) as one line."""
    import torch
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(where, dtype=getattr(torch, _DTYPES[dtype]))
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{where}: cannot load the {cls.__name__} weights: {first[:300]}") from None


def _from_hub(model_id: str, model_type: str | None, dtype: str) -> ModelWrapper:
    from huggingface_hub.errors import HFValidationError

    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_id)
    except (OSError, HFValidationError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load {model_id!r}: it is not a bundled name ({', '.join(sorted(BUNDLED)) or 'none'}), "
            f"not a tiny test model ({', '.join(TINY_MODELS)}), not a local directory, and the Hugging Face hub "
            f"could not be reached (this machine may have no network). Download it where there is network "
            f"(huggingface-cli download {model_id} --local-dir DIR) and pass the local directory instead. "
            f"[{type(exc).__name__}]"
        ) from None
    mtype = model_type or detect_model_type(cfg)
    model = _load_weights(_model_class(mtype), model_id, dtype)
    img, tok = _load_processors(model_id, mtype)
    return wrap_model(model.eval(), img, tok, model_id)


def get_model(
    name_or_path: str | os.PathLike[str] | nn.Module,
    type: str | None = None,  # noqa: A002 - the design document's keyword
    dtype: str = "float32",
    seed: int = 0,
) -> ModelWrapper:
    """Resolve a model: bundled name, ``tiny-*`` name, local directory, or Hugging Face hub id.

    Also accepts an ``nn.Module`` (wrapped) or a wrapper (returned as is).
    """
    if isinstance(name_or_path, nn.Module):
        return wrap_model(name_or_path)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
    key = str(name_or_path)
    if key in TINY_MODELS or key in RANDOM_MODELS:
        wrapper = build_tiny(key, seed=seed)
        if type is not None and wrapper.model_type != type.split("_")[0]:
            raise ModelLoadError(f"{key} is a {wrapper.model_type} model, not {type}")
        return wrapper
    if key in BUNDLED:
        return _from_directory(BUNDLED[key], type, dtype, key)
    path = Path(os.path.expanduser(key))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a model directory, got a file")
        return _from_directory(path, type, dtype, key)
    if key.startswith((".", "/", "~")):
        raise ModelLoadError(f"{key}: no such model directory")
    return _from_hub(key, type, dtype)

