"""Calibration: streaming per-layer input statistics and model outputs over batches.

A batch is a dict of keyword arguments for ``model(**batch)``, so any ``nn.Module`` works. Forward
hooks accumulate, per target layer, the count of input vectors, the per-channel sums of squares
and of absolute values (for wanda and asvd), the largest absolute values (SmoothQuant) and, when
asked, the input second moment ``X^T X``
(for activation-aware SVD and AlphaEdit). Memory is bounded by one ``n x n`` matrix per layer,
whatever the number of batches.

A batch that does not fit in accelerator memory (``torch.cuda.OutOfMemoryError``) is halved along
its first dimension, with a warning, and the smaller size is kept for the batches that follow
(:class:`BatchHalver`); statistics and outputs are the same as from whole batches up to float
rounding.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.logging import get_logger

log = get_logger("calibration")
T = TypeVar("T")


@dataclass
class LayerStats:
    """Accumulated statistics of one layer's inputs (``n`` input channels)."""

    count: int
    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    gram: torch.Tensor | None = None
    #: ``max |x_j|`` per input channel (SmoothQuant's activation range)
    max_abs: torch.Tensor | None = None

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


# ------------------------------------------------------------------ out of memory: halve the batch
def batch_rows(batch: Mapping[str, Any]) -> int | None:
    """Rows of a batch: the largest first dimension among its tensors (``None`` without tensors)."""
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return max(sizes) if sizes else None


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split every tensor of a batch along dim 0 into ``parts`` nearly equal pieces (other values shared)."""
    pieces: list[dict[str, Any]] = [{} for _ in range(parts)]
    for key, value in batch.items():
        chunks = (torch.tensor_split(value, parts, dim=0) if isinstance(value, torch.Tensor) and value.dim() > 0
                  else [value] * parts)
        for piece, chunk in zip(pieces, chunks, strict=True):
            piece[key] = chunk
    return [p for p in pieces if batch_rows(p) != 0]


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchHalver:
    """Run work batch by batch, halving any batch that raises ``torch.cuda.OutOfMemoryError``.

    The size that fits is remembered (``limit``), so later batches are split before they are run;
    every halving logs one warning naming ``what``. A batch of one row that still does not fit
    re-raises the error.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.limit: int | None = None

    def pieces(self, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``batch`` split so that no piece has more than ``limit`` rows."""
        rows = batch_rows(batch)
        if self.limit is None or rows is None or rows <= self.limit:
            return [dict(batch)]
        return split_batch(batch, math.ceil(rows / self.limit))

    def shrink(self, rows: int | None) -> bool:
        """Record that ``rows`` did not fit; ``False`` when it cannot be halved (one row, or no tensors)."""
        if rows is None or rows <= 1:
            return False
        half = (rows + 1) // 2
        if self.limit is None or half < self.limit:
            log.warning("CUDA out of memory on a batch of %d in %s; halving the batch to %d", rows, self.what, half)
            self.limit = half
        _release_cached_memory()
        return True

    def run(self, fn: Callable[[dict[str, Any]], T], batch: Mapping[str, Any]) -> list[T]:
        """``fn`` on each piece of ``batch`` (in order), halving pieces that run out of memory."""
        todo, done = self.pieces(batch), []
        while todo:
            piece = todo.pop(0)
            rows = batch_rows(piece)
            try:
                done.append(fn(piece))
                continue
            except torch.cuda.OutOfMemoryError:
                if not self.shrink(rows):
                    raise
            # retried outside the handler, so the failed attempt's activations are already freed;
            # the pieces still waiting are cut to the new limit too
            todo = [q for p in (piece, *todo) for q in self.pieces(p)]
        return done


#: outputs relating every sample of a batch to every other (CLIP's similarity matrices): a split
#: batch's pieces cannot simply be concatenated, so they are recomputed from the merged embeddings
CROSS_SAMPLE_OUTPUTS = ("logits_per_image", "logits_per_text")


def merge_outputs(pieces: Sequence[Mapping[str, torch.Tensor]], model: nn.Module | None = None
                  ) -> dict[str, torch.Tensor]:
    """The outputs of a whole batch from the flattened outputs of its pieces (in order).

    Per-sample outputs are concatenated along dim 0. CLIP's similarity matrices are rebuilt from
    the merged ``image_embeds``/``text_embeds`` and the model's ``logit_scale``; other outputs that
    cannot be assembled (shapes differing beyond dim 0) are left out.
    """
    if len(pieces) == 1:
        return dict(pieces[0])
    merged: dict[str, torch.Tensor] = {}
    for key in pieces[0]:
        if key.rsplit(".", 1)[-1] in CROSS_SAMPLE_OUTPUTS:
            continue
        parts = [p.get(key) for p in pieces]
        if any(t is None or t.shape[1:] != parts[0].shape[1:] for t in parts):
            continue
        merged[key] = torch.cat(parts, dim=0)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and "image_embeds" in merged and "text_embeds" in merged:
        logits_per_text = merged["text_embeds"] @ merged["image_embeds"].t() * scale.exp().to(merged["text_embeds"])
        merged["logits_per_text"], merged["logits_per_image"] = logits_per_text, logits_per_text.t()
    return merged


class _Enough(Exception):
    """Raised inside a forward once every layer whose inputs are read has read them."""


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Mapping[str, Any]],
    gram: bool = False,
    device: torch.device | str | None = None,
    once: bool = False,
) -> dict[str, LayerStats]:
    """Stream the inputs of ``layer_names`` over ``batches`` into :class:`LayerStats`.

    Per-channel sums accumulate in float64 on the CPU (float32 on accelerators); the ``n x n``
    second moment in float32, where it costs an ``n^2`` matrix product per token batch. Layers
    that read the same input tensor (CLIP's q/k/v projections) share one set of statistics. When the
    first batch shows each layer runs once per forward, later batches stop the forward as soon as the
    last of them has read its input (the rest of the model is not needed); with ``once`` (the caller
    knows each runs once per forward: :func:`calls_per_forward`) the first forward stops early too.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    stats: dict[str, LayerStats] = {}
    seen: dict[tuple[int, tuple[int, ...]], tuple[LayerStats, Any]] = {}  # inputs counted in this batch
    handles = []
    calls: dict[str, int] = {}  # per forward
    early = [False]  # stop a forward once every layer has read its input

    def read_all(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1
        if early[0] and len(calls) == len(wanted):
            raise _Enough

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
                read_all(name)
                return
            x = x_in.detach().reshape(-1, x_in.shape[-1]).to(acc_dtype)
            if st is None:
                n = x.shape[1]
                st = stats[name] = LayerStats(
                    0, x.new_zeros(n), x.new_zeros(n), x.new_zeros(n, n, dtype=torch.float32) if gram else None,
                    x.new_zeros(n),
                )
            st.count += x.shape[0]
            st.sum_sq += (x * x).sum(0)
            ax = x.abs()
            st.sum_abs += ax.sum(0)
            torch.maximum(st.max_abs, ax.amax(0), out=st.max_abs)
            if st.gram is not None:
                xf = x.float()
                st.gram.addmm_(xf.t(), xf)
            seen[key] = (st, weakref.ref(x_in))
            read_all(name)

        return hook

    wanted = set(layer_names)
    for name in wanted:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    batches = list(batches)
    halver = BatchHalver("calibration statistics")
    try:
        while True:
            # hooks of the layers before the one that ran out of memory have counted part of the
            # batch, so a halving starts the pass again from empty statistics
            stats.clear()
            rows = None
            early[0] = once
            try:
                for batch in batches:
                    for piece in halver.pieces(batch):
                        rows = batch_rows(piece)
                        seen.clear()
                        calls.clear()
                        try:
                            model(**to_device(piece, device))
                        except _Enough:
                            pass
                        early[0] = early[0] or (set(calls) == wanted and all(c == 1 for c in calls.values()))
                break
            except torch.cuda.OutOfMemoryError:
                if not halver.shrink(rows):
                    raise
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layer_names if n not in stats]
    if missing:
        raise RuntimeError(f"calibration batches never reached layers {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return stats


#: the most bytes of float32 second moments :func:`iter_grams` holds at once
GRAM_GROUP_BYTES = 1 << 27


@torch.no_grad()
def calls_per_forward(model: nn.Module, layer_names: Sequence[str], batch: Mapping[str, Any],
                      device: torch.device | str | None = None) -> dict[str, int]:
    """How many times each of ``layer_names`` runs in one forward pass of ``model`` on ``batch``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    calls = dict.fromkeys(layer_names, 0)

    def count(name: str):
        def hook(_mod: nn.Module, _args: tuple[Any, ...]) -> None:
            calls[name] += 1

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(count(n)) for n in layer_names]
    was_training = model.training
    model.eval()
    try:
        model(**to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def iter_grams(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Sequence[Mapping[str, Any]],
    device: torch.device | str | None = None,
    max_bytes: int = GRAM_GROUP_BYTES,
) -> Iterator[torch.Tensor]:
    """Each named layer's ``n x n`` input second moment, in order, for one pass over them.

    They are gathered for a group of consecutive layers at a time (one pass of the model over
    ``batches`` per group, at most ``max_bytes`` of them held, or one layer's when it is larger):
    all of ViT-B/32's would take 0.75 GiB.
    """
    groups: list[list[str]] = []
    held = max_bytes
    for name in layer_names:
        size = 4 * model.get_submodule(name).in_features ** 2
        if held + size > max_bytes:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    for group in groups:
        stats = collect_layer_stats(model, group, batches, gram=True, device=device)
        for name in group:
            yield stats.pop(name).gram
        del stats


def output_sensitivity(
    model: nn.Module, layer_names: Sequence[str], batches: Iterable[Mapping[str, Any]], probes: int = 1,
    seed: int = 0, device: torch.device | str | None = None,
) -> dict[str, torch.Tensor] | None:
    """Per output channel of each layer, how much the model's outputs move per unit of error there.

    ``f[c] = E_v ||(J^T v)_c||^2 / (T E_out)``: ``J`` is the Jacobian of the model's primary outputs
    (those :func:`output_agreement` compares) with respect to the layer's output, ``v`` Gaussian
    probes (``E_v J^T v v^T J = J^T J``, Hutchinson's estimator of the Gauss-Newton diagonal), ``T``
    the layer's input rows and ``E_out`` the outputs' energy. A weight error ``D`` of the layer then
    moves the model's outputs by about ``sum_c f[c] (D G D^T)_cc`` of their energy, ``G = X^T X``
    its calibration second moment. This is the output-gradient (Fisher) weighting of HAWQ-V3 (Yao
    et al., ICML 2021) with these departures: the Gauss-Newton matrix of the outputs (no labels) in
    place of the loss Hessian, its diagonal over output channels with tokens averaged (not a trace
    per layer), and one estimate per layer used to weight every candidate of it. A layer that runs but
    that the outputs do not depend on weighs zero. Returns ``None``
    where the model cannot be differentiated (the planner then weighs layers by their own outputs).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    anchor = torch.zeros((), device=device, requires_grad=True)
    outs: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_mod: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            out = out + anchor  # joins the graph (no parameter needs a gradient) without changing a value
            outs[name] = out
            return out

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in layer_names]
    fisher: dict[str, torch.Tensor] = {}
    energy = 0.0
    g = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                outs.clear()
                flat = flatten_outputs(model(**to_device(batch, device)))
                primary = [k for k in PRIMARY_OUTPUTS if k in flat] or list(flat)
                targets = [flat[k] for k in primary if flat[k].requires_grad]
                names = [n for n in layer_names if n in outs]
                if not targets or not names:
                    return None
                energy += sum(float(t.detach().double().pow(2).sum()) for t in targets)
                for p in range(probes):
                    vs = [torch.randn(t.shape, generator=g).to(t) for t in targets]
                    grads = torch.autograd.grad(targets, [outs[n] for n in names], vs, retain_graph=p + 1 < probes,
                                                allow_unused=True)
                    for n, gr in zip(names, grads, strict=True):
                        if gr is None:  # the layer ran but the outputs do not depend on it: it weighs nothing
                            gr = torch.zeros_like(outs[n])
                        gr = gr.detach().reshape(-1, gr.shape[-1]).double()
                        fisher[n] = fisher.get(n, 0) + gr.pow(2).sum(0) / probes
                        if p == 0:
                            rows[n] = rows.get(n, 0) + gr.shape[0]
    except RuntimeError as exc:  # e.g. an operation without a derivative
        log.warning("output sensitivity not measured (%s): layers weighed by their own outputs", exc)
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not fisher or energy <= 0:
        return None
    return {n: (fisher[n] / (rows[n] * energy)).float().cpu() for n in layer_names if n in fisher}


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
    halver = BatchHalver("model outputs")

    def outputs(piece: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in flatten_outputs(model(**to_device(piece, device))).items()}

    try:
        return [merge_outputs(halver.run(outputs, b), model) for b in batches]
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


def sample_output_errors(student: Sequence[Mapping[str, torch.Tensor]],
                         teacher: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Per-sample relative squared error ``||s - t||^2 / ||t||^2`` of the outputs :func:`output_agreement` compares.

    One value per sample (row of the outputs' first dimension), the outputs of a sample summed; a
    continuous measure that still moves where the cosine reads 1.0000 (the gate's second metric).
    """
    errs = []
    for s_out, t_out in zip(student, teacher, strict=True):
        primary = [k for k in PRIMARY_OUTPUTS if k in t_out]
        num = den = None
        for key in primary or list(t_out):
            t, s = t_out[key], s_out.get(key)
            if s is None or s.shape != t.shape or not t.is_floating_point():
                continue
            t2 = t.reshape(t.shape[0], -1).double()
            s2 = s.reshape(s.shape[0], -1).double().to(t2.device)
            n_, d_ = (s2 - t2).pow(2).sum(1), t2.pow(2).sum(1)
            num, den = (n_, d_) if num is None else (num + n_, den + d_)
        if num is not None:
            errs.append(torch.where(den > 0, num / den.clamp_min(1e-300), (num > 0).double()))
    if not errs:
        raise ValueError("no comparable floating outputs between the compressed and the dense model")
    return torch.cat(errs)


def mean_interval(values: torch.Tensor, samples: int = 1000, level: float = 0.95, seed: int = 0
                  ) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` with a percentile bootstrap interval."""
    v = values.double().flatten()
    if v.numel() < 2:
        m = float(v.mean()) if v.numel() else float("nan")
        return m, m, m
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (samples, v.numel()), generator=g)
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype)).tolist()
    return float(v.mean()), lo, hi


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
