"""The one compressed layer: ``y = a_out * ((base + S + B A) (a_in * x)) + bias``.

``S`` is a sparse matrix kept as a dense tensor whose pruned entries are exactly zero (with its
``mask``, held packed at one bit per entry), ``B A`` a low-rank product, ``a_in``/``a_out``
per-channel scales and ``base`` a frozen reference weight (DARE on deltas). Every part is
optional; :meth:`merge` folds them back into a plain ``nn.Linear``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EXECUTION_MODES = ("factored", "merged", "csr", "semi_structured", "int8", "torchao")

#: the parts of a layer that can be stored as integer codes (S, and the low-rank factors)
QUANTIZABLE = ("weight", "lr_A", "lr_B")


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
#: set bits of every byte value
_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bytes, 8 entries per byte, most significant bit first, row-major, zero-padded.

    The result stays on the mask's device.
    """
    flat = mask.detach().reshape(-1).bool()
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))
    pad = (-flat.numel()) % 8
    planes = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (planes.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape`` on the packed bytes' device."""
    numel = math.prod(shape)
    flat = packed.reshape(-1)
    if flat.numel() != (numel + 7) // 8:
        raise ValueError(f"{flat.numel()} bytes hold {flat.numel() * 8} bits, {numel} expected")
    if flat.device.type == "cpu":
        bits = np.unpackbits(flat.to(torch.uint8).numpy(), count=numel)
        return torch.from_numpy(bits.view(np.bool_)).view(shape)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.unsqueeze(1) & weights).ne(0).reshape(-1)[:numel].view(shape)


def count_bits(packed: torch.Tensor) -> int:
    """Set bits in packed bytes (the kept entries of a packed mask)."""
    return int(_POPCOUNT.to(packed.device)[packed.reshape(-1).long()].sum())


@dataclass
class QuantizedPart:
    """Integer codes of one weight part: ``value = scale * (code - zero)`` per group of ``group_size`` columns.

    ``codes`` (uint8, the part's shape; entries outside a sparse mask are not stored), ``scale``
    (float16, rows x groups) and ``zero`` (uint8, rows x groups; ``None`` = symmetric, zero point
    ``2**(bits-1)``). Built by :mod:`.quant`; the layer's float parameter always holds
    :meth:`dequantize`, so every other part of the engine reads it as a plain tensor.
    """

    bits: int
    group_size: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    method: str = "nearest"
    info: dict = field(default_factory=dict)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def groups(self) -> int:
        return math.ceil(self.codes.shape[1] / self.group_size)

    def zero_points(self) -> torch.Tensor:
        """Zero points as float32 (rows x groups)."""
        if self.zero is None:
            return torch.full(self.scale.shape, float(2 ** (self.bits - 1)), device=self.scale.device)
        return self.zero.float()

    def dequantize(self, dtype: torch.dtype = torch.float32, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The float values the codes stand for (zero outside ``mask``)."""
        cols = self.codes.shape[1]
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)[:, :cols]
        zero = self.zero_points().repeat_interleave(self.group_size, dim=1)[:, :cols]
        values = (self.codes.float() - zero) * scale
        if mask is not None:
            values = values * mask
        return values.to(dtype)

    def spec(self) -> dict[str, object]:
        """The quantization format (for manifests and records)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "method": self.method}

    def apply(self, fn) -> QuantizedPart:  # noqa: ANN001 - a Module._apply function
        """Follow a device move of the module (dtype casts leave codes and float16 scales alone)."""
        codes = fn(self.codes)
        dev = codes.device
        return QuantizedPart(self.bits, self.group_size, codes, self.scale.to(dev),
                             None if self.zero is None else self.zero.to(dev), self.method, dict(self.info))

    def clone(self) -> QuantizedPart:
        return QuantizedPart(self.bits, self.group_size, self.codes.clone(), self.scale.clone(),
                             None if self.zero is None else self.zero.clone(), self.method, dict(self.info))


