"""Eval-mode execution of a compressed layer: per-token activation quantization and the kernels
:meth:`~.layers.CompressedLinear.set_execution` chooses from.

A kernel reads a layer only through its public parts (``weight``, ``lr_A``, ``lr_B``, ``quant``,
``a_in``, ``a_out``, ``bias``, ``base``, ``act_bits``, ``dtype``, ``device``) and says why it cannot
run one (:meth:`Kernel.refuse`) from the parts, dtype and device it was proven on; what it builds
(:meth:`Kernel.prepare`) is counted in the layer's held bytes.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .layers import CompressedLinear, QuantizedPart

# ------------------------------------------------------------------------------ activations
def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` (tokens x features) with one float32 scale per token (row).

    ``scale = max|x_t| / 127``, ``code = round(x / scale)`` (half to even), so ``code * scale``
    reproduces the largest entry of each row exactly.
    """
    amax = x.abs().amax(-1, keepdim=True).float()
    scale = amax.div_(127.0).clamp_(min=torch.finfo(torch.float32).tiny)
    # |x / scale| <= 127 up to one rounding of the division, so round() never reaches 128: no clamp needed
    q = torch.div(x, scale).round_().to(torch.int8)
    return q, scale


def fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to per-token int8 and back (what :func:`quantize_tokens` lets a GEMM see)."""
    q, scale = quantize_tokens(x)
    return (q.float() * scale).to(x.dtype)


def state_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a kernel state (nested dicts, tuples, lists and modules)."""
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.sparse_csr:
            yield from (obj.values(), obj.col_indices(), obj.crow_indices())
        elif obj.layout == torch.strided:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()


# ------------------------------------------------------------------------------ kernels
class Kernel:
    """An eval-mode execution of a layer: ``refuse`` says why not, ``prepare`` builds what it holds
    (counted in :meth:`CompressedLinear.held_bytes`), ``run`` computes the layer's output."""

    name = "kernel"

    def refuse(self, layer: CompressedLinear) -> str | None:
        raise NotImplementedError

    def prepare(self, layer: CompressedLinear) -> Any:
        raise NotImplementedError

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _finish(layer: CompressedLinear, y: torch.Tensor) -> torch.Tensor:
    if layer.a_out is not None:
        y = y * layer.a_out
    if layer.bias is not None:
        y = y + layer.bias
    return y


