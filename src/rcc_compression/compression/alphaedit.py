"""Stage ``alphaedit``: recovery of the compressed layers.

Default (docs/glossary.md, mode ``scaling``): learnable per-channel scales ``a_in``/``a_out`` on
the compressed layers, trained by distillation from the dense teacher on calibration batches;
they keep the sparsity pattern and the rank. Channel importance ``|grad * weight|`` (first-order
Taylor, Molchanov et al., CVPR 2019; here ``|a * dL/da|``) decides which channels get learnable
scales (``scale_fraction``).

Mode ``closed_form`` is AlphaEdit (Fang et al., ICLR 2025, "Null-Space Constrained Knowledge
Editing"; ``AlphaEdit_main.py``): the least-squares update that fits the layer back to the dense
layer on calibration inputs K1, projected onto the null space of a preserve set K0 (eigenvalues
of its second moment below ``nullspace_threshold``), ``Delta^T = (P K1 K1^T + l2 I)^-1 P K1 R^T``.
Departures: the fit targets the dense layer's outputs on the dense model's inputs (a layer-wise
reconstruction), and the update is solved only on the kept entries of each sparse row and into
the low-rank factor ``B``, so the compression survives; the projector is then taken per row on
its support, which keeps ``Delta K0 = 0`` exact. ``fit_inputs: sequential`` fits each layer, in
execution order, on the inputs the compressed model really feeds it (moments paired with the dense
model's, :mod:`.refit`), so the update also corrects the error earlier layers pass on.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..utils.logging import get_logger
from .calibration import flatten_outputs, relative_output_error, to_device
from .layers import CompressedLinear
from .refit import sequential_moments
from .stage import CompressionContext, Stage, StageConfig, kd_finetune
from .storage import stored_bytes

log = get_logger("alphaedit")


class AlphaEditConfig(StageConfig):
    """Keys of the ``alphaedit`` stage (defaults: docs/glossary.md; ``closed_form``'s from the AlphaEdit paper)."""

    mode: Literal["scaling", "closed_form"] = Field(
        "scaling",
        description="scaling: channel scales learnt by distillation; closed_form: the AlphaEdit update")
    learning_rate: float = Field(1e-3, gt=0, description="scaling: learning rate of the distillation")
    num_epochs: int = Field(10, ge=0, description="scaling: distillation epochs on the calibration batches (0: none)")
    importance_metric: Literal["gradient", "magnitude", "uniform"] = Field(
        "gradient",
        description="scaling: how channels are ranked for scales: gradient |grad * w|, magnitude, uniform")
    scale_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of channels given learnable scales")
    trainable: Literal["scales", "scales_and_values"] = Field(
        "scales",
        description="scaling: train the scales only, or the kept sparse values and factors too")
    nullspace_threshold: float = Field(
        2e-2, ge=0.0,
        description="closed_form: eigenvalues of the preserved inputs' second moment below "
        "this span the directions the update may use")
    l2: float = Field(10.0, ge=0.0, description="closed_form: ridge weight of the update (AlphaEdit's alpha)")
    chunk_elements: int = Field(1 << 25, ge=1 << 10, description="memory bound of the batched row solves")
    fit_inputs: Literal["dense", "sequential"] = Field(
        "dense", description="closed_form: fit on the dense model's inputs, or layer by layer on the compressed "
                             "model's own inputs (in execution order)")


# ------------------------------------------------------------------------------ pure functions
def preserve_basis(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal basis (n x k) of the directions the preserve set occupies (eigenvalues >= threshold).

    Its orthogonal complement is AlphaEdit's null space ``P = I - U U^T``.
    """
    evals, evecs = torch.linalg.eigh(second_moment.double())
    return evecs[:, evals >= threshold].to(second_moment.dtype)


def _orth_columns(U: torch.Tensor, rel_tol: float = 1e-7) -> torch.Tensor:
    """Batched orthonormal basis of the column spans of ``U`` (..., n, k); dependent columns zeroed."""
    if U.shape[-1] == 0:
        return U
    Q, s, _ = torch.linalg.svd(U, full_matrices=False)
    keep = s > rel_tol * s.amax(-1, keepdim=True).clamp_min(1e-300)
    return Q * keep.unsqueeze(-2).to(Q.dtype)


def spd_solve(A: torch.Tensor, B: torch.Tensor, rel_jitter: float = 1e-12) -> torch.Tensor:
    """Solve ``A X = B`` for symmetric positive (semi-)definite ``A``, batched, by Cholesky.

    A general LU solve is not used on purpose: MKL's batched LU solve on the CPU build fails
    (``DLASWP`` parameter errors, pivots < 1) or returns garbage with more than one thread, while
    Cholesky is exact there. A matrix that is only semi-definite (no ridge, a singular Gram) gets
    the smallest diagonal shift, growing from ``rel_jitter`` of its mean diagonal, that factorises.
    """
    A = (A + A.transpose(-1, -2)) / 2
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        n = A.shape[-1]
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        scale = A.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(A.dtype).tiny)
        jitter = rel_jitter
        while bool((info != 0).any()):
            if jitter > 1.0:
                raise torch.linalg.LinAlgError("spd_solve: the matrix is not positive semi-definite")
            shift = torch.where(info != 0, scale * jitter, torch.zeros_like(scale))
            L_new, info_new = torch.linalg.cholesky_ex(A + shift[..., None, None] * eye)
            bad = (info != 0)[..., None, None]
            L = torch.where(bad, L_new, L)
            info = torch.where(info != 0, info_new, info)
            jitter *= 100.0
    return torch.cholesky_solve(B, L)


def null_space_ridge(
    C: torch.Tensor,
    R: torch.Tensor,
    support: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
    l2: float = 10.0,
    chunk_elements: int = 1 << 25,
) -> torch.Tensor:
    """Row-wise AlphaEdit update restricted to a support.

    For each row ``r`` of the residual ``R`` (m x n) solve, over ``z`` supported on the row's
    ``support`` and orthogonal to ``basis`` (``z U = 0``: inputs of the preserve set see no change),
    ``min (r - z) C (r - z)^T + l2 ||z||^2`` with ``C = K1 K1^T``. With ``P`` the projector onto the
    allowed set the solution is ``z^T = (P C P + l2 I)^-1 P C r^T`` (AlphaEdit's
    ``(P C + l2 I)^-1 P C r^T`` restricted to the allowed set, where the two agree), solved by
    Cholesky of that symmetric positive definite matrix (:func:`spd_solve`; ``I - P`` is added on
    the forbidden directions, which keeps it definite and leaves the solution as it is). Batched
    over rows in chunks of at most ``chunk_elements`` numbers.
    """
    m, n = R.shape
    C = C.double()
    R = R.double()
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    U = basis.double() if basis is not None and basis.shape[1] > 0 else None
    if support is None:
        P = eye if U is None else eye - (lambda Q: Q @ Q.t())(_orth_columns(U))
        PC = P @ C
        # (I - P) + l2 I on the forbidden directions keeps the matrix definite without moving the solution
        z = spd_solve(PC @ P + (eye - P) + l2 * eye, PC @ R.t())
        return (P @ z).t()
    out = torch.zeros_like(R)
    chunk = max(1, chunk_elements // (n * n))
    for start in range(0, m, chunk):
        D = support[start:start + chunk].to(C.dtype)
        c = D.shape[0]
        b = (R[start:start + c] @ C).unsqueeze(-1)
        if U is None:  # P = diag(D): everything stays elementwise
            H = D.unsqueeze(-1) * C.unsqueeze(0) * D.unsqueeze(1) + torch.diag_embed(1.0 - D) + l2 * eye
            z = spd_solve(H, D.unsqueeze(-1) * b).squeeze(-1) * D
        else:
            Q = _orth_columns(D.unsqueeze(-1) * U.unsqueeze(0))  # supported on D, so P = diag(D) - Q Q^T
            P = torch.diag_embed(D) - Q @ Q.transpose(1, 2)
            PC = P @ C
            z = (P @ spd_solve(PC @ P + (eye - P) + l2 * eye, P @ b)).squeeze(-1) * D
        out[start:start + c] = z
    return out


def low_rank_update(
    C: torch.Tensor, R: torch.Tensor, A: torch.Tensor, basis: torch.Tensor | None = None, l2: float = 10.0
) -> torch.Tensor:
    """AlphaEdit update of ``B`` in ``B A`` (A fixed): ``min ||(R - dB A) K1||^2 + l2 ||dB||^2``, ``dB A U = 0``."""
    C, R, A = C.double(), R.double(), A.double()
    G = A @ C @ A.t()
    b = R @ C @ A.t()
    r = A.shape[0]
    eye = torch.eye(r, dtype=C.dtype, device=C.device)
    P = eye
    if basis is not None and basis.shape[1] > 0:
        Q = _orth_columns(A @ basis.double())
        P = eye - Q @ Q.t()
    return (P @ spd_solve(P @ G @ P + (eye - P) + l2 * eye, P @ b.t())).t()


def reconstruction_error(C: torch.Tensor, R: torch.Tensor, T: torch.Tensor) -> float:
    """``tr(R C R^T) / tr(T C T^T)``: relative output error of a weight residual on inputs with moment C."""
    C, R, T = C.double(), R.double(), T.double()
    num = float(((R @ C) * R).sum())
    den = float(((T @ C) * T).sum())
    return num / den if den > 0 else 0.0


# ------------------------------------------------------------------------------ stage
class AlphaEditStage(Stage):
    """Recover the compressed layers: learned channel scales, or the closed-form null-space update."""

    name = "alphaedit"
    config_class = AlphaEditConfig
    recovery = True
    config: AlphaEditConfig

    def reserved_bytes(self, out_features: int, in_features: int, element_size: int) -> int:
        c = self.config
        return (out_features + in_features) * element_size if (c.mode == "scaling" and c.num_epochs > 0) else 0

    def target_description(self, progress: float, schedule: str) -> dict[str, Any]:
        return {"mode": self.config.mode}

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        if self.config.mode == "closed_form":
            return self._closed_form(model, ctx)
        return self._scaling(model, ctx)

    # -------------------------------------------------------------- scaling
    def _importance(self, model: nn.Module, layers: dict[str, CompressedLinear], ctx: CompressionContext
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        metric = self.config.importance_metric
        if metric == "uniform":
            return {n: (torch.ones(m.in_features), torch.ones(m.out_features)) for n, m in layers.items()}
        if metric == "magnitude":
            out = {}
            for n, m in layers.items():
                w = m.effective_weight().float()
                out[n] = (w.norm(dim=0).cpu(), w.norm(dim=1).cpu())
            return out
        teacher = ctx.teacher_outputs()
        scales = [p for m in layers.values() for p in (m.a_in, m.a_out)]
        saved = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in scales:
            p.requires_grad_(True)
            p.grad = None
        acc = {n: (torch.zeros(m.in_features), torch.zeros(m.out_features)) for n, m in layers.items()}
        try:
            for batch, t in zip(ctx.batches, teacher, strict=True):
                loss = relative_output_error(flatten_outputs(model(**to_device(batch, ctx.device))), t)
                loss.backward()
                for n, m in layers.items():
                    acc[n][0].add_((m.a_in * m.a_in.grad).detach().abs().cpu())
                    acc[n][1].add_((m.a_out * m.a_out.grad).detach().abs().cpu())
                    m.a_in.grad = m.a_out.grad = None
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
        return acc

    def _scaling(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        layers = ctx.layers(self.layer_names(model))
        if cfg.num_epochs == 0 or not ctx.batches:
            # nothing would train the scales: adding them would only cost bytes and multiplies
            why = "num_epochs is 0" if ctx.batches else "no calibration data"
            self.statistics = {"mode": "scaling", "skipped": why, "layers": {}}
            return model
        no_room = []
        for name, m in list(layers.items()):
            if m.a_in is None or m.a_out is None:
                m.set_scales(
                    m.a_in.detach() if m.a_in is not None else torch.ones(m.in_features, device=m.device),
                    m.a_out.detach() if m.a_out is not None else torch.ones(m.out_features, device=m.device),
                )
                cap = ctx.byte_cap(name, for_scales=True)
                if cap is not None and stored_bytes(m) > cap:  # scales would store more than the last round
                    m.set_scales(None, None)
                    no_room.append(name)
                    del layers[name]
        if not layers:
            self.statistics = {"mode": "scaling", "skipped": "no layer has room for scales", "no_room": no_room,
                               "layers": {}}
            return model
        # importance only decides which channels learn: with every channel learning it would cost a
        # backward pass for nothing
        importance = self._importance(model, layers, ctx) if cfg.scale_fraction < 1.0 else {}
        hooks: list[Any] = []
        held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        per_layer: dict[str, Any] = {}
        if cfg.scale_fraction < 1.0 and importance:
            for n, m in layers.items():
                for param, imp in ((m.a_in, importance[n][0]), (m.a_out, importance[n][1])):
                    k = max(1, round(cfg.scale_fraction * imp.numel()))
                    sel = torch.zeros(imp.numel(), dtype=param.dtype, device=param.device)
                    sel[imp.topk(k).indices.to(param.device)] = 1
                    hooks.append(param.register_hook(lambda g, s=sel: g * s))
                    held.append((param, sel.bool(), param.detach().clone()))

            def hold(_opt: Any, _args: Any, _kwargs: Any) -> None:
                # a zero gradient does not stop weight decay (or momentum) moving a channel: the
                # channels without a learnable scale are put back after every optimiser step
                with torch.no_grad():
                    for param, sel, value in held:
                        param.copy_(torch.where(sel, param, value))

            hooks.append(register_optimizer_step_post_hook(hold))
        params: list[nn.Parameter] = [p for m in layers.values() for p in (m.a_in, m.a_out)]
        if cfg.trainable == "scales_and_values":
            params += [p for m in layers.values() for p in (m.weight, m.lr_A, m.lr_B) if p is not None]
        try:
            kd = kd_finetune(model, ctx, params, cfg.num_epochs, cfg.learning_rate, salt=2)
        finally:
            for h in hooks:
                h.remove()
        for n, m in layers.items():
            info: dict[str, Any] = {
                "a_in_range": [float(m.a_in.detach().min()), float(m.a_in.detach().max())],
                "a_out_range": [float(m.a_out.detach().min()), float(m.a_out.detach().max())],
            }
            if importance:
                info["importance_in_mean"] = float(importance[n][0].mean())
                info["importance_out_mean"] = float(importance[n][1].mean())
            per_layer[n] = info
        if no_room:
            per_layer.update({n: {"skipped": "scales would store more than the previous round"} for n in no_room})
        self.statistics = {"mode": "scaling",
                           "importance_metric": cfg.importance_metric if importance else
                           "not computed: scale_fraction 1 gives every channel a learnable scale",
                           "scale_fraction": cfg.scale_fraction, "trainable": cfg.trainable, **kd,
                           "layers": per_layer}
        return model

    # -------------------------------------------------------------- closed form
    @torch.no_grad()
    def _closed_form(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        layers = ctx.layers(self.layer_names(model))
        pstats = ctx.preserve_stats()
        per_layer: dict[str, Any] = {}
        sequential = cfg.fit_inputs == "sequential" and ctx.dense_model is not None and bool(ctx.batches)
        if sequential:
            unscaled = [n for n, m in layers.items() if m.a_in is None and m.a_out is None]
            for group, mom in sequential_moments(model, ctx.dense_model, unscaled, ctx.batches, ctx.device):
                for name in group:
                    per_layer[name] = self._update_layer(name, layers[name], ctx, pstats, mom)
                    ctx.tick(f"alphaedit {name}", len(per_layer), len(layers))
        stats = ctx.stats(gram=True) if len(per_layer) < len(layers) else None
        for name, layer in layers.items():
            if name not in per_layer:
                per_layer[name] = self._update_layer(name, layer, ctx, pstats, stats[name].gram)
                ctx.tick(f"alphaedit {name}", len(per_layer), len(layers))
        method = ("AlphaEdit: ridge update in the null space of the preserve set" if pstats is not None else
                  "ridge regression toward the dense layer: no preserve set, so no null-space constraint (not "
                  "AlphaEdit; pass preserve_data or calibration.preserve_source)")
        if pstats is None:
            log.warning("alphaedit closed_form: %s", method)
        self.statistics = {"mode": "closed_form", "method": method,
                           "fit_inputs": "sequential" if sequential else "dense",
                           "preserve_set": pstats is not None, "l2": cfg.l2,
                           "nullspace_threshold": cfg.nullspace_threshold,
                           "rejected_layers": sorted(n for n, v in per_layer.items() if "rejected" in v),
                           "layers": per_layer}
        return model

    def _update_layer(self, name: str, layer: CompressedLinear, ctx: CompressionContext, pstats: Any,
                      inputs: Any) -> dict[str, Any]:
        """The closed-form update of one layer, on dense-input moments ``C`` or paired moments (refit)."""
        cfg = self.config
        dev = layer.device
        a_in = layer.a_in.detach().double() if layer.a_in is not None else None
        T = ctx.target_weight(name, layer).double()
        E = layer.sparse_part().double() + layer.low_rank_part().double()
        if isinstance(inputs, torch.Tensor):
            C = inputs.to(dev).double()
            if a_in is not None:
                C = a_in[:, None] * C * a_in[None, :]
            R = T - E
        else:  # paired moments: R with R C_yy = W C_xy - (base + E) C_yy; only R C enters the solves
            C = inputs.c_yy.to(dev).double()
            base = layer.base.double() if layer.base is not None else torch.zeros_like(T)
            R = ((T + base) @ inputs.c_xy.to(dev).double() - (base + E) @ C) @ inputs.c_yy_pinv.to(dev)
        basis = None
        if pstats is not None:
            C0 = pstats[name].second_moment.to(dev).double()
            if a_in is not None:
                C0 = a_in[:, None] * C0 * a_in[None, :]
            basis = preserve_basis(C0, cfg.nullspace_threshold)
        before = reconstruction_error(C, R, T)
        old = {k: getattr(layer, k).detach().clone() for k in ("weight", "lr_B") if getattr(layer, k) is not None}
        if layer.weight is not None:
            delta = null_space_ridge(C, R, layer.mask, basis, cfg.l2, cfg.chunk_elements)
            layer.weight.data.add_(delta.to(layer.weight.dtype))
            R = R - delta
        if layer.rank > 0:
            dB = low_rank_update(C, R, layer.lr_A.detach(), basis, cfg.l2)
            layer.lr_B.data.add_(dB.to(layer.lr_B.dtype))
            R = R - dB @ layer.lr_A.detach().double()
        after = reconstruction_error(C, R, T) if bool(torch.isfinite(R).all()) else float("nan")
        info: dict[str, Any] = {"error_before": before, "error_after": after,
                                "preserve_dim": 0 if basis is None else int(basis.shape[1])}
        # the exact ridge solution never raises the error (z = 0 is feasible); rounding or a failed
        # solve could: such an update is never kept
        if not after <= before * (1.0 + 1e-9) + 1e-12:
            for k, t in old.items():
                getattr(layer, k).data.copy_(t)
            log.warning("alphaedit closed_form: the update of %s would raise its calibration error %.4g -> %.4g; "
                        "not applied", name, before, after)
            info.update(error_after=before, rejected=f"error would rise from {before:.6g} to {after:.6g}")
        return info
