"""A compressed model made ready to run: its inference form, its compute dtype and its kernels, by measurement.

:func:`prepare_for_inference` puts every compressed layer in its inference form (it holds what its
checkpoint stores), then tries the compute dtypes asked for (``auto``: float32 and, where the device
runs it, bfloat16) on copies of the model: each gets its own kernels
(:func:`~.efficiency.optimize_execution`), its outputs on the holdout are compared with the dense
model's (the validation gate's agreement), and the copies are timed in alternation. The fastest
that holds the gate's threshold is kept, and every figure goes in the record: never a silent swap.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..compression.calibration import output_agreement, run_outputs, to_device
from ..compression.layers import compressed_layers, to_inference
from ..models.registry import unwrap_model
from .efficiency import (
    MAX_HELD_RATIO,
    kernel_mix,
    measure_latency,
    memory_report,
    optimize_execution,
    resize_batch,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: another dtype is taken only where it takes at most this share of the model's own dtype's time
MIN_GAIN = 0.9


def dtype_candidates(dtype: str, device: torch.device) -> list[str]:
    """The compute dtypes to try: the one asked for, or for ``auto`` float32 and the half types the device
    runs fast (bfloat16 on a CPU with native bfloat16 matmuls, bfloat16 and float16 on CUDA)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"inference dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        return [dtype]
    if device.type == "cuda":
        return ["float32", "bfloat16", "float16"]
    return ["float32", "bfloat16"] if torch.backends.mkldnn.is_available() else ["float32"]


def _dtype_name(model: nn.Module) -> str:
    p = next((p for p in unwrap_model(model).parameters() if p.is_floating_point()), None)
    return "float32" if p is None else str(p.dtype).removeprefix("torch.")


@torch.no_grad()
def prepare_for_inference(
    model: nn.Module,
    probe: Mapping[str, Any],
    dtype: str = "auto",
    kernels: str = "fastest",
    holdout: Sequence[Mapping[str, Any]] | None = None,
    teacher_outputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
    threshold: float = 0.0,
    rounds: int = 5,
    iters: int = 4,
    batch_sizes: Sequence[int] = (1, 8),
    max_held: float = MAX_HELD_RATIO,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model in its inference form, in the fastest dtype that holds ``threshold``; and the record.

    ``probe`` is a batch to time on, cut or repeated to each of ``batch_sizes`` (the dtypes are compared
    by their summed times); ``holdout`` and ``teacher_outputs`` (the dense model's outputs on
    it) let a dtype be judged by the gate's agreement, else only float32 (or the one dtype asked
    for) is used. ``kernels``: ``fastest`` (each layer's fastest kernel, the compressed layers holding
    at most ``max_held`` times their stored bytes) or ``memory`` (only kernels that hold nothing beyond
    the stored form). Returns the model to use
    (``model`` itself, or a cast copy) and ``{"dtype", "kernels", "tried", "memory"}``.
    """
    if kernels not in ("fastest", "memory"):
        raise ValueError(f"inference kernels {kernels!r}; allowed: fastest, memory")
    inner = unwrap_model(model)
    to_inference(inner)
    device = next(inner.parameters()).device
    current = _dtype_name(model)
    names = dtype_candidates(dtype, device)
    judged = holdout is not None and teacher_outputs is not None and len(holdout) > 0
    if not judged:
        names = [n for n in names if n == current] or names[:1]
    trials: dict[str, nn.Module] = {}
    tried: dict[str, dict[str, Any]] = {}
    for name in names:
        trial = model if name == current else copy.deepcopy(model).to(DTYPES[name])
        records = optimize_execution(trial, probe, iters=iters, max_extra_bytes=0.0 if kernels == "memory" else None,
                                     max_held_ratio=max_held)
        entry: dict[str, Any] = {"kernels": kernel_mix(records)}
        if judged:
            entry["agreement"] = output_agreement(run_outputs(trial, holdout), teacher_outputs)
            entry["passes"] = entry["agreement"] >= threshold
        trials[name] = trial
        tried[name] = entry
    if len(trials) > 1:
        batches = [to_device(resize_batch(probe, bs), device) for bs in batch_sizes]
        times: dict[str, list[float]] = {k: [] for k in trials}
        for _ in range(rounds):  # alternating, so drift on a busy machine favours none
            for name, trial in trials.items():
                times[name].append(sum(measure_latency(lambda t=trial, b=b: t(**b), 1, iters)["median_ms"]
                                       for b in batches))
        for name in trials:
            tried[name]["ms"] = statistics.median(times[name])  # summed over the batch sizes
    ok = [n for n in trials if tried[n].get("passes", True)] or [current if current in trials else names[0]]
    chosen = min(ok, key=lambda n: tried[n].get("ms", 0.0))
    if current in ok and chosen != current and tried[chosen]["ms"] > MIN_GAIN * tried[current]["ms"]:
        chosen = current  # within the noise of the measurement: keep the model's own dtype
    out = trials[chosen]
    record = {"dtype": chosen, "asked": dtype, "kernel_policy": kernels, "max_held": max_held, "tried": tried,
              "kernels": tried[chosen]["kernels"], "threshold": threshold if judged else None,
              "judged_on_holdout": judged, "memory": memory_report(out),
              "layers": len(compressed_layers(unwrap_model(out)))}
    return out, record
