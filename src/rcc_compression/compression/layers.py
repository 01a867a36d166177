"""The one compressed layer: ``y = a_out * ((base + S + B A) q(a_in * x)) + bias``.

``S`` is a sparse matrix kept as a dense tensor whose pruned entries are exactly zero (with its
``mask``, held packed at one bit per entry), ``B A`` a low-rank product, ``a_in``/``a_out``
per-channel scales, ``base`` a frozen reference weight (DARE on deltas) and ``q`` optional
per-token int8 quantization of the layer's input activations (``act_bits``). Every part is
optional; :meth:`CompressedLinear.merge` folds them back into a plain ``nn.Linear``.

A layer lives in one of two forms:

- the *working* form, which the compression stages and training use: every part present is a
  float ``nn.Parameter``; a part stored as integer codes (:class:`QuantizedPart`) keeps its
  dequantized values in that parameter, next to its codes;
- the *inference* form (:meth:`CompressedLinear.compact`, :func:`to_inference`): the layer holds
  what its checkpoint stores and nothing more: codes packed as on disk (8-bit symmetric codes as
  ``int8``, the layout integer kernels read), float16 scales, packed zero points, the mask at one
  bit per entry, the kept values of a sparse float S, factors, scales, bias. Reading a part
  (``layer.weight``) decodes it; ``forward`` decodes each part for the call (freed after it, like an
  activation), unless an execution kernel (:meth:`CompressedLinear.set_execution`) holds a faster form,
  whose bytes :meth:`CompressedLinear.held_bytes` counts. ``train()`` brings the float parameters
  back (training moves them; a trainer's ``eval()`` for validation leaves them), and
  :func:`to_inference` gives them back once training is over (codes re-synced to the trained values).

Execution kernels (eval mode only; chosen per layer by measurement in
:func:`rcc_compression.evaluation.efficiency.optimize_execution`):

``factored``  every part as its own matmul (decoded per call in the inference form)
``merged``    one cached float matrix ``base + S + B A`` (the dense speed, the dense bytes)
``w8a8``      int8 codes x int8 per-token activations through ``torch._int_mm`` (CPU: oneDNN's
              int8 GEMM; CUDA: cuBLASLt), needs ``act_bits = 8`` and symmetric per-row codes
``csr``       a sparse float S as a CSR matmul (float32/float64 on the CPU)
``int4_weight``   4-bit grouped codes through ``aten._weight_int4pack_mm_for_cpu`` (bfloat16)
``int8_weight``   8-bit per-row codes through ``aten._weight_int8pack_mm``
``semi_structured``  2:4 sparse S on CUDA; ``torchao``: torchao's CUDA weight-only kernels
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import EXECUTION_MODES, KERNELS, fake_quant_tokens, state_tensors  # noqa: F401

#: the parts of a layer that can be stored as integer codes (S, and the low-rank factors)
QUANTIZABLE = ("weight", "lr_A", "lr_B")
#: float parameters a layer may have
PARAMS = ("weight", "lr_A", "lr_B", "a_in", "a_out", "bias")
#: activation bit widths a layer's input may be quantized to
ACT_BITS = (8,)

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
#: set bits of every byte value
_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)


# ------------------------------------------------------------------------------ bit and code packing
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


def code_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` packed ``bits``-bit codes."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits``-bit codes (any shape) -> uint8 bytes: the bits of each code most significant first,
    codes in row-major order, zero-padded (the checkpoint's layout; 8 codes fill ``bits`` bytes)."""
    flat = codes.detach().flatten().to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    groups = -(-n // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=flat.device)
    padded[:n] = flat
    shifts = torch.arange(7, -1, -1, device=flat.device) * bits
    words = (padded.view(groups, 8) << shifts).sum(1)  # 8 codes in one big-endian word of 8 * bits bits
    byte_shifts = torch.arange(bits - 1, -1, -1, device=flat.device) * 8
    out = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:code_bytes(n, bits)].clone()


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, flat (uint8, or written into ``out``).

    Vectorised per width (nibbles for 4 bits, 2-bit fields for 2, 24-bit words for 3), so a layer's
    codes decode in about the time of one pass over them.
    """
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed.to(torch.uint8)
    if packed.numel() != code_bytes(numel, bits):
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * 8 // bits} codes of {bits} bits, "
                         f"{numel} expected")
    if out is None:
        out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    flat = out.reshape(-1)
    if bits == 8:
        flat.copy_(packed)
        return out
    byte_fields = bits in (1, 2, 4)  # whole codes inside each byte; otherwise 8 codes in ``bits`` bytes
    per = 8 // bits if byte_fields else 8
    unit = 1 if byte_fields else bits
    units = -(-numel // per)
    full = units * unit
    if packed.numel() < full:  # the last unit is partly padding: pad the bytes to a whole unit
        packed = torch.cat([packed, packed.new_zeros(full - packed.numel())])
    if byte_fields:
        shifts = torch.arange(8 - bits, -1, -bits, device=packed.device, dtype=torch.uint8)
        fields = (packed[:units, None] >> shifts) & ((1 << bits) - 1)
    else:
        b = packed[:full].view(units, bits).to(torch.int64)
        word = (b << torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.int64) * 8).sum(1)
        shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.int64) * bits
        fields = (word[:, None] >> shifts) & ((1 << bits) - 1)
    flat.copy_(fields.reshape(-1)[:numel])
    return out


# ------------------------------------------------------------------------------ integer codes
@dataclass
class QuantizedPart:
    """Integer codes of one weight part: ``value = scale * (code - zero)`` per group of ``group_size`` columns.

    ``scale`` (float16, rows x groups) and ``zero`` (uint8, rows x groups; ``None`` = symmetric,
    zero point ``2**(bits-1)``). The codes are held either *unpacked* (``codes``: uint8 of the
    part's shape; entries outside a sparse mask are zero and not stored) or *packed* as the
    checkpoint stores them (:meth:`pack`): the kept codes only, bit-packed, and 8-bit symmetric
    codes as ``int8`` (``code - 128``), the layout integer kernels read. Built by :mod:`.quant`.
    """

    bits: int
    group_size: int
    codes: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    method: str = "nearest"
    info: dict = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)
    packed: torch.Tensor | None = None
    #: with ``packed``: the mask bits of the kept entries (``None``: every entry is stored)
    kept: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes is not None:
            self.shape = (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def groups(self) -> int:
        return math.ceil(self.cols / self.group_size)

    @property
    def is_packed(self) -> bool:
        return self.codes is None

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def zero_points(self) -> torch.Tensor:
        """Zero points as float32 (rows x groups)."""
        if self.zero is None:
            return torch.full(self.scale.shape, float(2 ** (self.bits - 1)), device=self.scale.device)
        return self.zero.float()

    def stored_count(self) -> int:
        """Codes the part stores (the kept entries of a sparse part)."""
        return self.rows * self.cols if self.kept is None else count_bits(self.kept)

    # ---------------------------------------------------------------- forms
    def pack(self, kept: torch.Tensor | None = None) -> QuantizedPart:
        """Hold only the stored codes, packed (``kept``: mask bits of a sparse part). Returns ``self``."""
        if self.codes is None:
            return self
        codes = self.codes
        if kept is not None:
            codes = codes[unpack_bits(kept, self.shape).to(codes.device)]
        if self.bits == 8 and self.symmetric:
            self.packed = (codes.reshape(-1).to(torch.int16) - 128).to(torch.int8)
        else:
            self.packed = pack_codes(codes, self.bits)
        self.kept = kept  # the layer's own mask bits (never changed in place): shared, not copied
        self.codes = None
        return self

    def grid_codes(self) -> torch.Tensor:
        """The codes as uint8 of the part's shape (zero outside the kept entries), from either form."""
        if self.codes is not None:
            return self.codes
        return self._grid(torch.empty(self.shape, dtype=torch.uint8, device=self.device))

    def _grid(self, out: torch.Tensor) -> torch.Tensor:
        """Unpack the packed codes onto the grid ``out`` (uint8 or float, the part's shape)."""
        count = self.stored_count()
        if self.kept is None:
            if self.bits == 8 and self.symmetric:
                out.reshape(-1).copy_(self.packed.reshape(-1))
                out.add_(128)
            else:
                unpack_codes(self.packed, self.bits, count, out=out.reshape(-1))
            return out
        kept = unpack_codes(self.packed.view(torch.uint8) if self.packed.dtype == torch.int8 else self.packed,
                            self.bits, count)
        if self.bits == 8 and self.symmetric:
            kept = kept ^ 0x80  # int8 bytes back to codes
        out.zero_()
        out.masked_scatter_(unpack_bits(self.kept, self.shape).to(out.device), kept.to(out.dtype))
        return out

    def unpack(self) -> QuantizedPart:
        """Hold the codes unpacked again (the working form). Returns ``self``."""
        if self.codes is None:
            self.codes = self.grid_codes()
            self.packed = None
            self.kept = None
        return self

    def int8_codes(self) -> torch.Tensor:
        """Signed codes ``code - 2**(bits-1)`` as int8 (rows x cols); symmetric parts only.

        For a packed dense 8-bit part this is the held tensor itself (no copy).
        """
        if not self.symmetric:
            raise ValueError("int8 codes need a symmetric part (the zero point is the code offset)")
        if self.codes is None and self.kept is None and self.bits == 8:
            return self.packed.view(self.shape)
        half = 1 << (self.bits - 1)
        return (self.grid_codes().to(torch.int16) - half).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32, mask: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The float values the codes stand for (zero outside ``mask``, or outside the kept entries).

        ``out`` (the part's shape and ``dtype``) receives them without a new allocation.
        """
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        if out.dtype not in (torch.float32, torch.float64):  # decode in float32, round once (as the codes were made)
            return out.copy_(self.dequantize(torch.float32, mask))
        if self.codes is not None:
            out.copy_(self.codes)
        elif self.bits == 8 and self.symmetric and self.kept is None:
            out.copy_(self.packed.view(self.shape))  # int8 = code - zero already
        else:
            self._grid(out)
        rows, cols, g = self.rows, self.cols, self.group_size
        scale = self.scale.to(out.dtype)
        offset = not (self.bits == 8 and self.symmetric and self.codes is None and self.kept is None)
        if g >= cols:  # one scale per row
            if offset:
                out.sub_(self.zero_points().to(out.dtype)[:, :1])
            out.mul_(scale[:, :1])
        elif cols % g == 0:
            view = out.view(rows, cols // g, g)
            if offset:
                view.sub_(self.zero_points().to(out.dtype)[..., None])
            view.mul_(scale[..., None])
        else:
            if offset:
                out.sub_(self.zero_points().repeat_interleave(g, dim=1)[:, :cols].to(out.dtype))
            out.mul_(scale.repeat_interleave(g, dim=1)[:, :cols])
        if mask is not None:
            out.mul_(mask)
        elif self.kept is not None:
            out.mul_(unpack_bits(self.kept, self.shape).to(out.device))
        return out

    def nbytes(self) -> int:
        """Bytes of the tensors this part holds now (codes in their current form, scales, zero points)."""
        held = self.codes if self.codes is not None else self.packed
        return sum(t.numel() * t.element_size() for t in (held, self.scale, self.zero, self.kept) if t is not None)

    def spec(self) -> dict[str, object]:
        """The quantization format (for manifests and records)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "method": self.method}

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedPart:
        """Follow a device move of the module (dtype casts leave codes and float16 scales alone)."""
        moved = fn(self.codes if self.codes is not None else self.packed)
        dev = moved.device

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dev)

        return QuantizedPart(self.bits, self.group_size, moved if self.codes is not None else None,
                             self.scale.to(dev), to(self.zero), self.method, dict(self.info), self.shape,
                             None if self.codes is not None else moved, to(self.kept))

    def clone(self) -> QuantizedPart:
        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return QuantizedPart(self.bits, self.group_size, c(self.codes), self.scale.clone(), c(self.zero),
                             self.method, dict(self.info), self.shape, c(self.packed), c(self.kept))


