"""The one compressed layer: ``y = a_out * ((base + S + B A) (a_in * x)) + bias``.

``S`` is a sparse matrix kept as a dense tensor whose pruned entries are exactly zero (with its
boolean ``mask``), ``B A`` a low-rank product, ``a_in``/``a_out`` per-channel scales and ``base``
a frozen reference weight (DARE on deltas). Every part is optional; :meth:`merge` folds them
back into a plain ``nn.Linear``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

EXECUTION_MODES = ("factored", "merged", "csr", "semi_structured")


class CompressedLinear(nn.Module):
    """A Linear layer stored as sparse + low rank + channel scales (+ frozen base).

    Attributes are ``None`` when a part is absent: ``weight`` (the sparse or dense part S),
    ``mask`` (bool, None = S is dense), ``lr_A`` (r x in), ``lr_B`` (out x r), ``a_in`` (in),
    ``a_out`` (out), ``bias`` (out), ``base`` (out x in, frozen buffer).
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
        self.register_buffer("mask", None)
        self.register_buffer("base", None)
        self._fast: tuple[str, torch.Tensor] | None = None  # an inference kernel chosen by set_execution

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
        """Set S (pruned entries are zeroed here, so the invariant ``weight == weight * mask`` holds)."""
        self._fast = None
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

    # ------------------------------------------------------------------ structure
    @property
    def rank(self) -> int:
        return 0 if self.lr_A is None else int(self.lr_A.shape[0])

    @property
    def is_sparse(self) -> bool:
        return self.mask is not None

    def nnz(self) -> int:
        """Non-zeros stored in S (all entries when S is dense, 0 when absent)."""
        if self.weight is None:
            return 0
        return int(self.mask.sum()) if self.mask is not None else self.weight.numel()

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
        if self.a_in is not None:
            x = x * self.a_in
        y = None
        if fast is not None and fast[0] == "csr":
            y = torch.sparse.mm(fast[1], x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        elif fast is not None and fast[0] == "semi_structured":
            y = F.linear(x, fast[1])
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

    def train(self, mode: bool = True) -> CompressedLinear:
        if mode:
            self._fast = None  # weights are about to move: the inference kernel would go stale
        return super().train(mode)

    @torch.no_grad()
    def set_execution(self, mode: str) -> bool:
        """Choose how eval-mode forward runs; the stored form is unchanged. Returns whether it applies.

        ``factored`` (S as a dense matmul, then B A, then scales), ``merged`` (one dense matmul with
        the effective weight: the dense speed, more memory), ``csr`` (S as a CSR sparse matmul, CPU)
        or ``semi_structured`` (S with 2:4 kernels, CUDA). Pick by measurement:
        :func:`rcc_compression.evaluation.efficiency.optimize_execution`.
        """
        self._fast = None
        if mode == "factored":
            return True
        if mode == "merged":
            self._fast = ("merged", self.effective_weight().contiguous())
            return True
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


def layer_snapshot(layer: CompressedLinear) -> dict[str, torch.Tensor | None]:
    """A detached copy of every part of a compressed layer (for rollback)."""
    return {k: (None if getattr(layer, k) is None else getattr(layer, k).detach().clone()) for k in _PARTS}


def restore_layer(layer: CompressedLinear, snap: dict[str, torch.Tensor | None]) -> None:
    """Restore a layer to a :func:`layer_snapshot` (parts absent in the snapshot are removed)."""
    layer._fast = None
    for k in ("weight", "lr_A", "lr_B", "a_in", "a_out", "bias"):
        t = snap.get(k)
        setattr(layer, k, None if t is None else nn.Parameter(t.clone()))
    layer.mask = None if snap.get("mask") is None else snap["mask"].clone()
    layer.base = None if snap.get("base") is None else snap["base"].clone()
