"""Calibration: streaming per-layer input statistics and model outputs over batches.

A batch is a dict of keyword arguments for ``model(**batch)``, so any ``nn.Module`` works. Forward
hooks accumulate, per target layer, the count of input vectors, the per-channel sums of squares
and of absolute values (for wanda and asvd) and, when asked, the input second moment ``X^T X``
(for activation-aware SVD and AlphaEdit). Memory is bounded by one ``n x n`` matrix per layer,
whatever the number of batches.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerStats:
    """Accumulated statistics of one layer's inputs (``n`` input channels)."""

    count: int
    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    gram: torch.Tensor | None = None

    @property
    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel (wanda)."""
        return self.sum_sq.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean ``|x_j|`` per input channel (asvd)."""
        return self.sum_abs / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``X^T X / N`` (needs ``gram``)."""
        if self.gram is None:
            raise ValueError("second moment not collected (gram=False)")
        return self.gram / max(self.count, 1)


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Mapping[str, Any]],
    gram: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, LayerStats]:
    """Stream the inputs of ``layer_names`` over ``batches`` into :class:`LayerStats`.

    Sums accumulate in float64 on the CPU and float32 on accelerators. Layers that read the same
    input tensor (CLIP's q/k/v projections) share one set of statistics.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    stats: dict[str, LayerStats] = {}
    seen: dict[tuple[int, tuple[int, ...]], tuple[LayerStats, Any]] = {}  # inputs counted in this batch
    handles = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x_in = args[0]
            key = (x_in.data_ptr(), tuple(x_in.shape))
            entry = seen.get(key)
            # a weak reference tells a sibling reading the very same tensor from a new tensor at a reused address
            shared = entry[0] if entry is not None and entry[1]() is x_in else None
            st = stats.get(name)
            if shared is not None and (st is None or st is shared):
                stats[name] = shared  # same input as a sibling (q/k/v): one set of statistics
                return
            x = x_in.detach().reshape(-1, x_in.shape[-1]).to(acc_dtype)
            if st is None:
                n = x.shape[1]
                st = stats[name] = LayerStats(
                    0, x.new_zeros(n), x.new_zeros(n), x.new_zeros(n, n) if gram else None
                )
            st.count += x.shape[0]
            st.sum_sq += (x * x).sum(0)
            st.sum_abs += x.abs().sum(0)
            if st.gram is not None:
                st.gram.addmm_(x.t(), x)
            seen[key] = (st, weakref.ref(x_in))

        return hook

    for name in layer_names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            seen.clear()
            model(**to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layer_names if n not in stats]
    if missing:
        raise RuntimeError(f"calibration batches never reached layers {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return stats


def flatten_outputs(out: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The floating-point tensors of a model output (``ModelOutput``, tuple, dict or tensor) by key."""
    flat: dict[str, torch.Tensor] = {}
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() and out.dim() > 0:
            flat[prefix or "output"] = out
        return flat
    if isinstance(out, Mapping) or hasattr(out, "items"):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        return flat
    for key, value in items:
        if key == "loss":
            continue
        flat.update(flatten_outputs(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@torch.no_grad()
def run_outputs(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str | None = None
                ) -> list[dict[str, torch.Tensor]]:
    """Outputs of ``model`` on each batch, flattened, detached."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return [{k: v.detach() for k, v in flatten_outputs(model(**to_device(b, device))).items()} for b in batches]
    finally:
        model.train(was_training)


#: outputs the gate compares when a model has them (CLIP's embeddings, a decoder's logits);
#: hidden states are means to these ends, not what a user of the model sees
PRIMARY_OUTPUTS = ("image_embeds", "text_embeds", "logits")


def output_agreement(student: Sequence[Mapping[str, torch.Tensor]], teacher: Sequence[Mapping[str, torch.Tensor]]
                     ) -> float:
    """Mean per-sample cosine similarity between compressed and dense outputs (1.0 = identical).

    Compares the model's primary outputs (:data:`PRIMARY_OUTPUTS`) when it has them, else every
    floating output both share, each counting equally; each sample is a row of the output's first
    dimension. This is the validation gate's label-free default metric.
    """
    scores = []
    for s_out, t_out in zip(student, teacher, strict=True):
        primary = [k for k in PRIMARY_OUTPUTS if k in t_out]
        for key in primary or list(t_out):
            t = t_out[key]
            s = s_out.get(key)
            if s is None or s.shape != t.shape:
                continue
            t2 = t.reshape(t.shape[0], -1).float()
            s2 = s.reshape(s.shape[0], -1).float().to(t2.device)
            cos = F.cosine_similarity(s2, t2, dim=1, eps=1e-12)
            both_zero = (t2.abs().sum(1) == 0) & (s2.abs().sum(1) == 0)
            scores.append(torch.where(both_zero, torch.ones_like(cos), cos).mean())
    if not scores:
        raise ValueError("no comparable floating outputs between the compressed and the dense model")
    return float(torch.stack(scores).mean())


def relative_output_error(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean over shared outputs of ``||s - t||^2 / ||t||^2`` (a differentiable distillation loss)."""
    losses = []
    for key, t in teacher.items():
        s = student.get(key)
        if s is None or s.shape != t.shape:
            continue
        t = t.to(s.device, s.dtype)
        losses.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    if not losses:
        raise ValueError("no comparable floating outputs between the student and the teacher")
    return torch.stack(losses).mean()
