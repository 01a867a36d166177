"""Stage ``quant``: weight-only integer quantization of S and of the low-rank factors.

Each quantized part (the dense or sparse S, the factors ``A`` and ``B``) is stored as ``bits``-bit
codes (8, 4, 3 or 2) with one float16 scale per row, or per group of 32, 64 or 128 columns, and
optionally one zero point per group: ``value = scale * (code - zero)``. Codes are bit-packed on
disk; a sparse S stores codes only for its kept entries (its mask is kept), and factors keep their
rank. Rounding is ``nearest`` or ``gptq``.

GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023; reference code ``gptq.py``): columns are rounded
one at a time and the error of each is spread over the columns not yet rounded through the
upper Cholesky factor of ``H^-1``, ``H = X^T X`` the layer's calibration input second moment
(the one the engine already streams), damped by 1 % of its mean diagonal; updates are applied
lazily per block of 128 columns, optionally in descending ``diag(H)`` order (``act_order``, with
the group grid fixed from the unrounded weights, the reference's ``static_groups``).
Departures: inputs the data never reaches keep their weights (the reference zeroes them) and are
rounded alone; a group's grid is found from its columns as compensated so far inside the block;
on a sparse S pruned entries stay zero and their share of the compensation is passed on to the
kept entries after them (SparseGPT's masked update, with the mask fixed); factor ``A`` is rounded
against ``H`` and factor ``B`` against its own input moment ``A_q H A_q^T`` after ``B`` is re-solved
by least squares against what S + B A computed before rounding (``correct_factors``), so the
low-rank part absorbs the rounding error of S and of ``A`` where that lowers the output error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from ..errors import CompressionError
from ..utils.io import tensor_digest
from ..utils.schema import StrictModel
from .calibration import collect_layer_stats
from .layers import CompressedLinear, QuantizedPart, code_bytes, pack_codes, unpack_codes  # noqa: F401 - re-exported
from .stage import CompressionContext, Stage, StageConfig

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
_SCALE_MAX = 65504.0  # largest float16
_SCALE_MIN = 2.0 ** -24  # smallest float16 subnormal

Bits = Literal[2, 3, 4, 8]
GroupSize = Literal[32, 64, 128]


Activations = Literal["none", "int8"]


class LayerQuant(StrictModel):
    """The format of one layer (what a planner writes into ``quant.layers``)."""

    bits: Bits | None = Field(8, description="bits of S; None: S stays float")
    factor_bits: Bits | None = Field(None, description="bits of the low-rank factors; None: as bits")
    group_size: GroupSize | None = Field(None, description="columns per scale; None: one scale per row")
    symmetric: bool = True
    activations: Activations | None = Field(None, description="int8: the layer's input quantized per token "
                                            "(within activation_error); None: the stage's setting")


class QuantConfig(StageConfig):
    """Keys of the ``quant`` stage."""

    bits: Bits = Field(8, description="bits per code of S (and of the factors unless factor_bits says otherwise): "
                       "8, 4, 3 or 2")
    factor_bits: Bits | None = Field(None, description="bits of the low-rank factors; None: as bits")
    group_size: GroupSize | None = Field(None, description="columns per scale; None: one scale per row (per channel)")
    symmetric: bool = Field(True, description="False: a zero point per group (asymmetric range)")
    rounding: Literal["nearest", "gptq"] = Field(
        "gptq",
        description="nearest, or gptq (error-compensating rounding; needs calibration data)")
    damping: float = Field(0.01, ge=0.0, description="gptq: ridge as a share of the mean diagonal of H")
    block_size: int = Field(128, ge=1, description="gptq: columns per lazy block update")
    act_order: bool = Field(False, description="gptq: round columns in descending order of diag(H)")
    clip_search: bool = Field(False, description="shrink each group's range where that lowers its rounding error")
    quantize_factors: bool = Field(True, description="also store the low-rank factors as integer codes")
    correct_factors: bool = Field(
        True, description="re-solve B on the rounded S and A before rounding B (needs calibration data)")
    layers: dict[str, LayerQuant] | None = Field(
        None, description="per-layer formats by module name (a plan): layers not named are left alone")
    activations: Activations = Field(
        "none", description="int8: quantize each layer's input per token (dynamic scales) where the added output "
        "error stays within activation_error and the weights allow an int8 GEMM (symmetric per-row codes); "
        "none: float activations (weight-only)")
    activation_error: float = Field(
        2e-3, ge=0.0, description="the most relative output error (squared-norm ratio, as output_error) int8 "
        "activations may add to a layer, measured on calibration inputs; layers above keep float activations")
    smoothing: float | None = Field(
        None, ge=0.0, le=1.0, description="SmoothQuant's migration strength alpha for layers with int8 activations "
        "(activation outliers moved into the weights before rounding; 0.5 in the paper); None: off")
    activation_batches: int = Field(4, ge=1, description="calibration batches the activation error is measured on")
    inputs: Literal["dense", "sequential"] = Field(
        "dense", description="the inputs GPTQ's second moments are taken on: the dense model's, or (sequential, as "
        "the GPTQ reference does) those the model rounded so far produces, sequential_group layers at a time")
    sequential_group: int = Field(6, ge=1, description="inputs sequential: consecutive layers whose second moments "
                                  "one calibration pass reads (6: about a transformer block; they see the inputs "
                                  "the prefix before the group produces)")


# ------------------------------------------------------------------------------ pure functions
def groups_of(cols: int, group_size: int | None) -> tuple[int, int]:
    """``(group size, number of groups)`` for ``cols`` columns (``None``: one group per row)."""
    g = cols if not group_size or group_size >= cols else int(group_size)
    return g, math.ceil(cols / g)


def _expand(t: torch.Tensor, g: int, cols: int) -> torch.Tensor:
    return t.repeat_interleave(g, dim=1)[:, :cols]


def _finish_scale(scale: torch.Tensor) -> torch.Tensor:
    """float16 scales; an all-zero group gets scale 1 (its codes all sit on the zero point)."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(max=_SCALE_MAX)
    return scale.half().clamp_min(_SCALE_MIN)


