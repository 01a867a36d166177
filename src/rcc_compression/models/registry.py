"""Resolve a model by bundled short name, tiny test name, local directory or hub id.

``get_model`` always returns a :class:`~rcc_compression.models.base.ModelWrapper`; the model type
(``clip``, ``siglip``, ``blip``, ``blip_vqa``, ``llava``) is read from the Hugging Face config when not given.
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
from .llava import LlavaWrapper
from .siglip import SigLIPWrapper
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


#: model type -> the ``transformers`` class it loads as, and the wrapper around it
FAMILIES: dict[str, tuple[str, type[ModelWrapper]]] = {
    "clip": ("CLIPModel", CLIPWrapper),
    "siglip": ("SiglipModel", SigLIPWrapper),
    "blip": ("BlipForConditionalGeneration", BLIPWrapper),
    "blip_vqa": ("BlipForQuestionAnswering", BLIPWrapper),
    "llava": ("LlavaForConditionalGeneration", LlavaWrapper),
}


def detect_model_type(config: Any) -> str:
    """``clip``, ``siglip``, ``blip``, ``blip_vqa`` or ``llava`` from a Hugging Face config object or dict."""
    d = config if isinstance(config, dict) else config.to_dict()
    mtype = d.get("model_type", "")
    archs = d.get("architectures") or []
    if mtype in ("clip", "siglip", "llava"):
        return mtype
    if mtype == "blip":
        return "blip_vqa" if any("QuestionAnswering" in a for a in archs) else "blip"
    raise ModelLoadError(f"unsupported model type {mtype!r} (architectures {archs}); supported: "
                         f"{', '.join(FAMILIES)}")


def wrapper_class(model: nn.Module) -> type[ModelWrapper] | None:
    """The wrapper class for a ``transformers`` model (by its config's model type), or ``None``."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(str(mtype)) if mtype else None
    return family[1] if family else None


#: targets for any model that is not one of the families: every Linear but the usual output heads
GENERIC_IGNORE = (r"(^|\.)(lm_head|head|classifier|visual_projection|text_projection|output_projection)$",)


def default_patterns(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Default (targets, ignore) regexes of a model: its family's encoder and decoder Linear layers.

    A model of no known family gets every Linear but the usual output heads.
    """
    cls = wrapper_class(unwrap_model(model))
    if cls is None:
        return (r".",), GENERIC_IGNORE
    return cls.default_targets, cls.default_ignore


def _model_class(model_type: str) -> Any:
    import transformers

    if model_type not in FAMILIES:
        raise ModelLoadError(f"unknown model type {model_type!r}; allowed: {', '.join(FAMILIES)}")
    return getattr(transformers, FAMILIES[model_type][0])


def wrap_model(model: nn.Module, image_processor: Any = None, tokenizer: Any = None, name: str = "") -> ModelWrapper:
    """Wrap a ``transformers`` CLIP, SigLIP, BLIP or LLaVA model (or return a wrapper unchanged)."""
    if isinstance(model, ModelWrapper):
        return model

    cls_name = type(model).__name__
    for class_name, wrapper in FAMILIES.values():
        if cls_name == class_name:
            return wrapper(model, image_processor, tokenizer, name)
    raise ModelLoadError(f"cannot wrap {cls_name}: supported are "
                         f"{', '.join(dict.fromkeys(c for c, _ in FAMILIES.values()))} "
                         "(any nn.Module can still be compressed directly)")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain ``nn.Module`` inside a wrapper (or the module itself)."""
    return model.model if isinstance(model, ModelWrapper) else model


def load_processors(path: str | os.PathLike[str], model_type: str) -> tuple[Any, Any]:
    """``(image processor, tokenizer)`` of a model directory (``None`` for any it does not hold); no weights read."""
    return _load_processors(str(path), model_type)


def _load_processors(path: str, model_type: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tok = img = None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        tok = None
    try:
        img = image_processor_class(_processor_kind(path, model_type)).from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        img = None
    return img, tok


def _processor_kind(path: str, model_type: str) -> str:
    """The image processor a model directory names (``preprocessor_config.json``), else its family's."""
    try:
        from transformers.utils import cached_file

        found = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        named = json.loads(Path(found).read_text()).get("image_processor_type") if found else None
    except (OSError, ValueError):
        named = None
    if isinstance(named, str) and named:
        return named
    return {"clip": "clip", "siglip": "siglip", "llava": "clip"}.get(model_type, "blip")


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
    type: str | None = None,  # noqa: A002 - the config's key name (model.type)
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

