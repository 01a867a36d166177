"""ONNX export that keeps the compression, checked against PyTorch with ONNX Runtime.

Each :class:`~.layers.CompressedLinear` is exported as its parts, not as a dense weight: the
low-rank factors as two ``MatMul`` (``x A^T`` then ``B^T``), the per-channel scales as ``Mul``,
and the sparse part S in the checkpoint's own encoding (kept values plus a bit-packed mask, or
CSR column indices and row counts) with a few ops that rebuild S from it (bit masks, ``CumSum``,
``Gather``, ``Where``).
Those ops read only initializers, so ONNX Runtime folds them into the dense S once, when the
session is made; the stored file stays as small as the compressed checkpoint while inference runs
the same kernels as PyTorch's ``factored`` mode. Integer codes (stage ``quant``) keep their bit
width: the packed codes are stored as the checkpoint stores them, unpacked to uint8 by
bit operations and decoded by ``DequantizeLinear`` (per row, or per group as rows of the group
size), with the float16 scales and packed zero points as stored. ONNX Runtime keeps
``DequantizeLinear`` nodes (codes in memory, decoded per call) unless the session sets
``session.disable_quant_qdq`` (:func:`ort_session` does by default: decoded once, at load).
``MatMulNBits`` is not used: it would need the codes repacked into its own layout, and the stored
bytes would be the same.

How: each compressed layer is traced as one placeholder node (``rcc::CompressedLinear``, via an
``autograd.Function`` symbolic), which the TorchScript-based exporter leaves alone; the
placeholders are then replaced by the subgraphs above. The exporter never sees (and so never
folds or duplicates) the compressed weights.

CLIP exports two graphs, ``vision_model.onnx`` (``pixel_values`` -> ``image_embeds``) and
``text_model.onnx`` (``input_ids``, ``attention_mask`` -> ``text_embeds``), both unnormalised
projections as ``CLIPModel.get_image_features``/``get_text_features`` give. A captioning BLIP
exports ``vision_model.onnx`` (patch features) and ``text_decoder.onnx`` (``input_ids``,
``attention_mask``, ``encoder_hidden_states`` -> ``logits``, no key/value cache), which
:func:`onnx_greedy_caption` decodes greedily. ``onnx_manifest.json`` records the logit scale or the
decoder's token ids, each file's sha256 and the measured difference to PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..utils.io import atomic_dir, atomic_write_json, sha256_file
from .layers import CompressedLinear, compressed_layers
from .storage import _check_target, choose_encoding, encode_layer

OPSET = 18
DOMAIN = "rcc"
#: ONNX Runtime's contrib domain (``MatMulNBits``)
CONTRIB = "com.microsoft"
MANIFEST = "onnx_manifest.json"
TOLERANCE = 1e-4
#: relative error allowed where layers quantize their inputs: ONNX Runtime's float ops (LayerNorm, GELU,
#: attention) differ from PyTorch's by rounding, and an input that lands next to a rounding boundary takes the
#: neighbouring int8 code in one of them, a step of 1/127 of its token's largest value
TOLERANCE_ACTIVATIONS = 1e-2


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        from onnx import helper, numpy_helper  # noqa: F401
    except ImportError:  # pragma: no cover - optional dependency
        raise CheckpointError("ONNX export needs the 'onnx' package: pip install rcc-compression[export]") from None
    return onnx, helper


# ------------------------------------------------------------------------------ placeholders
_ACTIVE: dict[str, CompressedLinear] = {}  # the layers of the export in progress, by name


class _Placeholder(torch.autograd.Function):
    """Runs the layer in PyTorch; exports as one ``rcc::CompressedLinear`` node named after it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, name: str) -> torch.Tensor:  # noqa: ARG004
        state = torch._C._get_tracing_state()  # the layer's own ops stay out of the trace: the node stands for them
        torch._C._set_tracing_state(None)
        try:
            return CompressedLinear.forward(_ACTIVE[name], x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g: Any, x: Any, name: str) -> Any:
        out = g.op(f"{DOMAIN}::CompressedLinear", x, layer_s=name)
        sizes = x.type().varyingSizes()
        if sizes is not None:
            out.setType(x.type().with_sizes([*sizes[:-1], _ACTIVE[name].out_features]))
        return out


