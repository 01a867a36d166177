"""What the server runs: a loaded model, the tasks it offers, and the batched calls behind them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..compression.export import Deployable, load_deployable
from ..compression.layers import compressed_layers, held_tensor_bytes
from ..errors import ConfigError
from ..evaluation.efficiency import kernel_mix, optimize_execution
from ..models.registry import BUNDLED
from ..models.tiny import RANDOM_MODELS, TINY_MODELS

TASKS = {
    "clip": ("embed_image", "embed_text"),
    "siglip": ("embed_image", "embed_text"),
    "blip": ("caption",),
    "blip_vqa": ("vqa",),
    "llava": ("caption", "vqa"),
}


@dataclass
class ServedModel:
    """A deployable model with its task list; ``run`` computes one batch (called on the batcher's thread)."""

    deployable: Deployable
    kernels: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.deployable.name

    @property
    def wrapper(self) -> Any:
        return self.deployable.wrapper

    @property
    def kind(self) -> str:
        w = self.wrapper
        return "blip_vqa" if getattr(w, "is_vqa", False) else w.model_type

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS.get(self.kind, ())

    def memory_bytes(self) -> int:
        """Bytes the model's tensors hold in memory: parameters, buffers and the inference kernels' copies."""
        return held_tensor_bytes(self.wrapper.model)

    def describe(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.wrapper.model.parameters())
        return {"name": self.name, "type": self.kind, "tasks": list(self.tasks), "source_kind": self.deployable.kind,
                "compressed_layers": len(compressed_layers(self.wrapper.model)), "kernels": self.kernels,
                "parameters": n_params, "memory_bytes": self.memory_bytes()}

    def choose_kernels(self, batch_size: int = 8) -> dict[str, int]:
        """Give each compressed layer its fastest measured inference kernel (no-op for a dense model)."""
        if not compressed_layers(self.wrapper.model):
            return {}

        batch = self.wrapper.synthetic_batch(batch_size, torch.Generator().manual_seed(0))
        self.kernels = kernel_mix(optimize_execution(self.wrapper.model, batch))
        return self.kernels

    @torch.inference_mode()
    def run(self, key: Hashable, items: list[Any]) -> list[Any]:
        """One batch: ``key`` is ``(task, *params)``; items are PIL images, texts or (image, question)."""
        task, *params = key  # type: ignore[misc]
        w = self.wrapper
        if task == "embed_image":
            return list(F.normalize(w.encode_image(items, normalize=False).float(), dim=-1).cpu().numpy())
        if task == "embed_text":
            return list(F.normalize(w.encode_text(list(items), normalize=False).float(), dim=-1).cpu().numpy())
        if task == "caption":
            max_length, num_beams, prompt = params
            return w.generate_caption(items, num_beams=num_beams, max_length=max_length, prompt=prompt or None)
        if task == "vqa":
            max_length, num_beams = params
            images, questions = zip(*items, strict=True)
            return w.answer(list(images), list(questions), max_length=max_length, num_beams=num_beams)
        raise ValueError(f"unknown task {task!r}")


def parse_source(spec: str) -> tuple[str, str]:
    """(served name, source) of ``DIR``, a bundled name or ``NAME=DIR``, named as :func:`load_deployable` names it."""
    name, sep, src = spec.partition("=")
    if not sep or not name or "/" in name:
        name, src = "", spec
    if not name:
        local = src in BUNDLED or src in TINY_MODELS or src in RANDOM_MODELS
        name = src if local else Path(src).resolve().name
    return name, src


def check_sources(sources: list[str], allow_download: bool = False) -> list[tuple[str, str]]:
    """Every source's (name, source), checked before anything loads: served names differ, and without
    ``allow_download`` each source is a bundled/tiny name or an existing local path (no hub lookup)."""
    parsed = [parse_source(s) for s in sources]
    names = [n for n, _ in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"served model names must differ: {', '.join(dupes)} given more than once; name them "
                          "with NAME=DIR")
    if not allow_download:
        for _, src in parsed:
            known = src in BUNDLED or src in TINY_MODELS or src in RANDOM_MODELS
            if not known and not Path(src).exists():
                raise ConfigError(f"{src}: not a bundled model name ({', '.join(sorted(BUNDLED))}), a tiny test model "
                                  "or a local path; rcc serve does not download models unless asked "
                                  "(--allow-download)")
    return parsed


def load_models(sources: list[str], key: bytes | None = None, choose_kernels: bool = True,
                kernel_batch: int = 8, allow_download: bool = True) -> list[ServedModel]:
    """Load every ``DIR``, bundled name or ``NAME=DIR`` and (for compressed ones) choose its kernels.

    Names must differ; ``allow_download=False`` refuses a source that is neither bundled nor local
    (see :func:`check_sources`).
    """
    out = []
    for name, src in check_sources(sources, allow_download):
        served = ServedModel(load_deployable(src, key=key, name=name))
        if choose_kernels:
            served.choose_kernels(kernel_batch)
        out.append(served)
    return out
