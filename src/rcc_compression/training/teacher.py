"""The frozen teacher: its outputs on a batch, computed once, from memory or from a disk cache.

The teacher never trains: its parameters do not require gradients and it runs in eval mode under
``torch.no_grad``. Its flattened outputs (plus CLIP's ``logit_scale``, which distillation across
ranks needs) come from, in order: outputs precomputed for indexed batches, the on-disk cache, or
a forward pass. The cache holds one safetensors file per *sample*, named by a hash of the
teacher's weights, the forward options and the sample's inputs, so reshuffled batches still hit
it, and a changed teacher or sample never reads a stale entry. CLIP's image-text similarity
matrices depend on the whole batch; they are rebuilt from the cached embeddings.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.calibration import flatten_outputs, to_device
from ..utils.io import atomic_save_safetensors, load_safetensors


def model_fingerprint(model: nn.Module) -> str:
    """Hex blake2b of every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.state_dict(keep_vars=False).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batch_fingerprint(batch: Mapping[str, Any]) -> str:
    """Hex blake2b of a batch's tensors and plain values, in key order."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(batch):
        v = batch[key]
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{key}|{v!r}|".encode())
    return h.hexdigest()


def model_extras(model: nn.Module) -> dict[str, torch.Tensor]:
    """Outputs a model does not return but distillation needs: CLIP's ``logit_scale`` (exp'd)."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        return {"logit_scale": scale.exp().reshape(1)}
    return {}


def _autocast_state() -> str:
    try:
        return ",".join(f"{d}:{torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None}"
                        for d in ("cpu", "cuda"))
    except (TypeError, AttributeError):  # torch < 2.4
        return str(torch.is_autocast_enabled())


class Teacher:
    """A frozen model whose flattened outputs are the distillation targets.

    ``precomputed``: outputs for batches known by position (the compression engine's calibration
    batches); ``cache_dir``: where outputs of other batches are kept between epochs and runs;
    ``forward_kwargs``: extra keyword arguments of every forward (``output_attentions=True``).
    """

    def __init__(self, model: nn.Module | None = None, *,
                 precomputed: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, forward_kwargs: Mapping[str, Any] | None = None,
                 device: torch.device | str | None = None) -> None:
        if model is None and precomputed is None:
            raise ValueError("a teacher needs a model or precomputed outputs")
        self.model = model
        self.precomputed = list(precomputed) if precomputed is not None else None
        self.forward_kwargs = dict(forward_kwargs or {})
        self.device = torch.device(device) if device is not None else (
            next(model.parameters()).device if model is not None else torch.device("cpu"))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.forward_calls = 0
        self.cache_hits = 0
        self._fingerprint: str | None = None
        if model is not None:
            model.eval()
            model.requires_grad_(False)

    @property
    def fingerprint(self) -> str:
        """What cache entries are keyed on besides the batch: weights, forward options, autocast."""
        if self._fingerprint is None:
            assert self.model is not None
            self._fingerprint = model_fingerprint(self.model)
        return f"{self._fingerprint}|{sorted(self.forward_kwargs.items())!r}|{_autocast_state()}"

    @torch.no_grad()
    def compute(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run the teacher on a batch (eval mode, no gradients)."""
        if self.model is None:
            raise ValueError("this teacher only has precomputed outputs and the batch has no index")
        self.model.eval()
        self.forward_calls += 1
        out = flatten_outputs(self.model(**to_device(batch, self.device), **self.forward_kwargs))
        out.update(model_extras(self.model))
        return {k: v.detach() for k, v in out.items()}

    def __call__(self, batch: Mapping[str, Any], index: int | None = None) -> dict[str, torch.Tensor]:
        """The teacher's outputs on ``batch`` (``index``: its position among precomputed batches)."""
        if self.precomputed is not None and index is not None:
            return self.precomputed[index]
        if self.cache_dir is None:
            return self.compute(batch)
        n = _batch_size(batch)
        prefix = self.fingerprint
        paths = []
        for i in range(n):
            key = hashlib.blake2b((prefix + batch_fingerprint(_row(batch, i, n))).encode(), digest_size=20).hexdigest()
            paths.append(self.cache_dir / key[:2] / f"{key}.safetensors")
        if all(p.is_file() for p in paths):
            self.cache_hits += 1
            return _assemble([load_safetensors(p, self.device) for p in paths])
        out = self.compute(batch)
        for i, path in enumerate(paths):
            if not path.is_file():
                atomic_save_safetensors(_split(out, i, n), path)
        return out


#: outputs that couple the samples of a batch (CLIP's similarity matrices): not cached, rebuilt on reading
_CROSS = ("logits_per_image", "logits_per_text")


def _batch_size(batch: Mapping[str, Any]) -> int:
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _row(batch: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    return {k: v[i] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in batch.items()}


def _split(out: Mapping[str, torch.Tensor], i: int, n: int) -> dict[str, torch.Tensor]:
    """Sample ``i``'s outputs (``s:`` keys) and the batch-wide ones (``g:``, e.g. ``logit_scale``)."""
    parts: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        if key in _CROSS:
            continue
        if value.dim() > 0 and value.shape[0] == n:
            parts[f"s:{key}"] = value[i:i + 1]
        else:
            parts[f"g:{key}"] = value
    return parts


def _assemble(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        kind, name = key.split(":", 1)
        out[name] = torch.cat([s[key] for s in samples]) if kind == "s" else samples[0][key]
    if {"image_embeds", "text_embeds", "logit_scale"} <= out.keys():
        per_image = out["logit_scale"].reshape(()) * out["image_embeds"] @ out["text_embeds"].t()
        out["logits_per_image"], out["logits_per_text"] = per_image, per_image.t()
    return out