@contextlib.contextmanager
def _placeholders(model: nn.Module) -> Iterator[dict[str, CompressedLinear]]:
    layers = compressed_layers(model)
    if _ACTIVE:
        raise RuntimeError("one ONNX export at a time")
    _ACTIVE.update(layers)
    for name, layer in layers.items():
        layer.forward = lambda x, name=name: _Placeholder.apply(x, name)
    try:
        yield layers
    finally:
        _ACTIVE.clear()
        for layer in layers.values():
            del layer.forward


# ------------------------------------------------------------------------------ the layer subgraph
class _Builder:
    """Collects the nodes and initializers that replace one placeholder."""

    def __init__(self, prefix: str, short: str) -> None:
        self.prefix, self.short = prefix, short  # initializers carry the layer name; intermediates a short one
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self) -> str:
        self._n += 1
        return f"{self.short}_{self._n}"

    def const(self, what: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"{self.prefix}.{what}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.name()
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _mask_and_order(b: _Builder, layer: CompressedLinear, enc: dict[str, torch.Tensor], kind: str
                    ) -> tuple[str, str]:
    """The flat mask of S (bool, m*n) and, per position, the index of its kept value, from the stored encoding.

    Every input is an initializer and every op is one ONNX Runtime constant-folds (no ``NonZero``,
    whose data-dependent shape it does not fold), so the rebuild runs once, when the session is made.
    The kept values are in row-major order of the mask: value ``k`` belongs to the ``k``-th set bit,
    so ``S = where(mask, values[cumsum(mask) - 1], 0)``.
    """
    from onnx import TensorProto

    m, n = layer.out_features, layer.in_features
    i64 = TensorProto.INT64
    axis0 = b.const("axis0", np.array(0, np.int64))
    if kind == "bitmask":
        bits = b.const("mask_bits", _np(enc["mask_bits"]).reshape(-1, 1))
        weights = b.const("bit_weights", np.array([[128, 64, 32, 16, 8, 4, 2, 1]], np.uint8))
        flat = b.op("Reshape", [b.op("BitwiseAnd", [bits, weights]), b.const("flat", np.array([-1], np.int64))])
        flat = b.op("Slice", [flat, b.const("start", np.array([0], np.int64)),
                              b.const("stop", np.array([m * n], np.int64))])
        mask = b.op("Cast", [flat], to=TensorProto.BOOL)
    else:  # csr: row of each value from the row counts (+1 at each row start, cumulated), then row * n + col
        nnz = layer.nnz()
        counts = b.op("Cast", [b.const("row_nnz", _np(enc["row_nnz"]))], to=i64)
        starts = b.op("CumSum", [counts, axis0], exclusive=1)
        marker = b.op("ScatterElements", [b.const("marker0", np.zeros(nnz + 1, np.int64)), starts,
                                          b.const("ones", np.ones(m, np.int64))], axis=0, reduction="add")
        rows = b.op("Slice", [b.op("CumSum", [marker, axis0]), b.const("start", np.array([0], np.int64)),
                              b.const("stop", np.array([nnz], np.int64))])
        cols = b.op("Cast", [b.const("col_idx", _np(enc["col_idx"]))], to=i64)
        pos = b.op("Add", [b.op("Mul", [b.op("Sub", [rows, b.const("one", np.array(1, np.int64))]),
                                        b.const("n", np.array(n, np.int64))]), cols])
        hits = b.op("ScatterElements", [b.const("mask0", np.zeros(m * n, np.int64)), pos,
                                        b.const("hit", np.ones(nnz, np.int64))], axis=0)
        mask = b.op("Cast", [hits], to=TensorProto.BOOL)
    order = b.op("Sub", [b.op("CumSum", [b.op("Cast", [mask], to=i64), axis0]), b.const("one_", np.array(1, np.int64))])
    order = b.op("Max", [order, b.const("zero_i", np.array(0, np.int64))])
    return mask, order


def _sparse_transposed(b: _Builder, layer: CompressedLinear, enc: dict[str, torch.Tensor], kind: str,
                       dtype: np.dtype) -> str:
    """S^T (in x out) rebuilt from its stored encoding; quantized kept codes are decoded on the dense grid
    (each code takes its row's and group's scale) and then masked."""
    m, n = layer.out_features, layer.in_features
    mask, order = _mask_and_order(b, layer, enc, kind)
    zero = b.const("zero", np.zeros((), dtype))
    qw = layer.quant.get("weight")
    if qw is None:
        values = b.const("values", _np(enc["values"]).astype(dtype))
        dense = b.op("Where", [mask, b.op("Gather", [values, order], axis=0), zero])
    else:
        kept = _unpacked_codes(b, "values", enc["values_codes"], qw.bits, layer.nnz())
        grid = b.op("Gather", [kept, order], axis=0)  # codes on the dense grid (any code where pruned)
        w = _quant_matrix(b, "values", enc, qw, m, n, dtype, codes=grid)
        dense = b.op("Where", [mask, b.op("Reshape", [w, b.const("flat_w", np.array([-1], np.int64))]), zero])
    return b.op("Transpose", [b.op("Reshape", [dense, b.const("shape", np.array([m, n], np.int64))])], perm=[1, 0])


def _unpacked_codes(b: _Builder, key: str, packed: torch.Tensor, bits: int, count: int) -> str:
    """uint8 codes (flat, ``count``) from ``pack_codes`` bytes: bit planes, most significant bit first."""
    from onnx import TensorProto

    data = b.const(f"{key}_codes", _np(packed))
    if bits == 8:
        return data
    planes = b.op("BitwiseAnd", [b.op("Unsqueeze", [data, b.const(f"{key}_ax1", np.array([1], np.int64))]),
                                 b.const(f"{key}_bitw", np.array([[128, 64, 32, 16, 8, 4, 2, 1]], np.uint8))])
    planes = b.op("Cast", [b.op("Cast", [planes], to=TensorProto.BOOL)], to=TensorProto.INT32)
    planes = b.op("Slice", [b.op("Reshape", [planes, b.const(f"{key}_flat", np.array([-1], np.int64))]),
                            b.const(f"{key}_s0", np.array([0], np.int64)),
                            b.const(f"{key}_s1", np.array([count * bits], np.int64))])
    planes = b.op("Reshape", [planes, b.const(f"{key}_cb", np.array([count, bits], np.int64))])
    weights = b.const(f"{key}_pw", np.array([1 << k for k in range(bits - 1, -1, -1)], np.int32))
    codes = b.op("ReduceSum", [b.op("Mul", [planes, weights]), b.const(f"{key}_ax", np.array([1], np.int64))],
                 keepdims=0)
    return b.op("Cast", [codes], to=TensorProto.UINT8)


def _dequantized(b: _Builder, key: str, enc: dict[str, torch.Tensor], q: Any, codes: str, rows: int,
                 cols: int) -> str:
    """``DequantizeLinear`` of uint8 ``codes`` (rows x cols, flat) with the part's per-group scales and zero points.

    A group of ``g`` columns is one row of a (rows * groups) x g view, so per-axis
    ``DequantizeLinear`` (opset 13) covers per-row and grouped formats alike.
    """
    from onnx import TensorProto, helper

    g = q.group_size
    ng = -(-cols // g)
    pad = ng * g - cols
    x = b.op("Reshape", [codes, b.const(f"{key}_rc", np.array([rows, cols], np.int64))])
    if pad:
        x = b.op("Pad", [x, b.const(f"{key}_pad", np.array([0, 0, 0, pad], np.int64))])
    x = b.op("Reshape", [x, b.const(f"{key}_gv", np.array([rows * ng, g], np.int64))])
    scale = b.op("Cast", [b.op("Reshape", [b.const(f"{key}_scale", _np(enc[f"{key}_scale"])),
                                           b.const(f"{key}_sv", np.array([rows * ng], np.int64))])],
                 to=TensorProto.FLOAT)
    if q.zero is None:  # symmetric: the fixed zero point 2^(bits-1)
        zero = b.op("ConstantOfShape", [b.const(f"{key}_zn", np.array([rows * ng], np.int64))],
                    value=helper.make_tensor("z", TensorProto.UINT8, [1], [1 << (q.bits - 1)]))
    else:
        zero = _unpacked_codes(b, f"{key}_zero", enc[f"{key}_zero"], q.bits, rows * ng)
    w = b.op("DequantizeLinear", [x, scale, zero], axis=0)
    w = b.op("Reshape", [w, b.const(f"{key}_ow", np.array([rows, ng * g], np.int64))])
    if pad:
        w = b.op("Slice", [w, b.const(f"{key}_c0", np.array([0], np.int64)),
                           b.const(f"{key}_c1", np.array([cols], np.int64)),
                           b.const(f"{key}_c2", np.array([1], np.int64))])
    return w


def _quant_matrix(b: _Builder, key: str, enc: dict[str, torch.Tensor], q: Any, rows: int, cols: int,
                  dtype: np.dtype, codes: str | None = None) -> str:
    """A quantized part (rows x cols) decoded in-graph, as ``dtype`` (``codes``: uint8 already unpacked)."""
    from onnx import TensorProto

    if codes is None:
        codes = _unpacked_codes(b, key, enc[f"{key}_codes"], q.bits, rows * cols)
    w = _dequantized(b, key, enc, q, codes, rows, cols)
    return w if dtype == np.float32 else b.op("Cast", [w], to=TensorProto.FLOAT16)


def _token_quantized(b: _Builder, x: str) -> tuple[str, str]:
    """Per-token symmetric int8 codes of ``x``, held as uint8 ``code + 128``, and their float scales, as
    :func:`~.kernels.quantize_tokens` computes them (``max|x| / 127`` per row, round half to even): the same
    codes bit for bit. ONNX Runtime's integer GEMM is fast for uint8 x int8 (with the activation zero point
    128), not int8 x int8 (measured 2.3 ms against 42 ms for 400 x 768 x 3072 on one thread)."""
    from onnx import TensorProto

    amax = b.op("ReduceMax", [b.op("Abs", [x]), b.const("last_axis", np.array([-1], np.int64))], keepdims=1)
    scale = b.op("Max", [b.op("Div", [amax, b.const("c127", np.array(127.0, np.float32))]),
                         b.const("tiny", np.array(np.finfo(np.float32).tiny, np.float32))])
    rounded = b.op("Round", [b.op("Div", [x, scale])])
    rounded = b.op("Clip", [rounded, b.const("lo", np.array(-127.0, np.float32)),
                            b.const("hi", np.array(127.0, np.float32))])
    shifted = b.op("Add", [rounded, b.const("c128", np.array(128.0, np.float32))])
    return b.op("Cast", [shifted], to=TensorProto.UINT8), scale


def _int8_transposed(b: _Builder, key: str, enc: dict[str, torch.Tensor], q: Any, rows: int, cols: int) -> str:
    """Signed codes ``code - 2**(bits-1)`` of a symmetric per-row part as int8, transposed (cols x rows);
    unpacked from the stored bytes by ops ONNX Runtime folds once, at load."""
    from onnx import TensorProto

    codes = _unpacked_codes(b, key, enc[f"{key}_codes"], q.bits, rows * cols)
    signed = b.op("Sub", [b.op("Cast", [codes], to=TensorProto.INT16),
                          b.const(f"{key}_half", np.array(1 << (q.bits - 1), np.int16))])
    signed = b.op("Reshape", [b.op("Cast", [signed], to=TensorProto.INT8),
                              b.const(f"{key}_rc8", np.array([rows, cols], np.int64))])
    return b.op("Transpose", [signed], perm=[1, 0])


def _integer_product(b: _Builder, key: str, enc: dict[str, torch.Tensor], q: Any, rows: int, cols: int,
                     xq: str, xs: str) -> str:
    """``(x_q W_q^T) * x_scale * w_scale`` through ``MatMulInteger`` (int8 x int8, int32 accumulation)."""
    from onnx import TensorProto

    acc = b.op("MatMulInteger", [xq, _int8_transposed(b, key, enc, q, rows, cols),
                                 b.const(f"{key}_xzero", np.array(128, np.uint8))])
    w_scale = b.const(f"{key}_rowscale", _np(q.scale[:, 0].float()))
    return b.op("Mul", [b.op("Mul", [b.op("Cast", [acc], to=TensorProto.FLOAT), xs]), w_scale])


def _nbits_block(q: Any, cols: int) -> int | None:
    """The ``MatMulNBits`` block size for a part's groups (a power of two from 16 dividing ``cols``), if any.

    4-bit codes only: ONNX Runtime's 8-bit ``MatMulNBits`` with float activations (``accuracy_level`` 0,
    the layer's own arithmetic) measured 40x slower than the dense MatMul at one token; 8-bit codes
    go through ``DequantizeLinear`` instead."""
    if q.bits != 4:
        return None
    if q.group_size < cols:
        return q.group_size if cols % q.group_size == 0 else None
    return next((blk for blk in (256, 128, 64, 32, 16) if cols % blk == 0), None)


def _matmul_nbits(b: _Builder, key: str, layer: CompressedLinear, q: Any, x: str, block: int) -> str:
    """``x W^T`` of a dense quantized S as one ``MatMulNBits`` (ONNX Runtime's contrib op): the codes stay in
    memory, packed as it wants them (low nibble first), and are decoded block by block in the product."""
    rows, cols = layer.out_features, layer.in_features
    codes = q.grid_codes().cpu().numpy().astype(np.uint8)  # rows x cols
    blocks = cols // block
    grouped = codes.reshape(rows, blocks, block)
    blob = (grouped[..., 0::2] | (grouped[..., 1::2] << 4)).astype(np.uint8) if q.bits == 4 else grouped
    per_group = q.group_size < cols
    scales = q.scale.float().cpu().numpy()
    scales = scales if per_group else np.repeat(scales[:, :1], blocks, axis=1)
    inputs = [x, b.const(f"{key}_nbits", np.ascontiguousarray(blob)),
              b.const(f"{key}_nscale", np.ascontiguousarray(scales.reshape(-1).astype(np.float32)))]
    if q.zero is not None:
        zero = q.zero.cpu().numpy().astype(np.uint8)
        zero = zero if per_group else np.repeat(zero[:, :1], blocks, axis=1)
        if q.bits == 4:
            if blocks % 2:
                zero = np.concatenate([zero, np.zeros((rows, 1), np.uint8)], axis=1)
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        inputs.append(b.const(f"{key}_nzero", np.ascontiguousarray(zero.reshape(-1))))
    out = b.name()
    from onnx import helper

    b.nodes.append(helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft", K=cols, N=rows,
                                    bits=q.bits, block_size=block))
    return out


def layer_subgraph(name: str, layer: CompressedLinear, x: str, y: str, short: str = "cl",
                   weight_only: str = "matmulnbits") -> tuple[list[Any], list[Any]]:
    """Nodes and initializers computing ``y = a_out * ((S + B A) q(a_in * x)) + bias`` from compact tensors.

    A layer with int8 activations whose codes allow an integer GEMM (symmetric per-row) runs
    ``MatMulInteger`` on per-token int8 inputs (:func:`_token_quantized`), as the ``w8a8`` kernel does;
    one with int8 activations and other codes rounds its input the same way and multiplies in float.
    A dense S of 4-bit codes without quantized activations is one ``MatMulNBits``
    (``weight_only="matmulnbits"``) or, with ``"dequantize"``, decoded by ``DequantizeLinear``
    (folded into a float matrix at load when the session sets ``session.disable_quant_qdq``).
    """
    b = _Builder(name, short)
    dtype = np.float32 if layer.dtype in (torch.float32, torch.bfloat16) else np.float16
    enc = encode_layer(layer)
    kind = choose_encoding(layer)
    m, n = layer.out_features, layer.in_features
    qw = layer.quant.get("weight")
    if layer.a_in is not None:
        x = b.op("Mul", [x, b.const("a_in", _np(layer.a_in).astype(dtype))])
    xq = xs = None
    if layer.act_bits == 8:
        xq, xs = _token_quantized(b, x if dtype == np.float32 else b.op("Cast", [x], to=1))
        if layer.execution_support("w8a8") is not None or dtype != np.float32:
            # no integer GEMM for these codes (or a float16 graph): the input rounded the same way, in float
            x = b.op("Mul", [b.op("Sub", [b.op("Cast", [xq], to=1), b.const("f128", np.array(128.0, np.float32))]),
                             xs])
            x = x if dtype == np.float32 else b.op("Cast", [x], to=10)
            xq = None
    terms = []
    if layer.base is not None:  # delta layers: the frozen base has no compact form; S is folded into it
        terms.append(b.op("MatMul", [x, b.const("weight_T", _np((layer.base + layer.sparse_part()).t())
                                                .astype(dtype))]))
    elif kind == "dense" and qw is not None and xq is not None:
        terms.append(_integer_product(b, "dense", enc, qw, m, n, xq, xs))
    elif kind == "dense" and qw is not None and weight_only == "matmulnbits" and dtype == np.float32 and (
            _nbits_block(qw, n) is not None):
        terms.append(_matmul_nbits(b, "dense", layer, qw, x, _nbits_block(qw, n)))
    elif kind == "dense" and qw is not None:
        w = _quant_matrix(b, "dense", enc, qw, m, n, dtype)
        terms.append(b.op("MatMul", [x, b.op("Transpose", [w], perm=[1, 0])]))
    elif kind == "dense":
        terms.append(b.op("MatMul", [x, b.const("weight_T", _np(layer.weight.t()).astype(dtype))]))
    elif kind in ("bitmask", "csr") and layer.nnz() > 0:
        terms.append(b.op("MatMul", [x, _sparse_transposed(b, layer, enc, kind, dtype)]))
    if layer.rank:
        r = layer.rank
        qa, qb = layer.quant.get("lr_A"), layer.quant.get("lr_B")
        if xq is not None:
            z = _integer_product(b, "A", enc, qa, r, n, xq, xs)
        else:
            a = _quant_matrix(b, "A", enc, qa, r, n, dtype) if qa is not None else None
            z = b.op("MatMul", [x, b.op("Transpose", [a], perm=[1, 0]) if a else
                                b.const("A_T", _np(layer.lr_A.t()).astype(dtype))])
        bm = _quant_matrix(b, "B", enc, qb, m, r, dtype) if qb is not None else None
        terms.append(b.op("MatMul", [z, b.op("Transpose", [bm], perm=[1, 0]) if bm else
                                     b.const("B_T", _np(layer.lr_B.t()).astype(dtype))]))
    if not terms:  # nothing multiplies the input (every entry pruned, or a bias-only layer): zeros of the output
        shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [x]), b.const("s0", np.array([0], np.int64)),
                                               b.const("s1", np.array([-1], np.int64))]),
                                b.const("out_dim", np.array([m], np.int64))], axis=0)
        terms.append(b.op("ConstantOfShape", [shape], value=_zero_value(dtype)))
    out = terms[0] if len(terms) == 1 else b.op("Sum", terms)
    if layer.a_out is not None:
        out = b.op("Mul", [out, b.const("a_out", _np(layer.a_out).astype(dtype))])
    if layer.bias is not None:
        out = b.op("Add", [out, b.const("bias", _np(layer.bias).astype(dtype))])
    b.op("Identity", [out], out=y)
    return b.nodes, b.inits


