"""What a run records about its dense and compressed models, for figures drawn later without the models.

:func:`record_model_views` writes ``figures/views.safetensors`` and ``figures/views.json`` into a run
directory: per compressed layer the singular values of the dense weight and histograms of the
dense and compressed weights (on shared bin edges), and the head-averaged attention of the
dense and compressed vision encoders on one image. Plots (``visualization``) then read these
records; they never need the models back. The maths is in the pure functions below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.layers import compressed_layers
from ..utils.io import atomic_save_safetensors, atomic_write_json

VIEWS_DIR = "figures"
VIEWS_TENSORS = "views.safetensors"
VIEWS_META = "views.json"
HIST_BINS = 81


@torch.no_grad()
def singular_values(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Singular values (descending, float32) of each weight; layers of one shape share one batched call."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for names in by_shape.values():
        stack = torch.stack([weights[n].detach().float().cpu() for n in names])
        svals = torch.linalg.svdvals(stack)
        out.update({n: svals[i].contiguous() for i, n in enumerate(names)})
    return out


@torch.no_grad()
def weight_histograms(dense: Mapping[str, torch.Tensor], compressed: Mapping[str, torch.Tensor],
                      bins: int = HIST_BINS) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: ``edges`` (symmetric around 0, spanning both weights) and the ``dense``/``compressed`` counts.

    An odd number of bins puts one bin centred on 0, where pruned entries land.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, d in dense.items():
        d = d.detach().float().cpu()
        c = compressed[name].detach().float().cpu()
        lim = float(torch.maximum(d.abs().max(), c.abs().max())) or 1.0
        edges = torch.linspace(-lim, lim, bins + 1)
        out[name] = {"edges": edges, "dense": torch.histc(d, bins, -lim, lim),
                     "compressed": torch.histc(c, bins, -lim, lim)}
    return out


@torch.no_grad()
def vision_attention(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor | None:
    """Head-averaged self-attention of a CLIP/BLIP vision encoder on one image: ``[layers, T, T]``.

    Runs with eager attention (the only kind that returns its weights) and puts the model's
    attention implementation and train/eval mode back. ``None`` for a model without ``vision_model``.
    """
    vision = getattr(model, "vision_model", None)
    if vision is None:
        return None
    prev = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    switch = prev not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        out = vision(pixel_values=pixel_values[:1], output_attentions=True)
    finally:
        if switch:
            model.set_attn_implementation(prev)
        model.train(was_training)
    if not getattr(out, "attentions", None):
        return None
    return torch.stack([a[0].float().mean(0).cpu() for a in out.attentions])


def display_image(pixel_values: torch.Tensor, mean: Any = None, std: Any = None) -> torch.Tensor:
    """A normalised image ``[3, H, W]`` back to ``[H, W, 3]`` in [0, 1] (with the processor's mean/std if known)."""
    img = pixel_values.detach().float().cpu()
    if mean is not None and std is not None:
        std_t = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
        img = img * std_t + torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    else:
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    return img.clamp(0, 1).permute(1, 2, 0).contiguous()


def record_model_views(
    run_dir: str | os.PathLike[str],
    dense_model: nn.Module,
    compressed_model: nn.Module,
    pixel_values: torch.Tensor | None = None,
    image_mean: Any = None,
    image_std: Any = None,
) -> Path:
    """Write the figure records of a compression (see the module docstring) into ``run_dir/figures``.

    ``dense_model`` and ``compressed_model`` are the bare models (not wrappers); the layers are the
    compressed layers of ``compressed_model``, matched by name in ``dense_model``.
    """
    layers = compressed_layers(compressed_model)
    dense_w: dict[str, torch.Tensor] = {}
    comp_w: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        ref = dense_model.get_submodule(name)
        dense_w[name] = ref.weight if isinstance(ref, nn.Linear) else ref.effective_weight()
        comp_w[name] = layer.effective_weight()
    tensors: dict[str, torch.Tensor] = {}
    for name, s in singular_values(dense_w).items():
        tensors[f"spectrum/{name}"] = s
    for name, h in weight_histograms(dense_w, comp_w).items():
        for k, v in h.items():
            tensors[f"hist/{k}/{name}"] = v.contiguous()
    meta: dict[str, Any] = {
        "format": "rcc-figure-views", "format_version": 1, "layers": list(layers),
        "ranks": {n: int(m.rank) for n, m in layers.items()},
        "shapes": {n: [m.out_features, m.in_features] for n, m in layers.items()},
        "spectrum_of": "dense weight", "hist_bins": HIST_BINS, "attention": None,
    }
    if pixel_values is not None:
        img = pixel_values[:1].to(next(compressed_model.parameters()).device)
        dense_attn = vision_attention(dense_model, img)
        comp_attn = vision_attention(compressed_model, img)
        if dense_attn is not None and comp_attn is not None:
            tensors["attention/dense"] = dense_attn.contiguous()
            tensors["attention/compressed"] = comp_attn.contiguous()
            tensors["image"] = display_image(pixel_values[0], image_mean, image_std)
            tokens = dense_attn.shape[-1]
            patches = tokens - 1
            grid = int(round(patches ** 0.5))
            meta["attention"] = {"layers": int(dense_attn.shape[0]), "tokens": tokens,
                                 "grid": grid if grid * grid == patches else None, "cls_index": 0,
                                 "heads": "mean", "image": "first image of the first held-out calibration batch"}
    out = Path(run_dir) / VIEWS_DIR
    atomic_save_safetensors(tensors, out / VIEWS_TENSORS)
    atomic_write_json(out / VIEWS_META, meta)
    return out