def _low_rank_float(layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    """``B A x`` with the factors read (decoded per call in the inference form)."""
    return F.linear(F.linear(x, layer.lr_A), layer.lr_B)


class _Merged(Kernel):
    """One cached matrix ``base + S + B A`` (with the scales folded in when the input is not quantized)."""

    name = "merged"

    def refuse(self, layer: CompressedLinear) -> str | None:
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        if layer.act_bits is None:
            return {"weight": layer.effective_weight().contiguous()}
        return {"weight": layer.inner_weight().contiguous()}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.act_bits is None:
            return F.linear(x, state["weight"], layer.bias)
        if layer.a_in is not None:
            x = x * layer.a_in
        return _finish(layer, F.linear(fake_quant_tokens(x), state["weight"]))


def _symmetric_rows(q: QuantizedPart | None) -> bool:
    return q is not None and q.symmetric and q.groups == 1


class _W8A8(Kernel):
    """int8 codes x per-token int8 activations, int32 accumulation (``torch._int_mm``), then both scales.

    S (dense, symmetric per-row codes of 8 bits or fewer) and factor ``A`` (same condition) run as
    integer GEMMs on the one quantized input; ``B`` acts on ``A``'s float output. The result equals
    the ``factored`` path on fake-quantized inputs up to float rounding of the accumulation.
    """

    name = "w8a8"

    def refuse(self, layer: CompressedLinear) -> str | None:
        if layer.act_bits != 8:
            return "the layer's activations are not quantized (act_bits is not 8)"
        if not hasattr(torch, "_int_mm"):
            return "this torch has no _int_mm"
        if layer.base is not None:
            return "a delta layer's float base has no int8 form"
        if layer.has_sparse and not (_symmetric_rows(layer.quant.get("weight")) and layer.mask_bits is None):
            return "S is not dense symmetric per-row codes"
        if layer.rank and not _symmetric_rows(layer.quant.get("lr_A")):
            return "factor A is not symmetric per-row codes"
        if not (layer.has_sparse or layer.rank):
            return "no weight to multiply"
        if layer.device.type == "cuda" and (layer.in_features % 8 or layer.out_features % 8):
            return "CUDA int8 GEMMs need in and out features divisible by 8"
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        state: dict[str, Any] = {}
        a_out = layer.a_out.detach().float() if layer.a_out is not None else None
        for part in ("weight", "lr_A"):
            q = layer.quant.get(part)
            if q is not None and (part == "weight" or layer.rank):
                state[part] = q.int8_codes().t()  # K x N, a transposed view: the layout oneDNN reads fastest
                scale = q.scale[:, 0].float()
                # S's scales carry a_out too (one multiply fewer per output); the factors' output takes it apart
                state[part + "_scale"] = scale * a_out if (part == "weight" and a_out is not None) else scale
        if layer.bias is not None and layer.dtype != torch.float32:
            state["bias"] = layer.bias.detach().float()
        return state

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // x.shape[-1]
        xq, xs = _shared_tokens(x, layer.a_in)
        bias = state.get("bias", layer.bias)
        y = None
        if "weight" in state:
            y = torch._int_mm(xq, state["weight"]).to(torch.float32).mul_(xs).mul_(state["weight_scale"])
            if bias is not None:
                y = y.add_(bias)
        if "lr_A" in state:
            z = torch._int_mm(xq, state["lr_A"]).to(torch.float32).mul_(xs).mul_(state["lr_A_scale"])
            z = F.linear(z.to(layer.dtype), layer.lr_B).float()
            if layer.a_out is not None:
                z = z.mul_(layer.a_out.float())
            if y is None:
                y = z.add_(bias) if bias is not None else z
            else:
                y = y.add_(z)
        return y[:rows].to(layer.dtype).reshape(*lead, layer.out_features)


_LAST_TOKENS = threading.local()


def _shared_tokens(x: torch.Tensor, a_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_tokens` of ``x * a_in`` (2-D), reusing the last result when a sibling layer reads the very
    same input tensor, unchanged and unscaled (CLIP's q, k and v projections): one quantization for three GEMMs.
    Tensors made under ``torch.inference_mode`` carry no version counter, so an in-place change could not be
    seen: they are quantized every time."""
    shareable = a_in is None and not x.is_inference()
    if shareable:
        last = getattr(_LAST_TOKENS, "entry", None)
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2], last[3]
    x2 = (x if a_in is None else x * a_in).reshape(-1, x.shape[-1])
    if x.device.type == "cuda" and x2.shape[0] <= 16:  # cuBLASLt's int8 GEMM wants more than 16 rows
        x2 = torch.cat([x2, x2.new_zeros(17 - x2.shape[0], x2.shape[1])])
    xq, xs = quantize_tokens(x2)
    if shareable:
        _LAST_TOKENS.entry = (weakref.ref(x), x._version, xq, xs)
    return xq, xs


class _CSR(Kernel):
    """A sparse float S as a CSR matmul (CPU; float32 and float64, the dtypes MKL's sparse matmul has)."""

    name = "csr"

    def refuse(self, layer: CompressedLinear) -> str | None:
        if layer.device.type != "cpu":
            return "CSR matmul is used on the CPU only"
        if layer.dtype not in (torch.float32, torch.float64):
            return f"no CSR matmul for {layer.dtype} on the CPU"
        if not layer.has_sparse or layer.mask_bits is None or "weight" in layer.quant or layer.base is not None:
            return "S is not a sparse float matrix"
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return {"csr": layer.sparse_part().detach().to_sparse_csr()}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.a_in is not None:
            x = x * layer.a_in
        x = layer.quantize_input(x)
        y = torch.sparse.mm(state["csr"], x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        if layer.rank:
            y = y + _low_rank_float(layer, x)
        return _finish(layer, y)


def _weight_only_refusal(layer: CompressedLinear, q: QuantizedPart | None) -> str | None:
    if layer.act_bits is not None:
        return "the layer's activations are quantized (a weight-only kernel would not quantize them)"
    if q is None or layer.mask_bits is not None or layer.base is not None:
        return "S is not dense integer codes"
    return None


class _Int8Weight(Kernel):
    """8-bit symmetric per-row codes of S through ``aten._weight_int8pack_mm`` (float activations).

    Proven here on float32 for every shape and on bfloat16/float16 where ``in_features`` is a
    multiple of 16 (other widths give non-finite outputs or crash the process on torch 2.13's CPU
    kernel).
    """

    name = "int8_weight"

    def refuse(self, layer: CompressedLinear) -> str | None:
        q = layer.quant.get("weight")
        why = _weight_only_refusal(layer, q)
        if why:
            return why
        if not (q.bits == 8 and _symmetric_rows(q)):
            return "S is not 8-bit symmetric per-row codes"
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "this torch has no _weight_int8pack_mm"
        if layer.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"no int8 weight kernel for {layer.dtype}"
        if layer.dtype != torch.float32 and layer.in_features % 16:
            return "the half-precision int8 weight kernel needs in_features divisible by 16"
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        q = layer.quant["weight"]
        return {"codes": q.int8_codes().contiguous(), "scale": q.scale[:, 0].to(layer.dtype).contiguous()}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.a_in is not None:
            x = x * layer.a_in
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), state["codes"],
                                               state["scale"]).reshape(*lead, layer.out_features)
        if layer.rank:
            y = y + _low_rank_float(layer, x)
        return _finish(layer, y)


class _Int4Weight(Kernel):
    """4-bit grouped codes of S through ``aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations).

    The kernel computes ``(code - 8) * s + z`` per group; this layer's ``s * (code - zero)`` is the
    same with ``z = s * (8 - zero)``, so the codes are used as stored.
    """

    name = "int4_weight"

    def refuse(self, layer: CompressedLinear) -> str | None:
        q = layer.quant.get("weight")
        why = _weight_only_refusal(layer, q)
        if why:
            return why
        if q.bits != 4 or q.group_size not in (32, 64, 128, 256) or layer.in_features % q.group_size:
            return "S is not 4-bit codes in groups of 32-256 columns"
        if layer.device.type != "cpu" or layer.dtype != torch.bfloat16:
            return "the int4 CPU kernel runs bfloat16 activations on the CPU"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no _weight_int4pack_mm_for_cpu"
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        q = layer.quant["weight"]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.grid_codes().to(torch.int32).contiguous(), 1)
        s = q.scale.float()
        z = s * (8.0 - q.zero_points())
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # groups x out x 2
        return {"packed": packed, "scales_and_zeros": sz, "group": q.group_size}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.a_in is not None:
            x = x * layer.a_in
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), state["packed"],
                                                       state["group"], state["scales_and_zeros"])
        y = y.reshape(*lead, layer.out_features)
        if layer.rank:
            y = y + _low_rank_float(layer, x)
        return _finish(layer, y)


class _SemiStructured(Kernel):
    """A 2:4 sparse float S through ``to_sparse_semi_structured`` (CUDA)."""

    name = "semi_structured"

    def refuse(self, layer: CompressedLinear) -> str | None:
        if layer.device.type != "cuda":
            return "2:4 kernels run on CUDA"
        if not layer.has_sparse or layer.mask_bits is None or layer.base is not None:
            return "S is not sparse"
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        from torch.sparse import to_sparse_semi_structured

        return {"w": to_sparse_semi_structured(layer.sparse_part().detach().contiguous())}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.a_in is not None:
            x = x * layer.a_in
        x = layer.quantize_input(x)
        y = F.linear(x, state["w"])
        if layer.rank:
            y = y + _low_rank_float(layer, x)
        return _finish(layer, y)


class _TorchAO(Kernel):
    """torchao's CUDA weight-only kernels for a quantized dense S (the ``gpu`` extra).

    torchao derives its own codes from the dequantized weight, so the result can differ from the
    stored codes by rounding; ``optimize_execution`` keeps it only where the outputs agree and it
    measures faster.
    """

    name = "torchao"

    def refuse(self, layer: CompressedLinear) -> str | None:
        q = layer.quant.get("weight")
        why = _weight_only_refusal(layer, q)
        if why:
            return why
        if layer.device.type != "cuda" or layer.rank or q.bits not in (4, 8):
            return "torchao's kernels run 4- or 8-bit dense S without factors on CUDA"
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        q = layer.quant["weight"]
        lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.device, dtype=layer.dtype)
        lin.weight.data.copy_(layer.sparse_part())
        lin.requires_grad_(False)
        quantize_(lin, Int8WeightOnlyConfig() if q.bits == 8 else Int4WeightOnlyConfig(group_size=q.group_size))
        return {"linear": lin}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.a_in is not None:
            x = x * layer.a_in
        return _finish(layer, state["linear"](x))


class _Factored(Kernel):
    """Every part as its own matmul (decoded per call in the inference form): the layer's own forward."""

    name = "factored"

    def refuse(self, layer: CompressedLinear) -> str | None:
        return None

    def prepare(self, layer: CompressedLinear) -> Any:
        return {}

    def run(self, layer: CompressedLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        return layer.forward_factored(x)


#: execution kernels by name
KERNELS: dict[str, Kernel] = {k.name: k for k in (_Factored(), _Merged(), _W8A8(), _CSR(), _Int8Weight(),
                                                  _Int4Weight(), _SemiStructured(), _TorchAO())}
EXECUTION_MODES = tuple(KERNELS)