def _zero_value(dtype: np.dtype) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor("zero", TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16, [1], [0.0])


def expand_placeholders(proto: Any, layers: dict[str, CompressedLinear], weight_only: str = "matmulnbits") -> Any:
    """Replace every ``rcc::CompressedLinear`` node of ``proto`` by its compact subgraph (in place)."""
    graph = proto.graph
    nodes = list(graph.node)
    del graph.node[:]
    for i, node in enumerate(nodes):
        if node.domain != DOMAIN:
            graph.node.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "layer")
        new_nodes, inits = layer_subgraph(name, layers[name], node.input[0], node.output[0], f"rcc{i}", weight_only)
        graph.node.extend(new_nodes)
        graph.initializer.extend(inits)
    _compact_names(graph)
    keep = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    if any(n.domain == CONTRIB for n in graph.node) and not any(o.domain == CONTRIB for o in keep):
        from onnx import helper

        proto.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return proto


def _compact_names(graph: Any) -> None:
    """Short intermediate value names, no node names or doc strings: a tiny model's graph text would
    otherwise outweigh its compressed tensors (graph inputs, outputs and initializers keep their names)."""
    if any(a.g.node or a.graphs for n in graph.node for a in n.attribute):
        return  # subgraphs (If/Loop) may refer to outer names: leave the names alone
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    rename: dict[str, str] = {}
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name and name not in fixed:
                rename[name] = node.output[i] = f"v{len(rename)}"
    del graph.value_info[:]