def grid(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
         mask: torch.Tensor | None = None, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (float16, rows x groups) and zero points (uint8, or ``None`` when symmetric) for ``w``.

    The range of each group includes zero (GPTQ's convention); entries outside ``mask`` do not
    count. Symmetric: ``scale = 2 max|w| / (2^b - 1)`` around the fixed zero point ``2^(b-1)``.
    ``clip_search`` shrinks each group's range (``p`` from 1 down to 0.2) where the rounding error
    ``sum |w - q|^2.4`` is lower (the reference's ``mse`` option).
    """
    rows, cols = w.shape
    g, ng = groups_of(cols, group_size)
    wf = w.float() if mask is None else w.float() * mask
    pad = ng * g - cols
    if pad:
        wf = torch.cat([wf, wf.new_zeros(rows, pad)], 1)
    wg = wf.view(rows, ng, g)
    xmax = wg.amax(-1).clamp_min(0)
    xmin = wg.amin(-1).clamp_max(0)
    if symmetric:
        xmax = torch.maximum(xmax, -xmin)
        xmin = -xmax
    maxq = 2**bits - 1

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = _finish_scale((hi - lo) / maxq)
        if symmetric:
            return scale, None
        zero = torch.clamp(torch.round(-lo / scale.float()), 0, maxq).to(torch.uint8)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if clip_search:
        keep = None if mask is None else torch.cat([mask, mask.new_zeros(rows, pad)], 1).view(rows, ng, g)

        def err(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            sf = s.float().unsqueeze(-1)
            zf = (torch.full_like(s, 2 ** (bits - 1), dtype=torch.float32) if z is None else z.float()).unsqueeze(-1)
            q = (torch.clamp(torch.round(wg / sf) + zf, 0, maxq) - zf) * sf
            e = (wg - q).abs().pow(2.4)
            return (e if keep is None else e * keep).sum(-1)

        best = err(scale, zero)
        for p in torch.linspace(0.95, 0.2, 16).tolist():
            s, z = params(xmin * p, xmax * p)
            e = err(s, z)
            better = e < best
            best = torch.where(better, e, best)
            scale = torch.where(better, s, scale)
            if zero is not None:
                zero = torch.where(better, z, zero)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                  group_size: int | None = None) -> torch.Tensor:
    """Nearest codes (uint8) of ``w`` on the grid ``scale``/``zero``."""
    cols = w.shape[1]
    g, _ = groups_of(cols, group_size)
    s = _expand(scale.float(), g, cols)
    z = float(2 ** (bits - 1)) if zero is None else _expand(zero.float(), g, cols)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.uint8)


def quantize_nearest(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                     mask: torch.Tensor | None = None, clip_search: bool = False) -> QuantizedPart:
    """Round-to-nearest quantization of ``w`` (rows x cols); codes outside ``mask`` are 0."""
    _check_bits(bits)
    g, _ = groups_of(w.shape[1], group_size)
    scale, zero = grid(w, bits, g, symmetric, mask, clip_search)
    codes = round_to_grid(w, scale, zero, bits, g)
    if mask is not None:
        codes = codes * mask.to(torch.uint8)
    return QuantizedPart(bits, g, codes, scale, zero, "nearest")


def damped_inverse(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, shift)``: ``U`` the upper Cholesky factor of ``(H + diag(shift))^-1`` (float64), what
    :func:`gptq_formats` rounds against, and ``shift`` (float64, per column) the diagonal it adds to ``H``:
    ``damping * mean(diag H)`` (raised tenfold while the factorisation fails), plus 1 on inputs never reached.

    GPTQ's column losses sum to each row's error under ``H + diag(shift)``; less the shift's share they are
    the error under ``H`` (what the planner scores, ``row_losses`` of :func:`gptq_formats`)."""
    H = hessian.double().clone()
    dead = H.diagonal() <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H.diagonal()[dead] = 1.0
    damp = damping * float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):
        added = max(damp, 1e-12) * (10.0**attempt)
        L, info = torch.linalg.cholesky_ex(H + added * eye)
        if int(info) == 0:
            shift = torch.full((H.shape[0],), added, dtype=H.dtype, device=H.device) + dead.to(H.dtype)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), shift
    raise CompressionError("gptq: the calibration second moment stays singular after damping")


def inverse_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) I)^-1`` (float64), inputs never reached made unit.

    Computed once per layer, it can be handed to every :func:`gptq_formats` call on that layer (``inverse=``)."""
    return damped_inverse(hessian, damping)[0]


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
         mask: torch.Tensor | None = None, damping: float = 0.01, block_size: int = 128, act_order: bool = False,
         clip_search: bool = False) -> QuantizedPart:
    """GPTQ rounding of ``w`` (rows x cols) against the input second moment ``hessian`` (cols x cols).

    Minimises ``||(W - Q) X^T||`` column by column (see the module docstring). With ``mask``,
    entries outside it are zero in the result and get code 0.
    """
    return gptq_formats(w, hessian, [(bits, group_size, symmetric)], mask, damping, block_size, act_order,
                        clip_search)[0]


@torch.no_grad()
def gptq_formats(w: torch.Tensor, hessian: torch.Tensor, formats: Sequence[tuple[int, int | None, bool]],
                 mask: torch.Tensor | None = None, damping: float = 0.01, block_size: int = 128,
                 act_order: bool = False, clip_search: bool = False, inverse: torch.Tensor | None = None,
                 row_losses: list[torch.Tensor] | None = None) -> list[QuantizedPart]:
    """:func:`gptq` for several ``(bits, group_size, symmetric)`` formats of one weight in one pass.

    The column order and the inverse Cholesky factor are the same for every format, so the copies
    are stacked row-wise and rounded together: one loop over the columns, whatever the number of
    formats (what the planner needs to weigh many formats of every layer). With ``row_losses`` (a
    list), each format's per-row sum of GPTQ's column losses is appended to it (float64, ``rows``):
    ``e H_d e^T`` for the row's rounding error ``e`` and the damped second moment ``H_d``
    (:func:`damped_inverse`), so the rounded weight's output error needs no ``rows x cols^2`` product.
    """
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise CompressionError(f"gptq: second moment of shape {tuple(hessian.shape)} for a weight with {cols} columns")
    k = len(formats)
    fmts = []
    for bits, group, sym in formats:
        _check_bits(bits)
        g, ng = groups_of(cols, group)
        fmts.append((bits, g, ng, sym))
    W = w.detach().float().repeat(k, 1)
    m = mask.float().repeat(k, 1) if mask is not None else None
    dev = W.device
    maxq = torch.cat([torch.full((rows,), 2.0**b - 1, device=dev) for b, _, _, _ in fmts])
    # static grids (one scale per row, or act_order's fixed groups) up front; the others per group in the loop
    static = [act_order or ng == 1 for _, _, ng, _ in fmts]
    scales = [torch.empty(rows, ng, dtype=torch.float16, device=dev) for _, _, ng, _ in fmts]
    zeros = [None if sym else torch.empty(rows, ng, dtype=torch.uint8, device=dev) for _, _, ng, sym in fmts]
    for f, (bits, g, _, sym) in enumerate(fmts):
        if static[f]:
            scales[f], zeros[f] = grid(w.detach().float(), bits, g, sym, mask, clip_search)
    perm = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else None
    H = hessian if perm is None else hessian[perm][:, perm]
    U = (inverse if (inverse is not None and perm is None) else inverse_factor(H, damping)).to(W.dtype)
    if perm is not None:
        W = W[:, perm]
        m = m[:, perm] if m is not None else None
    order = perm.tolist() if perm is not None else list(range(cols))
    codes = torch.zeros(k * rows, cols, dtype=torch.uint8, device=dev)
    block = max(block_size, 1)
    for _, g, _, _ in fmts:
        block = math.lcm(block, g) if g < cols else block
    block = min(block, cols) if all(static) else block
    s_cur = torch.empty(k * rows, device=dev)
    z_cur = torch.empty(k * rows, device=dev)

    def refresh(c: int, W1T: torch.Tensor, i: int) -> None:
        """Scales and zero points of the groups the column in position ``c`` belongs to."""
        col = order[c]
        for f, (bits, g, _, sym) in enumerate(fmts):
            sl = slice(f * rows, (f + 1) * rows)
            if static[f]:
                if c > 0 and (g == cols or perm is None and c % g):
                    continue
                grp = col // g
            else:
                if c % g:
                    continue
                grp = c // g  # a new group: its grid from its columns as compensated so far
                s_g, z_g = grid(W1T[i:i + g, sl].t(), bits, g, sym, None if m is None else m[sl, c:c + g].bool(),
                                clip_search)
                scales[f][:, grp] = s_g[:, 0]
                if zeros[f] is not None:
                    zeros[f][:, grp] = z_g[:, 0]
            s_cur[sl] = scales[f][:, grp].float()
            z_cur[sl] = zeros[f][:, grp].float() if zeros[f] is not None else float(2 ** (bits - 1))

    # columns as rows (cols x k*rows): each column is contiguous and the updates are row operations
    WT = W.t().contiguous()
    lo = torch.zeros_like(maxq)
    loss = torch.zeros(k * rows, dtype=torch.float64, device=dev) if row_losses is not None else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1T = WT[i1:i2].clone()
        Err1T = torch.zeros_like(W1T)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            refresh(c, W1T, i)
            wc = W1T[i]
            q = torch.clamp(torch.round(wc / s_cur) + z_cur, min=lo, max=maxq)
            deq = (q - z_cur) * s_cur
            if m is not None:
                deq = deq * m[:, c]
                q = q * m[:, c]
            codes[:, order[c]] = q.to(torch.uint8)
            err = (wc - deq) / U1[i, i]
            W1T[i:].addr_(U1[i, i:], err, alpha=-1.0)  # in place: no block x rows temporary per column
            Err1T[i] = err
        WT[i2:] -= U[i1:i2, i2:].t() @ Err1T
        if loss is not None:
            loss += Err1T.double().pow(2).sum(0)
    if row_losses is not None:
        row_losses.extend(loss[f * rows:(f + 1) * rows] for f in range(k))
    info = {"act_order": act_order, "damping": damping}
    return [QuantizedPart(bits, g, codes[f * rows:(f + 1) * rows].clone(), scales[f], zeros[f], "gptq", dict(info))
            for f, (bits, g, _, _) in enumerate(fmts)]


def relative_output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` (plain relative Frobenius error without ``H``).

    The products are float32 (their relative error, about 1e-6, is far below any error compared here), the
    sums float64."""
    W = w.detach().float()
    D = W - q.detach().to(W.device, torch.float32)
    if hessian is None:
        return float(D.double().pow(2).sum() / W.double().pow(2).sum().clamp_min(1e-300))
    H = hessian.to(W.device, torch.float32)
    return float(((D @ H) * D).double().sum() / ((W @ H) * W).double().sum().clamp_min(1e-300))


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||w||^2 / ||w - q||^2)`` in dB."""
    noise = float((w.double() - q.double()).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(float(w.double().pow(2).sum()) / noise)


def format_bytes(rows: int, cols: int, stored: int, bits: int, group_size: int | None, symmetric: bool) -> int:
    """Bytes of a quantized part: ``stored`` codes, float16 scales and packed zero points per group."""
    _, ng = groups_of(cols, group_size)
    return code_bytes(stored, bits) + rows * ng * 2 + (0 if symmetric else code_bytes(rows * ng, bits))


def part_bytes(q: QuantizedPart, stored: int) -> int:
    """Bytes a :class:`QuantizedPart` takes on disk when ``stored`` of its codes are kept."""
    rows, cols = q.shape
    return format_bytes(rows, cols, stored, q.bits, q.group_size, q.symmetric)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise CompressionError(f"unsupported bit width {bits}; allowed: {', '.join(map(str, BITS))}")


def quantize_weight(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int | None,
                    symmetric: bool, cfg: QuantConfig, mask: torch.Tensor | None = None,
                    inverse: torch.Tensor | None = None) -> QuantizedPart:
    """One part by the configured rounding (``gptq`` needs ``hessian``; ``inverse``: its Cholesky factor,
    :func:`inverse_factor`, when already computed)."""
    if cfg.rounding == "gptq":
        if hessian is None:
            raise CompressionError("quant rounding 'gptq' needs the calibration second moment")
        return gptq_formats(w, hessian, [(bits, group_size, symmetric)], mask, cfg.damping, cfg.block_size,
                            cfg.act_order, cfg.clip_search, inverse)[0]
    return quantize_nearest(w, bits, group_size, symmetric, mask, cfg.clip_search)


#: the keys that decide how a part is rounded (with its format and inputs)
ROUNDING_KEYS = {"rounding", "damping", "block_size", "act_order", "clip_search", "inputs", "sequential_group"}


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)``.

    Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
    Models", ICML 2023 (reference ``smooth.py``): dividing the activations by ``s`` and multiplying
    the weight columns by it leaves the product unchanged and moves activation outliers into the
    weights. Departure: a channel the calibration data never reaches (``max|X_j| = 0``), or whose
    weights are all zero, keeps ``s_j = 1`` instead of the reference's clamp to 1e-5.
    """
    a = act_max.float()
    w = weight_max.float()
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp_min(1e-5), torch.ones_like(s))


