"""What the server runs: a loaded model, the tasks it offers, and the batched calls behind them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..compression.export import Deployable, load_deployable
from ..compression.layers import compressed_layers, held_tensor_bytes
from ..evaluation.efficiency import kernel_mix, optimize_execution

TASKS = {
    "clip": ("embed_image", "embed_text"),
    "blip": ("caption",),
    "blip_vqa": ("vqa",),
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


def load_models(sources: list[str], key: bytes | None = None, choose_kernels: bool = True,
                kernel_batch: int = 8) -> list[ServedModel]:
    """Load every ``DIR``, bundled name or ``NAME=DIR`` and (for compressed ones) choose its kernels."""
    out = []
    for spec in sources:
        name, sep, src = spec.partition("=")
        if not sep or not name or "/" in name:
            name, src = None, spec
        served = ServedModel(load_deployable(src, key=key, name=name))
        if choose_kernels:
            served.choose_kernels(kernel_batch)
        out.append(served)
    return out
