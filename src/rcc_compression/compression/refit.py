"""Sequential refit of low-rank factors on the inputs the compressed model really produces.

Factorising every layer against the *dense* model's inputs (activation-aware SVD) minimises each
layer's own error, but the layers after it then see inputs that earlier compression already
changed. The refit walks the compressed layers in execution order and gives each the rank-``r``
low-rank part ``L`` that minimises the error of its output against the *dense* output, on the
inputs the *compressed* model feeds it (``X``: dense inputs, ``Y``: compressed inputs, ``F``: the
layer's fixed part, base plus sparse):

    min_L || X W^T - Y (F + L)^T ||_F^2,  rank(L) <= r

With ``C_xy = X^T Y``, ``C_yy = Y^T Y + lambda I = R R^T`` and ``G = W C_xy - F C_yy`` the
objective is ``|| L R - G R^-T ||^2`` plus a constant, so ``L R`` is the rank-``r`` truncation of
``G R^-T`` (Eckart-Young) and ``L = trunc(G R^-T) R^-1``. With ``Y = X`` this is exactly
activation-aware SVD of ``W - F``; the refit only ever lowers the layer's error on the
calibration data. This is the error-propagation correction of sequential post-training
compression (GPTQ's and SparseGPT's layer-by-layer order; SVD-LLM v2 for low rank), applied to
the factors the ``nullu`` stage chose, at the ranks it chose.

Layers that read the same input (q/k/v) are refit together from one pair of statistics. Each
group costs one forward pass of both models over the calibration batches, stopped right after
the group's input is seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .calibration import to_device
from .layers import CompressedLinear
from .lowrank import balanced_factors, whitening


class _Stop(Exception):
    """Raised by a hook once the wanted input is captured: the rest of the forward pass is not needed."""


# ------------------------------------------------------------------------------ pure functions
def refit_low_rank(
    weight: torch.Tensor, fixed: torch.Tensor | None, c_xy: torch.Tensor, c_yy: torch.Tensor, rank: int,
    damping: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(B, A)`` minimising ``||X W^T - Y (F + B A)^T||`` (see the module docstring).

    ``c_xy = X^T Y`` and ``c_yy = Y^T Y`` are ``n x n``; ``fixed`` is ``F`` (``None``: zero).
    Computed in float64; the factors are returned in ``weight``'s dtype.
    """
    w = weight.double()
    cyy = c_yy.double()
    g = w @ c_xy.double()
    if fixed is not None:
        g = g - fixed.double() @ cyy
    R, R_inv = whitening(cyy, damping)
    M = g @ R_inv.t()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    B, A = balanced_factors(U, S, Vh, rank)
    return B.to(weight.dtype), (A @ R_inv).to(weight.dtype)


def layer_output_error(weight: torch.Tensor, effective: torch.Tensor, c_xx: torch.Tensor, c_xy: torch.Tensor,
                       c_yy: torch.Tensor) -> float:
    """``||X W^T - Y E^T||^2 / ||X W^T||^2`` from second moments (``E``: the compressed layer's weight)."""
    w, e = weight.double(), effective.double()
    ref = float((w @ c_xx.double() * w).sum())
    err = ref - 2 * float((w @ c_xy.double() * e).sum()) + float((e @ c_yy.double() * e).sum())
    return max(err, 0.0) / max(ref, 1e-300)


# ------------------------------------------------------------------------------ orchestration
def execution_groups(model: nn.Module, names: Sequence[str], batch: Mapping[str, Any],
                     device: torch.device) -> list[list[str]]:
    """``names`` in the order a forward pass first calls them, consecutive readers of one input grouped.

    Readers of one input are told by tensor identity, with the previous input held alive so that a
    new tensor cannot take its address.
    """
    calls: list[str] = []
    same: list[bool] = []
    last: list[torch.Tensor] = []
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name in calls:
                return
            same.append(bool(last) and args[0] is last[0])
            calls.append(name)
            last[:] = [args[0]]
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name, shared in zip(calls, same, strict=True):
        if shared:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