@torch.no_grad()
def activation_errors(teacher: torch.nn.Module, layers: dict[str, CompressedLinear], batches: list[dict[str, Any]],
                      device: torch.device) -> dict[str, float]:
    """Per layer, the relative output error (squared-norm ratio) int8 per-token activations add.

    Each layer is fed the inputs its dense counterpart in ``teacher`` receives on ``batches``
    (forward pre-hooks, streamed: nothing but two sums per layer is kept) and computed with and
    without quantizing them; the weights are the layer's own (already rounded) in both.
    """
    num = dict.fromkeys(layers, 0.0)
    den = dict.fromkeys(layers, 0.0)

    def make_hook(name: str):  # noqa: ANN202 - a forward pre-hook
        layer = layers[name]

        def hook(_mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].to(layer.dtype)
            keep = layer.act_bits
            layer.act_bits = None
            y = layer.forward_factored(x).float()
            layer.act_bits = 8
            yq = layer.forward_factored(x).float()
            layer.act_bits = keep
            num[name] += float((yq - y).pow(2).sum())
            den[name] += float(y.pow(2).sum())

        return hook

    handles = [teacher.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in layers]
    was_training = teacher.training
    teacher.eval()
    try:
        for batch in batches:
            teacher(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    return {n: num[n] / den[n] if den[n] > 0 else 0.0 for n in layers}


def corrected_factor(target: torch.Tensor, A_q: torch.Tensor, hessian: torch.Tensor, damping: float
                     ) -> torch.Tensor:
    """``B`` minimising ``||(T - B A_q) X^T||``: ``T H A_q^T (A_q H A_q^T + lambda I)^-1`` (float64)."""
    H, A = hessian.double(), A_q.double()
    HB = A @ H @ A.t()
    lam = damping * float(HB.diagonal().mean().clamp_min(1e-300))
    rhs = target.double() @ H @ A.t()
    eye = torch.eye(HB.shape[0], dtype=HB.dtype, device=HB.device)
    return torch.linalg.solve(HB + lam * eye, rhs.t()).t()


# ------------------------------------------------------------------------------ stage
class QuantStage(Stage):
    """Round S and the low-rank factors of the target layers to integer codes (final round only)."""

    name = "quant"
    config_class = QuantConfig
    config: QuantConfig

    planned = ("bits",)

    def apply_plan(self, layers: Mapping[str, Mapping[str, Any]], calibrated: bool) -> bool:
        self.config.layers = {
            n: LayerQuant(bits=v["bits"] if v.get("keep_s", True) else None, factor_bits=v.get("factor_bits"),
                          group_size=v.get("group_size"), symmetric=v.get("symmetric", True))
            for n, v in layers.items() if v.get("bits") is not None or v.get("factor_bits") is not None}
        return bool(self.config.layers)

    def layer_format(self, name: str) -> LayerQuant:
        """The format of layer ``name``: its entry in ``layers`` (float when a plan leaves it out), else the keys."""
        c = self.config
        if c.layers is not None:
            return c.layers.get(name, LayerQuant(bits=None))
        return LayerQuant(bits=c.bits, factor_bits=c.factor_bits, group_size=c.group_size, symmetric=c.symmetric)

    def target_description(self, progress: float, schedule: str) -> dict[str, Any]:
        c = self.config
        desc: dict[str, Any] = {"bits": c.bits, "group_size": c.group_size, "rounding": c.rounding}
        if c.layers is not None:
            desc["planned_layers"] = len(c.layers)
        return desc

    def layer_activations(self, name: str) -> str:
        """``int8`` or ``none``: whether layer ``name`` is to have its input quantized (a plan's entry wins)."""
        act = self.layer_format(name).activations
        return act if act is not None else self.config.activations

    def compress(self, model: torch.nn.Module, ctx: CompressionContext) -> torch.nn.Module:
        cfg = self.config
        layers = ctx.layers(self.layer_names(model))
        if ctx.progress < 1.0:
            # a later round would change the values again: codes are only worth making once
            self.statistics = {"skipped": "quant rounds in the final round of the cascade", "layers": {}}
            return model
        act_layers = {n for n in layers if self.layer_activations(n) == "int8"}
        use_h = cfg.rounding == "gptq" or (cfg.correct_factors and bool(ctx.batches) and ctx.dense_model is not None)
        smooth = cfg.smoothing is not None and bool(act_layers) and bool(ctx.batches)
        sequential = cfg.inputs == "sequential" and (use_h or smooth) and bool(ctx.batches)
        stats = ctx.stats(gram=True) if (use_h or smooth) and not sequential else None
        per_layer: dict[str, Any] = {}
        names = list(layers)
        with torch.no_grad():
            for i, (name, layer) in enumerate(layers.items()):
                if sequential and (stats is None or name not in stats):
                    stats = None  # the previous group's second moments go before the next group's are read
                    stats = collect_layer_stats(ctx.model, names[i:i + cfg.sequential_group], ctx.batches, gram=True,
                                                device=ctx.device)
                smoothing = None
                if smooth and name in act_layers:
                    smoothing = self._smooth(layer, stats[name].max_abs)
                H = None
                if stats is not None and use_h:
                    H = stats[name].gram.to(layer.device).float()
                    if layer.a_in is not None:
                        a = layer.a_in.detach().float()
                        H = a[:, None] * H * a[None, :]
                per_layer[name] = self._quantize_layer(layer, self.layer_format(name), H, ctx.memo)
                if smoothing is not None:
                    per_layer[name]["smoothing"] = smoothing
                ctx.tick(f"quant {name}", i + 1, len(layers))
        act_summary = self._choose_activations(layers, act_layers, ctx, per_layer)
        errors = [v["output_error"] for v in per_layer.values() if v.get("output_error") is not None]
        self.statistics = {
            "rounding": cfg.rounding, "bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
            "quantized_layers": sum(1 for v in per_layer.values() if v["parts"]),
            "mean_output_error": sum(errors) / len(errors) if errors else None,
            "activations": act_summary,
            "layers": per_layer,
        }
        return model

    def _smooth(self, layer: CompressedLinear, act_max: torch.Tensor | None) -> dict[str, Any] | None:
        """Move activation outliers of ``layer``'s input into its weights (SmoothQuant), before rounding."""
        if act_max is None or layer.base is not None:
            return None
        a_in = layer.a_in.detach().float() if layer.a_in is not None else 1.0
        inner = (layer.sparse_part() + layer.low_rank_part()).float()
        alpha = float(self.config.smoothing)
        s = smoothing_factors(act_max.to(inner.device).float() * a_in, inner.abs().amax(0), alpha)
        layer.scale_inputs(s)
        return {"alpha": self.config.smoothing, "min_factor": float(s.min()), "max_factor": float(s.max())}

    def _choose_activations(self, layers: dict[str, CompressedLinear], wanted: set[str], ctx: CompressionContext,
                            per_layer: dict[str, Any]) -> dict[str, Any]:
        """Quantize the input of each layer in ``wanted`` where an int8 GEMM can run it and the error it adds,
        measured on calibration inputs, is within ``activation_error``; record the decision per layer."""
        cfg = self.config
        for layer in layers.values():
            layer.set_activations(None)
        if not wanted:
            return {"requested": 0}
        runnable = {}
        for name in wanted:
            layer = layers[name]
            layer.set_activations(8)
            why = layer.execution_support("w8a8")
            layer.set_activations(None)
            if why is None:
                runnable[name] = layer
            else:
                per_layer[name].update(activations="none", activation_note=f"no int8 GEMM: {why}")
        if not runnable:
            return {"requested": len(wanted), "int8": 0}
        if not ctx.batches or ctx.dense_model is None:
            raise CompressionError("quant.activations 'int8' measures the error it adds on calibration data: "
                                   "give calibration batches")
        errors = activation_errors(ctx.dense_model, runnable, ctx.batches[:cfg.activation_batches], ctx.device)
        chosen = 0
        for name, err in errors.items():
            ok = err <= cfg.activation_error
            if ok:
                layers[name].set_activations(8)
                chosen += 1
            per_layer[name].update(activations="int8" if ok else "none", activation_error=err)
            if not ok:
                per_layer[name]["activation_note"] = f"error {err:.2e} over activation_error {cfg.activation_error:g}"
        return {"requested": len(wanted), "int8": chosen, "budget": cfg.activation_error,
                "mean_error": sum(errors.values()) / len(errors)}

    def _quantize_layer(self, layer: CompressedLinear, fmt: LayerQuant, H: torch.Tensor | None,
                        memo: dict[Any, Any] | None = None) -> dict[str, Any]:
        cfg = self.config
        before = (layer.sparse_part() + layer.low_rank_part()).float()
        parts: list[str] = []
        info: dict[str, Any] = {"bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric}

        def wanted(part: str, bits: int, group: int | None) -> bool:
            q = layer.quant.get(part)
            if q is None:
                return True
            g, _ = groups_of(getattr(layer, part).shape[1], group)
            return not (q.bits == bits and q.group_size == g and q.symmetric == fmt.symmetric)

        h_digest = tensor_digest(H) if memo is not None else None
        factor: list[torch.Tensor | None] = []

        def inverse() -> torch.Tensor | None:
            """GPTQ's Cholesky factor of ``H``: once for the layer's parts (and the choice's reruns)."""
            if H is None or cfg.rounding != "gptq" or cfg.act_order:  # act_order factors the permuted H itself
                return None
            if not factor:
                key = ("inverse", cfg.damping, h_digest)
                found = memo.get(key) if memo is not None else None
                factor.append(found if found is not None else inverse_factor(H, cfg.damping))
                if memo is not None:
                    memo[key] = factor[0]
            return factor[0]

        if layer.weight is not None and fmt.bits is not None and wanted("weight", fmt.bits, fmt.group_size):
            w = layer.weight.detach()
            key = None
            if memo is not None:
                key = ("quant weight", fmt.bits, fmt.group_size, fmt.symmetric,
                       cfg.model_dump_json(include=ROUNDING_KEYS), tensor_digest(w, layer.mask), h_digest)
            q = memo.get(key) if key is not None else None
            if q is None:
                q = quantize_weight(w, H, fmt.bits, fmt.group_size, fmt.symmetric, cfg, layer.mask, inverse())
                if key is not None:
                    memo[key] = copy.deepcopy(q)
            else:
                q = copy.deepcopy(q)
            layer.set_quantized("weight", q)
            parts.append("weight")
        fbits = fmt.factor_bits if fmt.factor_bits is not None else fmt.bits
        if layer.rank and cfg.quantize_factors and fbits is not None and (
                wanted("lr_A", fbits, fmt.group_size) or wanted("lr_B", fbits, fmt.group_size)):
            qa = quantize_weight(layer.lr_A.detach(), H, fbits, fmt.group_size, fmt.symmetric, cfg, None, inverse())
            layer.set_quantized("lr_A", qa)
            A_q = layer.lr_A.detach().float()
            HB = A_q @ H @ A_q.t() if H is not None else None
            candidates = [layer.lr_B.detach().float()]
            if cfg.correct_factors and H is not None:
                target = before - layer.sparse_part().float()
                candidates.append(corrected_factor(target, A_q, H, cfg.damping).float())
            best = None
            for k, B in enumerate(candidates):
                qb = quantize_weight(B, HB, fbits, fmt.group_size, fmt.symmetric, cfg)
                B_q = qb.dequantize(torch.float32).to(B.device)
                err = relative_output_error(before, layer.sparse_part().float() + B_q @ A_q, H)
                if best is None or err < best[0]:
                    best = (err, qb, k)
            layer.set_quantized("lr_B", best[1])
            info["factor_bits"] = fbits
            info["factors_corrected"] = best[2] == 1
            parts += ["lr_A", "lr_B"]
        after = (layer.sparse_part() + layer.low_rank_part()).float()
        info["parts"] = parts
        info["output_error"] = relative_output_error(before, after, H) if parts else 0.0
        return info