# ------------------------------------------------------------------------------ CLIP graphs
class _ClipImage(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        proj = getattr(self.model, "visual_projection", None)  # SigLIP's pooled output is its embedding
        return proj(pooled) if proj is not None else pooled


class _ClipText(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        proj = getattr(self.model, "text_projection", None)
        return proj(pooled) if proj is not None else pooled


class _BlipVision(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state


class _BlipDecoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=encoder_hidden_states, use_cache=False,
                                       return_dict=True).logits


def _graphs(wrapper: Any, batch: int) -> list[dict[str, Any]]:
    """The graphs to export for a wrapper: module, example inputs, names, dynamic axes."""
    sb = wrapper.synthetic_batch(batch, torch.Generator().manual_seed(0))
    ids = sb["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, ids.shape[1] // 2:] = 0  # a padded row, so the exported graph is checked on padding too
    seq = {0: "batch", 1: "sequence"}
    if wrapper.model_type == "llava":
        raise CheckpointError(
            "ONNX export of a LLaVA-style generative model is not supported: it needs the language model exported "
            "with key/value-cache inputs and outputs and the image features written into its input embeddings, "
            "which this exporter does not build (use --format hf for a dense Hugging Face directory)")
    if wrapper.model_type in ("clip", "siglip"):
        return [
            {"file": "vision_model.onnx", "module": _ClipImage(wrapper.model), "inputs": (sb["pixel_values"],),
             "input_names": ["pixel_values"], "output_names": ["image_embeds"],
             "dynamic_axes": {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}},
            {"file": "text_model.onnx", "module": _ClipText(wrapper.model), "inputs": (ids, mask),
             "input_names": ["input_ids", "attention_mask"], "output_names": ["text_embeds"],
             "dynamic_axes": {"input_ids": seq, "attention_mask": seq, "text_embeds": {0: "batch"}}},
        ]
    if wrapper.model_type == "blip" and not getattr(wrapper, "is_vqa", False):
        with torch.no_grad():
            image = _BlipVision(wrapper.model).eval()(sb["pixel_values"])
        return [
            {"file": "vision_model.onnx", "module": _BlipVision(wrapper.model), "inputs": (sb["pixel_values"],),
             "input_names": ["pixel_values"], "output_names": ["image_embeds"],
             "dynamic_axes": {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}},
            {"file": "text_decoder.onnx", "module": _BlipDecoder(wrapper.model), "inputs": (ids, mask, image),
             "input_names": ["input_ids", "attention_mask", "encoder_hidden_states"], "output_names": ["logits"],
             "dynamic_axes": {"input_ids": seq, "attention_mask": seq, "encoder_hidden_states": {0: "batch"},
                              "logits": seq}},
        ]
    raise CheckpointError(f"ONNX export supports CLIP, SigLIP and captioning BLIP; this is "
                          f"{type(wrapper.model).__name__} "
                          "(use --format hf for a dense Hugging Face directory)")


def onnx_greedy_caption(directory: str | os.PathLike[str], pixel_values: np.ndarray, max_length: int = 20,
                        threads: int | None = None) -> np.ndarray:
    """Greedy captions of an exported BLIP with ONNX Runtime alone: token ids (batch x <= max_length).

    Decoding starts from the decoder's BOS and stops at EOS, as ``generate`` does; finished rows
    are padded with the pad id. The token ids come from ``onnx_manifest.json``.
    """
    import json

    directory = Path(directory)
    tokens = json.loads((directory / MANIFEST).read_text())["tokens"]
    image = ort_session(directory / "vision_model.onnx", threads).run(None, {"pixel_values": pixel_values})[0]
    decoder = ort_session(directory / "text_decoder.onnx", threads)
    ids = np.full((pixel_values.shape[0], 1), tokens["bos"], np.int64)
    done = np.zeros(pixel_values.shape[0], bool)
    while ids.shape[1] < max_length and not done.all():
        logits = decoder.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                    "encoder_hidden_states": image})[0]
        nxt = np.where(done, tokens["pad"], logits[:, -1].argmax(-1))
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        done |= nxt == tokens["eos"]
    return ids


def _export_graph(spec: dict[str, Any], opset: int, weight_only: str = "matmulnbits") -> Any:
    onnx, _ = _require_onnx()
    module = spec["module"].eval()
    with _placeholders(module.model) as layers, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.onnx.export(module, spec["inputs"], buf, input_names=spec["input_names"],
                          output_names=spec["output_names"], dynamic_axes=spec["dynamic_axes"],
                          opset_version=opset, do_constant_folding=True, dynamo=False,
                          custom_opsets={DOMAIN: 1} if layers else None)
        proto = onnx.load_from_string(buf.getvalue())
        expand_placeholders(proto, layers, weight_only)
    onnx.checker.check_model(proto)
    return proto


def run_onnx(path: str | os.PathLike[str], inputs: dict[str, np.ndarray], threads: int | None = None) -> np.ndarray:
    """Run one exported graph with ONNX Runtime on the CPU; returns its first output."""
    return ort_session(path, threads).run(None, inputs)[0]


def ort_session(path: str | os.PathLike[str], threads: int | None = None, decode_at_load: bool = True) -> Any:
    """An ONNX Runtime CPU session for an exported graph (all graph optimisations on).

    ``decode_at_load`` lets ONNX Runtime fold ``DequantizeLinear`` of quantized weights once, at load
    (float weights in memory, float speed); without it the codes stay in memory and are decoded on
    every call (ONNX Runtime keeps Q/DQ nodes by default).
    """
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - optional dependency
        raise CheckpointError("checking ONNX needs onnxruntime: pip install rcc-compression[export]") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if decode_at_load:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(wrapper: Any, path: str | os.PathLike[str], opset: int = OPSET, batch: int = 2,
                verify: bool = True, overwrite: bool = False, extra: dict[str, Any] | None = None,
                weight_only: str = "matmulnbits") -> dict[str, Any]:
    """Export a (compressed) CLIP wrapper to ONNX in ``path``; returns the written manifest.

    With ``verify`` each graph runs in ONNX Runtime on the example inputs and the largest absolute
    difference to PyTorch is recorded; above :data:`TOLERANCE` (float32) the export fails. A
    bfloat16 model (which ONNX Runtime's CPU kernels do not take) is exported in float32, its codes
    unchanged; the manifest says so. ``weight_only`` is how dense 4-bit codes without quantized
    activations are exported: ``matmulnbits`` (codes in memory, ONNX Runtime's ``MatMulNBits``)
    or ``dequantize`` (``DequantizeLinear``, a float matrix once the session folds it).
    """
    if weight_only not in ("matmulnbits", "dequantize"):
        raise ValueError(f"weight_only must be 'matmulnbits' or 'dequantize', got {weight_only!r}")
    path = Path(path)
    _check_target(path, overwrite)
    model_dtype = next((p.dtype for p in wrapper.model.parameters() if p.is_floating_point()), torch.float32)
    if model_dtype == torch.bfloat16:
        wrapper = copy.deepcopy(wrapper).to(torch.float32)
    specs = _graphs(wrapper, batch)
    quantized_inputs = any(m.act_bits for m in compressed_layers(wrapper.model).values())
    was_training = wrapper.model.training
    wrapper.model.eval()
    records: dict[str, Any] = {}
    try:
        with atomic_dir(path) as stage:
            for spec in specs:
                proto = _export_graph(spec, opset, weight_only)
                f = stage / spec["file"]
                _save(proto, f)
                rec: dict[str, Any] = {"inputs": spec["input_names"], "outputs": spec["output_names"]}
                if verify:
                    feed = {n: _np(t) for n, t in zip(spec["input_names"], spec["inputs"], strict=True)}
                    with torch.no_grad():
                        ref = _np(spec["module"](*spec["inputs"]))
                    got = run_onnx(f, feed)
                    diff = float(np.abs(got - ref).max())
                    rel = float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-30))
                    if quantized_inputs:  # a code a float rounding apart flips: compared as a relative error
                        if not rel <= TOLERANCE_ACTIVATIONS:
                            raise CheckpointError(f"{spec['file']}: ONNX Runtime differs from PyTorch by {rel:.3g} "
                                                  f"relative (tolerance {TOLERANCE_ACTIVATIONS:g})")
                    elif not diff <= (TOLERANCE if ref.dtype == np.float32 else 1e-2):
                        raise CheckpointError(f"{spec['file']}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                                              f"(tolerance {TOLERANCE if ref.dtype == np.float32 else 1e-2:g})")
                    rec["max_abs_diff"] = diff
                    rec["relative_error"] = rel
                records[spec["file"]] = rec
            wrapper.save_processors(stage / "processor")
            files = {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in sorted(stage.rglob("*")) if p.is_file() and not p.name.startswith(".")}
            manifest = {
                "format": "rcc-onnx", "format_version": 1,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model_type": wrapper.model_type, "opset": opset, "graphs": records, "files": files,
                "logit_scale": float(wrapper.logit_scale.detach()) if hasattr(wrapper, "logit_scale") else None,
                "logit_bias": float(wrapper.logit_bias.detach()) if hasattr(wrapper, "logit_bias") else None,
                "tokens": _blip_tokens(wrapper) if wrapper.model_type == "blip" else None,
                "compressed_layers": len(compressed_layers(wrapper.model)),
                "model_dtype": str(model_dtype).removeprefix("torch."),
                "graph_dtype": "float32" if model_dtype == torch.bfloat16 else str(model_dtype).removeprefix("torch."),
                "weight_only": weight_only,
                "onnx_bytes": sum(v["bytes"] for k, v in files.items() if k.endswith(".onnx")),
                **(extra or {}),
            }
            atomic_write_json(stage / MANIFEST, manifest)
    finally:
        wrapper.model.train(was_training)
    return manifest


def _blip_tokens(wrapper: Any) -> dict[str, int | None]:
    tc = wrapper.model.config.text_config
    eos = getattr(tc, "sep_token_id", None)
    return {"bos": tc.bos_token_id, "eos": eos if eos is not None else tc.eos_token_id, "pad": tc.pad_token_id}


def _save(proto: Any, f: Path) -> None:
    onnx, _ = _require_onnx()
    if proto.ByteSize() < 1_800_000_000:
        onnx.save_model(proto, str(f))
    else:  # protobuf's 2 GB limit: tensors go to a side file
        onnx.save_model(proto, str(f), save_as_external_data=True, location=f.name + ".data")