@torch.no_grad()
def _input_of(model: nn.Module, name: str, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """The (rows x n) input of layer ``name`` on ``batch``; the forward pass stops right after it."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(**to_device(batch, device))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"layer {name} was not called on a calibration batch")
    x = seen[0]
    # padding tokens stay in, as in the calibration statistics: dropping them was measured to fit worse
    return x.reshape(-1, x.shape[-1])


@dataclass
class PairedMoments:
    """Second moments of one input as the dense (``X``) and the compressed (``Y``) model produce it."""

    c_xx: torch.Tensor
    c_xy: torch.Tensor
    c_yy: torch.Tensor

    @cached_property
    def c_yy_pinv(self) -> torch.Tensor:
        """Pseudo-inverse of ``C_yy`` in float64, once for all layers reading this input."""
        return torch.linalg.pinv(self.c_yy.double(), hermitian=True)


@torch.no_grad()
def sequential_moments(
    model: nn.Module, dense_model: nn.Module, names: Sequence[str], batches: Sequence[Mapping[str, Any]],
    device: torch.device,
) -> Iterator[tuple[list[str], PairedMoments]]:
    """Yield ``(group, moments)`` for the groups of ``names`` in execution order.

    Each group's moments are taken when the caller asks for them, so a caller that updates a group's
    layers before asking for the next sees those updates in the later groups' inputs: the
    sequential order of GPTQ and SparseGPT. Both models are put in eval mode meanwhile.
    """
    acc = torch.float64 if device.type == "cpu" else torch.float32
    was = (model.training, dense_model.training)
    model.eval()
    dense_model.eval()
    try:
        for group in execution_groups(model, names, batches[0], device):
            n = model.get_submodule(group[0]).in_features
            mom = PairedMoments(*(torch.zeros(n, n, dtype=acc, device=device) for _ in range(3)))
            for batch in batches:
                x = _input_of(dense_model, group[0], batch, device).to(acc)
                y = _input_of(model, group[0], batch, device).to(acc)
                mom.c_xx.addmm_(x.t(), x)
                mom.c_xy.addmm_(x.t(), y)
                mom.c_yy.addmm_(y.t(), y)
            yield group, mom
    finally:
        model.train(was[0])
        dense_model.train(was[1])


@torch.no_grad()
def sequential_refit(
    model: nn.Module,
    dense_model: nn.Module,
    dense_weights: Mapping[str, torch.Tensor],
    layers: Mapping[str, CompressedLinear],
    batches: Sequence[Mapping[str, Any]],
    device: torch.device,
    damping: float = 1e-2,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Refit the low-rank part of every factorised layer in ``layers`` in execution order (in place).

    Returns, per refit layer, the relative output error on the compressed model's inputs before
    and after (``error_before``, ``error_after``). Layers with scales (``a_in``/``a_out``) or no
    low-rank part are left alone.
    """
    eligible = [n for n, m in layers.items() if m.rank > 0 and m.a_in is None and m.a_out is None]
    if not eligible or not batches:
        return {}
    report: dict[str, dict[str, float]] = {}
    for group, mom in sequential_moments(model, dense_model, eligible, batches, device):
        for name in group:
            layer = layers[name]
            w = dense_weights[name].to(device, torch.float32)
            fixed = layer.sparse_part().float() if layer.weight is not None else None
            if layer.base is not None:
                fixed = layer.base.float() if fixed is None else fixed + layer.base.float()
            before = layer_output_error(w, layer.effective_weight().float(), mom.c_xx, mom.c_xy, mom.c_yy)
            B, A = refit_low_rank(w, fixed, mom.c_xy, mom.c_yy, layer.rank, damping)
            old = (layer.lr_B.detach().clone(), layer.lr_A.detach().clone())
            layer.set_low_rank(B, A)
            after = layer_output_error(w, layer.effective_weight().float(), mom.c_xx, mom.c_xy, mom.c_yy)
            if not after <= before:  # damping can cost more than it saves on a well-fitted layer
                layer.set_low_rank(*old)
                after = before
            report[name] = {"error_before": before, "error_after": after}
        if progress is not None:
            progress("nullu refit", len(report), len(eligible))
    return report