class CompressedLinear(nn.Module):
    """A Linear layer stored as sparse + low rank + channel scales (+ frozen base).

    Attributes are ``None`` when a part is absent: ``weight`` (the sparse or dense part S),
    ``mask`` (bool, None = S is dense; held packed at 1 bit per entry in ``mask_bits``),
    ``lr_A`` (r x in), ``lr_B`` (out x r), ``a_in`` (in), ``a_out`` (out), ``bias`` (out),
    ``base`` (out x in, frozen buffer).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = None
        self.lr_A: nn.Parameter | None = None
        self.lr_B: nn.Parameter | None = None
        self.a_in: nn.Parameter | None = None
        self.a_out: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        self.register_buffer("mask_bits", None)  # the mask packed by pack_bits
        self.register_buffer("base", None)
        self._mask_cache: torch.Tensor | None = None  # the unpacked mask while training (read every step)
        self._fast: tuple[str, Any] | None = None  # an inference kernel chosen by set_execution
        #: parts stored as integer codes (:mod:`.quant`); their float parameters hold the dequantized values
        self.quant: dict[str, QuantizedPart] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CompressedLinear:
        """An exact copy of ``linear`` (dense S, nothing else) to be compressed in place."""
        layer = cls(linear.in_features, linear.out_features)
        layer.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer.to(linear.weight.device)

    @property
    def _ref(self) -> torch.Tensor:
        for t in (self.weight, self.lr_B, self.base, self.bias, self.a_out):
            if t is not None:
                return t
        raise RuntimeError("CompressedLinear has no tensors")

    def set_sparse(self, values: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """Set S (pruned entries are zeroed here, so the invariant ``weight == weight * mask`` holds).

        New values replace any integer codes S had (quantize again with :mod:`.quant`).
        """
        self._fast = None
        self.quant.pop("weight", None)
        if values is None:
            self.weight = None
            self.mask = None
            return
        if mask is not None:
            mask = mask.to(device=values.device, dtype=torch.bool)
            values = values * mask
        self.weight = nn.Parameter(_dense_copy(values, self._ref.dtype))
        self.mask = mask

    def set_low_rank(self, B: torch.Tensor | None, A: torch.Tensor | None) -> None:
        """Set the low-rank factors (``B``: out x r, ``A``: r x in), or remove them with ``None``."""
        self._fast = None
        self.quant.pop("lr_A", None)
        self.quant.pop("lr_B", None)
        if B is None or A is None or B.shape[1] == 0:
            self.lr_B = self.lr_A = None
            return
        dtype = self._ref.dtype
        self.lr_B = nn.Parameter(_dense_copy(B, dtype))
        self.lr_A = nn.Parameter(_dense_copy(A, dtype))

    def set_scales(self, a_in: torch.Tensor | None, a_out: torch.Tensor | None) -> None:
        """Set the per-channel scales (``None`` removes one)."""
        dtype = self._ref.dtype
        self.a_in = None if a_in is None else nn.Parameter(_dense_copy(a_in, dtype))
        self.a_out = None if a_out is None else nn.Parameter(_dense_copy(a_out, dtype))

    def set_base(self, base: torch.Tensor | None) -> None:
        """Set the frozen reference weight (delta compression)."""
        self.base = None if base is None else _dense_copy(base, self._ref.dtype)

    def set_quantized(self, part: str, q: QuantizedPart) -> None:
        """Store ``part`` (``weight``, ``lr_A`` or ``lr_B``) as integer codes; its parameter takes their values."""
        if part not in QUANTIZABLE or getattr(self, part) is None:
            raise ValueError(f"cannot quantize part {part!r} of this layer; parts present: "
                             f"{', '.join(p for p in QUANTIZABLE if getattr(self, p) is not None) or 'none'}")
        param = getattr(self, part)
        if tuple(q.codes.shape) != tuple(param.shape):
            raise ValueError(f"codes of shape {tuple(q.codes.shape)} for part {part!r} of shape {tuple(param.shape)}")
        self._fast = None
        values = q.dequantize(param.dtype, self.mask if part == "weight" else None).to(param.device)
        setattr(self, part, nn.Parameter(values, requires_grad=param.requires_grad))
        self.quant[part] = q

    @torch.no_grad()
    def sync_quant(self) -> list[str]:
        """Put quantized parts whose float values moved (training, an in-place update) back on their grid.

        Each moved part is rounded to the nearest code of its own scales and zero points, so what
        the layer computes is again exactly what its codes store. Returns the parts that moved.
        """
        moved = []
        for part, q in self.quant.items():
            param = getattr(self, part)
            mask = self.mask if part == "weight" else None
            current = q.dequantize(param.dtype, mask)
            if torch.equal(current, param.detach()):
                continue
            scale = q.scale.float().repeat_interleave(q.group_size, dim=1)[:, :param.shape[1]]
            zero = q.zero_points().repeat_interleave(q.group_size, dim=1)[:, :param.shape[1]]
            codes = torch.clamp(torch.round(param.detach().float() / scale) + zero, 0, 2 ** q.bits - 1)
            q.codes = codes.to(torch.uint8) if mask is None else codes.to(torch.uint8) * mask.to(torch.uint8)
            q.info["resynced"] = q.info.get("resynced", 0) + 1
            param.data.copy_(q.dequantize(param.dtype, mask))
            moved.append(part)
        if moved:
            self._fast = None
        return moved

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self.quant = {k: q.apply(fn) for k, q in self.quant.items()}
        self._fast = None
        self._mask_cache = None
        return out

    # ------------------------------------------------------------------ structure
    @property
    def rank(self) -> int:
        return 0 if self.lr_A is None else int(self.lr_A.shape[0])

    @property
    def mask(self) -> torch.Tensor | None:
        """Which entries of S are kept (bool, out x in), or ``None`` when S is dense.

        Held packed at one bit per entry (a bool tensor would cost a quarter of a float32 S): each
        read unpacks a new tensor, except in training mode, where the unpacked mask is kept.
        """
        bits = self.mask_bits
        if bits is None:
            return None
        if self.training and self._mask_cache is not None and self._mask_cache.device == bits.device:
            return self._mask_cache
        mask = unpack_bits(bits, (self.out_features, self.in_features))
        if self.training:
            self._mask_cache = mask
        return mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._mask_cache = None
        if value is None:
            self.mask_bits = None
            return
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"mask of shape {tuple(value.shape)} for a layer of shape "
                             f"{(self.out_features, self.in_features)}")
        self.mask_bits = pack_bits(value)

    @property
    def is_sparse(self) -> bool:
        return self.mask_bits is not None

    def nnz(self) -> int:
        """Non-zeros stored in S (all entries when S is dense, 0 when absent)."""
        if self.weight is None:
            return 0
        return count_bits(self.mask_bits) if self.mask_bits is not None else self.weight.numel()

    def sparse_part(self) -> torch.Tensor:
        """S as a dense tensor (zeros where pruned or absent)."""
        if self.weight is None:
            return torch.zeros(self.out_features, self.in_features, dtype=self._ref.dtype, device=self._ref.device)
        return self.weight * self.mask if self.mask is not None else self.weight

    def low_rank_part(self) -> torch.Tensor:
        """B A as a dense tensor (zeros when absent)."""
        if self.lr_A is None:
            return torch.zeros(self.out_features, self.in_features, dtype=self._ref.dtype, device=self._ref.device)
        return self.lr_B @ self.lr_A

    def inner_weight(self) -> torch.Tensor:
        """``base + S + B A`` (the weight between the scales)."""
        w = self.sparse_part() + self.low_rank_part()
        return w + self.base if self.base is not None else w

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer computes: ``diag(a_out) (base + S + B A) diag(a_in)``."""
        w = self.inner_weight()
        if self.a_in is not None:
            w = w * self.a_in[None, :]
        if self.a_out is not None:
            w = w * self.a_out[:, None]
        return w

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast if not self.training else None
        if fast is not None and fast[0] == "merged":
            return F.linear(x, fast[1], self.bias)
        if fast is not None and fast[0] == "int8":
            return self._forward_int8(x, fast[1])
        if self.a_in is not None:
            x = x * self.a_in
        y = None
        if fast is not None and fast[0] == "csr":
            y = torch.sparse.mm(fast[1], x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        elif fast is not None and fast[0] == "semi_structured":
            y = F.linear(x, fast[1])
        elif fast is not None and fast[0] == "torchao":
            y = fast[1](x)
        elif self.weight is not None:
            w = self.weight * self.mask if (self.mask is not None and self.training) else self.weight
            y = F.linear(x, w if self.base is None else w + self.base)
        elif self.base is not None:
            y = F.linear(x, self.base)
        if self.lr_A is not None:
            z = F.linear(F.linear(x, self.lr_A), self.lr_B)
            y = z if y is None else y + z
        if y is None:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.a_out is not None:
            y = y * self.a_out
        if self.bias is not None:
            y = y + self.bias
        return y

    def _forward_int8(self, x: torch.Tensor, kernels: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Eval forward with the 8-bit parts through the int8 weight-only kernel (the others as float matmuls)."""
        if self.a_in is not None:
            x = x * self.a_in
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])

        def mm(part: str, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            k = kernels.get(part)
            return F.linear(inp, weight) if k is None else torch.ops.aten._weight_int8pack_mm(inp, k[0], k[1])

        y = None
        if self.weight is not None:
            y = mm("weight", x2, self.weight)
        if self.base is not None:
            y = F.linear(x2, self.base) if y is None else y + F.linear(x2, self.base)
        if self.lr_A is not None:
            z = mm("lr_B", mm("lr_A", x2, self.lr_A).contiguous(), self.lr_B)
            y = z if y is None else y + z
        if y is None:
            y = x2.new_zeros(x2.shape[0], self.out_features)
        y = y.reshape(*lead, self.out_features)
        if self.a_out is not None:
            y = y * self.a_out
        if self.bias is not None:
            y = y + self.bias
        return y

    def int8_kernels(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The parts the int8 weight-only kernel can run: 8-bit, one symmetric scale per row, dense.

        Per part ``(int8 codes, scales)`` with ``value = scale * code``, the layout of
        ``torch.ops.aten._weight_int8pack_mm``.
        """
        out = {}
        for part, q in self.quant.items():
            if q.bits != 8 or not q.symmetric or q.groups != 1 or (part == "weight" and self.mask is not None):
                continue
            codes = (q.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
            out[part] = (codes, q.scale[:, 0].to(self._ref.dtype).contiguous())
        return out

    def train(self, mode: bool = True) -> CompressedLinear:
        if mode:
            self._fast = None  # weights are about to move: the inference kernel would go stale
        else:
            self._mask_cache = None
        return super().train(mode)

    @torch.no_grad()
    def set_execution(self, mode: str) -> bool:
        """Choose how eval-mode forward runs; the stored form is unchanged. Returns whether it applies.

        ``factored`` (S as a dense matmul, then B A, then scales), ``merged`` (one dense matmul with
        the effective weight: the dense speed, more memory), ``csr`` (S as a CSR sparse matmul, CPU),
        ``semi_structured`` (S with 2:4 kernels, CUDA), ``int8`` (8-bit per-channel parts through
        the int8 weight-only kernel, the rest as float matmuls) or ``torchao`` (a quantized dense S
        through torchao's CUDA kernels, when the ``gpu`` extra is installed). Pick by measurement:
        :func:`rcc_compression.evaluation.efficiency.optimize_execution`.
        """
        self._fast = None
        if mode == "factored":
            return True
        if mode == "merged":
            self._fast = ("merged", self.effective_weight().contiguous())
            return True
        if mode == "int8":
            kernels = self.int8_kernels()
            if not kernels or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                return False
            self._fast = ("int8", kernels)
            return True
        if mode == "torchao":
            return self._set_torchao()
        if self.weight is None or self.mask is None or self.base is not None:
            return False
        if mode == "csr" and not self.weight.is_cuda:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self._fast = ("csr", self.weight.detach().to_sparse_csr())
            return True
        if mode == "semi_structured" and self.weight.is_cuda:
            try:
                from torch.sparse import to_sparse_semi_structured

                self._fast = ("semi_structured", to_sparse_semi_structured(self.weight.detach()))
            except (RuntimeError, ValueError, ImportError):
                return False
            return True
        if mode not in ("csr", "semi_structured"):
            raise ValueError(f"unknown execution mode {mode!r}; allowed: {', '.join(EXECUTION_MODES)}")
        return False

    def _set_torchao(self) -> bool:
        """torchao's CUDA weight-only kernels for a quantized dense S (the ``gpu`` extra; CUDA only).

        torchao derives its own codes from the dequantized weight, so the result can differ from
        the stored codes by rounding; :func:`~rcc_compression.evaluation.efficiency.optimize_execution`
        keeps it only where the outputs agree and it measures faster.
        """
        q = self.quant.get("weight")
        if (q is None or not self._ref.is_cuda or self.rank or self.mask is not None or self.base is not None
                or q.bits not in (4, 8)):
            return False
        try:
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        except ImportError:
            return False
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=self._ref.device,
                        dtype=self._ref.dtype)
        lin.weight.data.copy_(self.weight.detach())
        lin.requires_grad_(False)
        try:
            quantize_(lin, Int8WeightOnlyConfig() if q.bits == 8 else Int4WeightOnlyConfig(group_size=q.group_size))
        except (RuntimeError, ValueError, AssertionError, NotImplementedError, TypeError):
            return False
        self._fast = ("torchao", lin)
        return True

    @property
    def execution(self) -> str:
        """The eval-mode kernel in use (``factored`` unless :meth:`set_execution` chose another)."""
        return "factored" if self._fast is None else self._fast[0]

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        ref = self._ref
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=ref.device,
                        dtype=ref.dtype)
        lin.weight.copy_(self.effective_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}", f"out={self.out_features}"]
        if self.weight is not None:
            density = self.nnz() / (self.in_features * self.out_features)
            parts.append(f"S density={density:.3f}")
        if self.rank:
            parts.append(f"rank={self.rank}")
        if self.a_in is not None or self.a_out is not None:
            parts.append("scales")
        if self.base is not None:
            parts.append("base")
        return ", ".join(parts)


def _dense_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached, row-major copy: the same layout as a reloaded checkpoint, so results do not
    depend on whether a tensor came from a decomposition or from disk."""
    return t.detach().to(dtype).clone(memory_format=torch.contiguous_format)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    """Every :class:`CompressedLinear` in ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


@torch.no_grad()
def merge_all(model: nn.Module) -> nn.Module:
    """Replace every compressed layer by its merged ``nn.Linear`` (in place); returns ``model``."""
    for name, layer in compressed_layers(model).items():
        replace_module(model, name, layer.merge())
    return model


_PARTS = ("weight", "mask", "lr_A", "lr_B", "a_in", "a_out", "bias", "base")


def layer_snapshot(layer: CompressedLinear) -> dict[str, Any]:
    """A detached copy of every part of a compressed layer, integer codes included (for rollback)."""
    snap: dict[str, Any] = {k: (None if getattr(layer, k) is None else getattr(layer, k).detach().clone())
                            for k in _PARTS}
    if layer.quant:
        snap["quant"] = {k: q.clone() for k, q in layer.quant.items()}
    return snap


def restore_layer(layer: CompressedLinear, snap: dict[str, Any]) -> None:
    """Restore a layer to a :func:`layer_snapshot` (parts absent in the snapshot are removed)."""
    layer._fast = None
    layer.quant = {k: q.clone() for k, q in snap.get("quant", {}).items()}
    for k in ("weight", "lr_A", "lr_B", "a_in", "a_out", "bias"):
        t = snap.get(k)
        setattr(layer, k, None if t is None else nn.Parameter(t.clone()))
    layer.mask = None if snap.get("mask") is None else snap["mask"].clone()
    layer.base = None if snap.get("base") is None else snap["base"].clone()
