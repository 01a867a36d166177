"""The model wrapper interface shared by CLIP, SigLIP, BLIP and LLaVA (docs/guides/compress-your-model.md)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelWrapper(nn.Module):
    """A Hugging Face vision-language model with its image processor and tokenizer.

    The wrapped model is ``self.model`` (a plain ``transformers`` class, so anything that works on
    it works here); the wrapper adds the encode/similarity/caption conveniences, turns PIL images
    and strings into tensors, and knows which layers compression should target by default.
    """

    model_type: str = "generic"
    #: what the model does, as the evaluation suite and the server name it (zero_shot, retrieval,
    #: embed, captioning, vqa)
    tasks: frozenset[str] = frozenset()
    #: whether calibration must be image-text pairs (noise or text alone refused unless asked for)
    paired_calibration: bool = False
    #: regexes (``re.search`` on module names of ``self.model``) compression targets by default
    default_targets: tuple[str, ...] = ()
    #: regexes compression leaves alone by default
    default_ignore: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, image_processor: Any = None, tokenizer: Any = None, name: str = "") -> None:
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        # the wrapper's own flag follows the model's: code that saves ``wrapper.training`` and later
        # calls ``wrapper.train(saved)`` must not turn an eval-mode model into a training one
        self.training = model.training

    # ------------------------------------------------------------------ generic helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, **inputs: Any) -> Any:
        """Unified forward pass: keyword inputs go straight to the wrapped model."""
        return self.model(**inputs)

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that currently require gradients."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def freeze_layers(self, layer_names: Sequence[str] | str) -> list[str]:
        """Freeze every parameter whose name matches one of the regexes; return the frozen names."""
        patterns = [layer_names] if isinstance(layer_names, str) else list(layer_names)
        compiled = [re.compile(p) for p in patterns]
        frozen = []
        for name, param in self.model.named_parameters():
            if any(c.search(name) for c in compiled):
                param.requires_grad_(False)
                frozen.append(name)
        return frozen

    def unfreeze_all(self) -> None:
        """Make every parameter trainable again."""
        for param in self.model.parameters():
            param.requires_grad_(True)

    # ------------------------------------------------------------------ inputs
    def prepare_images(self, images: Any) -> torch.Tensor:
        """Pixel values on the model's device from PIL images, arrays, or an already-made tensor."""
        if isinstance(images, torch.Tensor):
            return images.to(self.device, self.dtype)
        if self.image_processor is None:
            raise ValueError(f"{type(self).__name__} has no image processor; pass pixel_values tensors")
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def prepare_text(self, text: Any, attention_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(input_ids, attention_mask)`` on the model's device from token-id tensors or strings."""
        if isinstance(text, torch.Tensor):
            return text.to(self.device), attention_mask.to(self.device) if attention_mask is not None else None
        enc = self.tokenize(text)
        return enc["input_ids"], enc.get("attention_mask")

    def tokenize(self, texts: str | Iterable[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Token ids and attention mask on the model's device for one or more strings."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer; pass input_ids tensors")
        if isinstance(texts, str):
            texts = [texts]
        limit = max_length or self.max_text_length
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @property
    def max_text_length(self) -> int:
        text_cfg = getattr(self.model.config, "text_config", None)
        return int(getattr(text_cfg, "max_position_embeddings", 77) or 77)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def synthetic_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A batch of random inputs shaped for this model (calibration without data)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save model (safetensors), tokenizer and image processor in Hugging Face layout."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.save_processors(path)

    def save_processors(self, path: str | os.PathLike[str]) -> None:
        """Save only the tokenizer and image processor (used next to compressed checkpoints)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)


def image_processor_class(kind: str) -> Any:
    """``CLIPImageProcessor``, ``SiglipImageProcessor`` or ``BlipImageProcessor`` (``kind``: clip, siglip,
    blip, or a class name); their PIL versions when torchvision is absent.

    transformers 5 falls back to the PIL versions itself, with a warning on every load; asking
    for them directly keeps stderr clean. Older transformers have only the plain classes.
    """
    import transformers

    name = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor", "blip": "BlipImageProcessor"}.get(
        kind, kind.removesuffix("Pil"))
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    if not hasattr(transformers, name):
        raise ValueError(f"unknown image processor {kind!r}")
    return getattr(transformers, name)