# ------------------------------------------------------------------------------ the layer's state
@dataclass
class LayerState:
    """Every part of a compressed layer (for rollback and restore): :meth:`CompressedLinear.state`."""

    params: dict[str, torch.Tensor | None]
    mask_bits: torch.Tensor | None
    base: torch.Tensor | None
    quant: dict[str, QuantizedPart]
    act_bits: int | None = None


class CompressedLinear(nn.Module):
    """A Linear layer stored as sparse + low rank + channel scales (+ frozen base, + int8 activations).

    Attributes are ``None`` when a part is absent: ``weight`` (the sparse or dense part S),
    ``mask`` (bool, None = S is dense; held packed at 1 bit per entry in ``mask_bits``),
    ``lr_A`` (r x in), ``lr_B`` (out x r), ``a_in`` (in), ``a_out`` (out), ``bias`` (out),
    ``base`` (out x in, frozen buffer), ``act_bits`` (8: the input is quantized per token).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
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
        # inference form: the kept values of a sparse float S (the state dict shows S itself, as in either form)
        self.register_buffer("s_values", None, persistent=False)
        self._dtype = dtype
        self._device = torch.device(device)
        self._mask_cache: torch.Tensor | None = None  # the unpacked mask while training (read every step)
        self._kernel: str = "factored"
        self._kernel_state: Any = None
        self._kernel_key: tuple | None = None
        self._compact = False
        #: parts stored as integer codes (:mod:`.quant`)
        self.quant: dict[str, QuantizedPart] = {}
        #: bits of the per-token activation quantization of the input (None: float activations)
        self.act_bits: int | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CompressedLinear:
        """An exact copy of ``linear`` (dense S, nothing else) to be compressed in place."""
        layer = cls(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)
        layer.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def adopt(cls, linear: nn.Linear) -> CompressedLinear:
        """A layer holding ``linear``'s own parameters (no copy: ``linear`` leaves the model)."""
        if not linear.weight.is_contiguous():
            return cls.from_linear(linear)
        layer = cls(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def _live(self) -> torch.Tensor | None:
        """A float tensor the layer holds (its dtype and device are the layer's), if any."""
        for t in self._parameters.values():
            if t is not None:
                return t
        for name in ("base", "s_values"):
            t = self._buffers.get(name)
            if t is not None:
                return t
        return None

    @classmethod
    def inference_form(cls, in_features: int, out_features: int, dtype: torch.dtype, *,
                       params: dict[str, torch.Tensor | None], quant: dict[str, QuantizedPart],
                       mask_bits: torch.Tensor | None = None, s_values: torch.Tensor | None = None,
                       act_bits: int | None = None) -> CompressedLinear:
        """A layer in its inference form straight from stored tensors (nothing decoded or copied):
        float ``params`` (parts not stored as codes), ``quant`` (packed codes), the mask bits, the kept
        values of a sparse float S. The tensors are used as they are given."""
        device = next((t.device for t in (*params.values(), s_values) if t is not None),
                      next((q.device for q in quant.values()), torch.device("cpu")))
        layer = cls(in_features, out_features, dtype, device)
        for k in PARAMS:
            t = params.get(k)
            if t is not None:
                layer.__dict__.pop(k, None)
                layer._parameters[k] = nn.Parameter(t, requires_grad=t.is_floating_point())
        layer._compact = True
        for part, q in quant.items():
            layer.__dict__.pop(part, None)
            layer.quant[part] = q.pack(mask_bits if part == "weight" else None)
        if s_values is not None:
            layer.__dict__.pop("weight", None)
            layer.s_values = s_values
        layer.mask_bits = mask_bits
        layer.act_bits = act_bits
        return layer

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the layer computes in (its parameters', and its decoded parts')."""
        t = self._live()
        return self._dtype if t is None else t.dtype

    @property
    def device(self) -> torch.device:
        t = self._live()
        return self._device if t is None else t.device

    @property
    def element_size(self) -> int:
        """Bytes per float value of this layer's dtype."""
        return torch.empty(0, dtype=self.dtype).element_size()

    # ------------------------------------------------------------------ reading parts
    def __getattr__(self, name: str) -> Any:
        if name in QUANTIZABLE:
            modules = self.__dict__.get("_parameters", {})
            if name not in modules and self.__dict__.get("_compact"):
                return self._decoded(name)
        return super().__getattr__(name)

    def _decoded(self, part: str, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Part ``part`` as float values, decoded from what the inference form holds."""
        q = self.quant.get(part)
        if q is not None:
            return q.dequantize(self.dtype, out=out)
        if part == "weight" and self.s_values is not None:
            w = out if out is not None else torch.empty(self.out_features, self.in_features, dtype=self.dtype,
                                                        device=self.device)
            w.zero_()
            w.masked_scatter_(self.mask, self.s_values)
            return w
        return None

    def has_part(self, part: str) -> bool:
        """Whether part ``weight``, ``lr_A`` or ``lr_B`` is present (in either form)."""
        if part in self._parameters and self._parameters[part] is not None:
            return True
        if not self._compact:
            return False
        return part in self.quant or (part == "weight" and self.s_values is not None)

    @property
    def has_sparse(self) -> bool:
        """Whether S is present."""
        return self.has_part("weight")

    # ------------------------------------------------------------------ setting parts (working form)
    def _invalidate(self) -> None:
        self._kernel_state = None
        self._kernel_key = None

    def set_sparse(self, values: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """Set S (pruned entries are zeroed here, so the invariant ``weight == weight * mask`` holds).

        New values replace any integer codes S had (quantize again with :mod:`.quant`).
        """
        self.materialize()
        self._invalidate()
        self.quant.pop("weight", None)
        if values is None:
            self.weight = None
            self.mask = None
            return
        if mask is not None:
            mask = mask.to(device=values.device, dtype=torch.bool)
            if bool(mask.all()):  # nothing pruned: S is dense (a full mask would only cost bytes)
                mask = None
            else:
                values = values * mask
        self.weight = nn.Parameter(_dense_copy(values, self.dtype))
        self.mask = mask

    def set_low_rank(self, B: torch.Tensor | None, A: torch.Tensor | None) -> None:
        """Set the low-rank factors (``B``: out x r, ``A``: r x in), or remove them with ``None``."""
        self.materialize()
        self._invalidate()
        self.quant.pop("lr_A", None)
        self.quant.pop("lr_B", None)
        if B is None or A is None or B.shape[1] == 0:
            self.lr_B = self.lr_A = None
            return
        self.lr_B = nn.Parameter(_dense_copy(B, self.dtype))
        self.lr_A = nn.Parameter(_dense_copy(A, self.dtype))

    def set_scales(self, a_in: torch.Tensor | None, a_out: torch.Tensor | None) -> None:
        """Set the per-channel scales (``None`` removes one)."""
        self._invalidate()
        self.a_in = None if a_in is None else nn.Parameter(_dense_copy(a_in, self.dtype))
        self.a_out = None if a_out is None else nn.Parameter(_dense_copy(a_out, self.dtype))

    def set_base(self, base: torch.Tensor | None) -> None:
        """Set the frozen reference weight (delta compression)."""
        self._invalidate()
        self.base = None if base is None else _dense_copy(base, self.dtype)

    def set_activations(self, bits: int | None) -> None:
        """Quantize the layer's input per token to ``bits`` (8), or keep it float (``None``)."""
        if bits is not None and bits not in ACT_BITS:
            raise ValueError(f"activation bits {bits!r}; allowed: {', '.join(map(str, ACT_BITS))} or None")
        self._invalidate()
        self.act_bits = bits

    def set_quantized(self, part: str, q: QuantizedPart) -> None:
        """Store ``part`` (``weight``, ``lr_A`` or ``lr_B``) as integer codes; its parameter takes their values."""
        self.materialize()
        if part not in QUANTIZABLE or getattr(self, part) is None:
            raise ValueError(f"cannot quantize part {part!r} of this layer; parts present: "
                             f"{', '.join(p for p in QUANTIZABLE if getattr(self, p) is not None) or 'none'}")
        param = getattr(self, part)
        q.unpack()
        if tuple(q.shape) != tuple(param.shape):
            raise ValueError(f"codes of shape {tuple(q.shape)} for part {part!r} of shape {tuple(param.shape)}")
        self._invalidate()
        values = q.dequantize(param.dtype, self.mask if part == "weight" else None).to(param.device)
        setattr(self, part, nn.Parameter(values, requires_grad=param.requires_grad))
        self.quant[part] = q

    @torch.no_grad()
    def scale_inputs(self, s: torch.Tensor) -> None:
        """Move a per-input-channel factor ``s`` from the activations into the weights (SmoothQuant's
        migration): ``a_in / s`` on the input and every weight column times ``s``, the same function.

        Integer codes of S and the factors are dropped (round them again); a layer with a frozen
        ``base`` refuses (its base must stay the reference model's).
        """
        if self.base is not None:
            raise ValueError("a delta layer (with a frozen base) cannot move scales into its weights")
        self.materialize()
        s = s.detach().to(self.device, torch.float32)
        a_in = self.a_in.detach().float() if self.a_in is not None else torch.ones_like(s)
        self.a_in = nn.Parameter((a_in / s).to(self.dtype))
        if self.weight is not None:
            self.set_sparse(self.weight.detach().float() * s, self.mask)
        if self.lr_A is not None:
            self.set_low_rank(self.lr_B.detach(), self.lr_A.detach().float() * s)
        self._invalidate()

    @torch.no_grad()
    def sync_quant(self) -> list[str]:
        """Put quantized parts whose float values moved (training, an in-place update) back on their grid.

        Each moved part is rounded to the nearest code of its own scales and zero points, so what
        the layer computes is again exactly what its codes store. Returns the parts that moved.
        """
        moved = []
        if self._compact:
            return moved
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
            self._invalidate()
        return moved

    # ------------------------------------------------------------------ forms
    @property
    def is_compact(self) -> bool:
        """Whether the layer is in its inference form (holds only what its checkpoint stores)."""
        return self._compact

    @torch.no_grad()
    def compact(self) -> CompressedLinear:
        """Switch to the inference form: drop the float copies of quantized parts and of a sparse S
        (the codes, kept values and mask are what remains). Returns ``self``."""
        if self._compact:
            return self
        self.sync_quant()
        self._dtype, self._device = self.dtype, self.device
        kept = self.mask_bits
        for part in QUANTIZABLE:
            q = self.quant.get(part)
            if q is not None:
                q.pack(kept if part == "weight" else None)
                del self._parameters[part]
        if "weight" in self._parameters and self.weight is not None and kept is not None:
            self.s_values = self.weight.detach()[self.mask].clone()
            del self._parameters["weight"]
        self._mask_cache = None
        self._compact = True
        self._invalidate()
        return self

    @torch.no_grad()
    def materialize(self) -> CompressedLinear:
        """Back to the working form: float parameters for every part (codes unpacked). Returns ``self``."""
        if not self._compact:
            return self
        for part in QUANTIZABLE:
            if part in self._parameters:
                continue
            values = self._decoded(part)
            self.__dict__.pop(part, None)
            if values is not None:
                self._parameters[part] = nn.Parameter(values)
            else:
                self.__dict__[part] = None
        for q in self.quant.values():
            q.unpack()
        self.s_values = None
        self._compact = False
        self._invalidate()
        return self

    def held_tensors(self, kernel: bool = True) -> Iterator[torch.Tensor]:
        """Every tensor the layer holds now: parameters, buffers, codes, scales and zero points, and
        with ``kernel`` what its execution kernel keeps."""
        yield from (t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None)
        for q in self.quant.values():
            yield from (t for t in (q.codes, q.packed, q.scale, q.zero, q.kept) if t is not None)
        if kernel:
            yield from state_tensors(self._kernel_state)

    def held_bytes(self, kernel: bool = True) -> int:
        """Bytes of :meth:`held_tensors`, each storage counted once (a kernel's view of the codes is free)."""
        return unique_bytes(self.held_tensors(kernel))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """The state dict is the working form's in either form (parts held as codes are decoded into it),
        so it loads into any compressed layer of the same structure."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._compact:
            for part in QUANTIZABLE:
                if part not in self._parameters:
                    value = self._decoded(part)
                    if value is not None:
                        destination[prefix + part] = value

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        compact = self._compact
        self.materialize()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._invalidate()
        if compact:  # back to the inference form, the loaded values rounded onto the codes
            self.compact()

    def __deepcopy__(self, memo: dict[int, Any]) -> CompressedLinear:
        """A copy without the kernel's state (some, CSR for one, cannot be copied): it is rebuilt on use."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, None if k in ("_kernel_state", "_kernel_key") else copy.deepcopy(v, memo))
        return new

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self._dtype, device=self._device))
        self._dtype, self._device = probe.dtype, probe.device
        self.quant = {k: q.apply(fn) for k, q in self.quant.items()}
        self._invalidate()
        self._mask_cache = None
        if KERNELS[self._kernel].refuse(self) is not None:  # e.g. csr after a cast to bfloat16
            self._kernel = "factored"
        return out

    def train(self, mode: bool = True) -> CompressedLinear:
        if mode:
            self.materialize()  # training moves float values; :func:`to_inference` gives them back
        out = super().train(mode)
        if mode:
            self._invalidate()  # the kernel's copy would go stale while training: rebuilt on eval()
        else:
            self._mask_cache = None
            if self._kernel != "factored":
                self._prepared()
        return out

    # ------------------------------------------------------------------ state (rollback)
    def state(self, copy: bool = True) -> LayerState:
        """Every part of the layer (``copy=False`` shares the working form's tensors; a compact layer's
        parts are decoded, its codes copied)."""

        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t.detach().clone() if copy else t)

        return LayerState({k: c(getattr(self, k)) for k in PARAMS}, c(self.mask_bits), c(self.base),
                          {k: (q.clone() if copy or self._compact else q) for k, q in self.quant.items()},
                          self.act_bits)

    def load_state(self, state: LayerState, copy: bool = True) -> None:
        """Restore the layer to ``state`` (parts absent there are removed); the layer is in its working form."""
        self.materialize()
        self._invalidate()
        self.quant = {k: (q.clone() if copy else q).unpack() for k, q in state.quant.items()}
        for k in PARAMS:
            t = state.params.get(k)
            setattr(self, k, None if t is None else nn.Parameter(t.clone() if copy else t))
        self._mask_cache = None
        self.mask_bits = None if state.mask_bits is None else (state.mask_bits.clone() if copy else state.mask_bits)
        self.base = None if state.base is None else (state.base.clone() if copy else state.base)
        self.act_bits = state.act_bits

    # ------------------------------------------------------------------ structure
    @property
    def rank(self) -> int:
        if "lr_A" in self._parameters:
            A = self._parameters["lr_A"]
            return 0 if A is None else int(A.shape[0])
        q = self.quant.get("lr_A")
        return 0 if q is None else q.rows

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
        self._invalidate()
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
        if not self.has_sparse:
            return 0
        return count_bits(self.mask_bits) if self.mask_bits is not None else self.in_features * self.out_features

    def sparse_part(self) -> torch.Tensor:
        """S as a dense tensor (zeros where pruned or absent)."""
        w = self.weight
        if w is None:
            return torch.zeros(self.out_features, self.in_features, dtype=self.dtype, device=self.device)
        mask = self.mask
        return w * mask if mask is not None and not self._compact else w

    def low_rank_part(self) -> torch.Tensor:
        """B A as a dense tensor (zeros when absent)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, dtype=self.dtype, device=self.device)
        return self.lr_B @ self.lr_A

    def inner_weight(self) -> torch.Tensor:
        """``base + S + B A`` (the weight between the scales)."""
        w = self.sparse_part() + self.low_rank_part()
        return w + self.base if self.base is not None else w

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer computes (activation quantization aside):
        ``diag(a_out) (base + S + B A) diag(a_in)``."""
        w = self.inner_weight()
        if self.a_in is not None:
            w = w * self.a_in[None, :]
        if self.a_out is not None:
            w = w * self.a_out[:, None]
        return w

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self._kernel != "factored":
            state = self._prepared()
            if state is not None:
                return KERNELS[self._kernel].run(self, state, x)
        return self.forward_factored(x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        xq = fake_quant_tokens(x)
        return x + (xq - x).detach() if (self.training and x.requires_grad) else xq

    def _operand(self, part: str) -> torch.Tensor:
        """Part ``part`` for a matmul: its parameter, or (inference form) decoded for this call only."""
        param = self._parameters.get(part)
        return param if param is not None else self._decoded(part)

    def forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_in is not None:
            x = x * self.a_in
        x = self.quantize_input(x)
        y = None
        if self.has_sparse:
            w = self._operand("weight")
            if self.mask_bits is not None and self.training:
                w = w * self.mask
            if self.base is not None:
                w = w + self.base
            y = F.linear(x, w)
        elif self.base is not None:
            y = F.linear(x, self.base)
        if self.rank:
            y_lr = F.linear(F.linear(x, self._operand("lr_A")), self._operand("lr_B"))
            y = y_lr if y is None else y + y_lr
        if y is None:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.a_out is not None:
            y = y * self.a_out
        if self.bias is not None:
            y = y + self.bias
        return y

    # ------------------------------------------------------------------ execution kernels
    def _key(self) -> tuple:
        """What the prepared kernel state was built from: identities and in-place versions of every tensor."""
        tensors = [*self._parameters.values(), *self._buffers.values()]
        for q in self.quant.values():
            tensors += [q.codes, q.packed, q.scale, q.zero]
        return (self.act_bits, *((id(t), 0 if t.is_inference() else t._version) if t is not None else None
                                 for t in tensors))

    def _prepared(self) -> Any:
        key = self._key()
        if self._kernel_state is None or self._kernel_key != key:
            with torch.no_grad():
                self._kernel_state = KERNELS[self._kernel].prepare(self)
            self._kernel_key = key
        return self._kernel_state

    @torch.no_grad()
    def set_execution(self, mode: str) -> bool:
        """Choose how eval-mode forward runs; the stored form is unchanged. Returns whether it applies.

        Modes are the keys of :data:`KERNELS`; a mode applies only where the layer's parts, dtype and
        device are ones the kernel is proven on (:meth:`execution_support`). Pick by measurement:
        :func:`rcc_compression.evaluation.efficiency.optimize_execution`.
        """
        if mode not in KERNELS:
            raise ValueError(f"unknown execution mode {mode!r}; allowed: {', '.join(KERNELS)}")
        self._kernel = "factored"
        self._invalidate()
        if mode == "factored":
            return True
        if KERNELS[mode].refuse(self) is not None:
            return False
        self._kernel = mode
        try:
            state = self._prepared()
        except (RuntimeError, ValueError, NotImplementedError, ImportError, AssertionError, TypeError):
            state = None
        if state is None:
            self._kernel = "factored"
            self._invalidate()
            return False
        return True

    def execution_support(self, mode: str) -> str | None:
        """Why ``mode`` cannot run this layer (``None``: it can)."""
        return None if mode == "factored" else KERNELS[mode].refuse(self)

    @property
    def execution(self) -> str:
        """The eval-mode kernel in use (``factored`` unless :meth:`set_execution` chose another)."""
        return self._kernel

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (activation quantization aside)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.device,
                        dtype=self.dtype)
        lin.weight.copy_(self.effective_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}", f"out={self.out_features}"]
        if self.has_sparse:
            density = self.nnz() / (self.in_features * self.out_features)
            parts.append(f"S density={density:.3f}")
        if self.rank:
            parts.append(f"rank={self.rank}")
        if self.quant:
            parts.append("codes " + ",".join(f"{k}:int{q.bits}" for k, q in self.quant.items()))
        if self.act_bits:
            parts.append(f"act int{self.act_bits}")
        if self.a_in is not None or self.a_out is not None:
            parts.append("scales")
        if self.base is not None:
            parts.append("base")
        if self._compact:
            parts.append("inference form")
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


def to_inference(model: nn.Module) -> nn.Module:
    """Every compressed layer of ``model`` in its inference form (:meth:`CompressedLinear.compact`),
    the model in eval mode; returns ``model``."""
    model.eval()
    for layer in compressed_layers(model).values():
        layer.compact()
    return model


def to_working(model: nn.Module) -> nn.Module:
    """Every compressed layer of ``model`` in its working form (float parameters); returns ``model``."""
    for layer in compressed_layers(model).values():
        layer.materialize()
    return model


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (views share their storage)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds: parameters and buffers, the codes and kernel state of its
    compressed layers, each storage once. (Parts decoded for one call are freed after it, like activations.)"""
    tensors = [*model.parameters(), *model.buffers()]
    for layer in compressed_layers(model).values():
        tensors += list(layer.held_tensors())
    return unique_bytes(tensors)
