"""Efficiency metrics (docs/evaluation.md): parameters, bytes, FLOPs, latency, memory.

Counts distinguish what a compressed model *stores* from the dense model it replaces, and FLOPs
come in three labelled kinds: ``dense`` (the uncompressed model, ``FlopCounterMode``),
``executed`` (what the compressed model's kernels really run: S as a dense matmul) and
``sparsity_aware`` (counting only non-zeros of S and the low-rank products; reachable only with
sparse kernels). Latency is the median of timed runs after warm-up, reported next to the
theoretical savings, because pruned is not the same as faster.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression.calibration import to_device
from ..compression.dare import nm_mask
from ..compression.layers import CompressedLinear, compressed_layers, held_tensor_bytes
from ..compression.storage import SHARD_DIR, dense_bytes, stored_bytes
from ..models.registry import unwrap_model


def _inner(model: nn.Module) -> nn.Module:
    return unwrap_model(model)


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``dense_equivalent`` (as if uncompressed), ``stored`` (numbers saved), ``nonzero``."""
    inner = _inner(model)
    layers = compressed_layers(inner)
    prefixes = tuple(f"{n}." for n in layers)
    rest = sum(p.numel() for k, p in inner.state_dict().items() if not k.startswith(prefixes) and p.is_floating_point())
    dense_eq = rest + sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                          for m in layers.values())
    stored = rest + sum(
        m.nnz() + m.rank * (m.in_features + m.out_features)
        + sum(t.numel() for t in (m.a_in, m.a_out, m.bias) if t is not None)
        for m in layers.values()
    )
    nonzero = rest + sum(int((m.effective_weight() != 0).sum()) for m in layers.values())
    return {"dense_equivalent": dense_eq, "stored": stored, "nonzero_effective": nonzero,
            "compressed_layers": len(layers), "stored_bytes_layers": sum(stored_bytes(m) for m in layers.values())}


def storage_report(model: nn.Module) -> dict[str, Any]:
    """Stored vs dense bytes and ``compression_rate = 1 - stored/dense`` for the layers and the whole model.

    Dense bytes are in the dtype the model was given (``dense_dtype``); the ``*_vs_fp32`` rates
    compare with the same model in float32.
    """
    inner = _inner(model)
    layers = compressed_layers(inner)
    prefixes = tuple(f"{n}." for n in layers)
    rest_tensors = [t for k, t in inner.state_dict().items() if not k.startswith(prefixes)]
    rest = sum(t.numel() * t.element_size() for t in rest_tensors)
    rest32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in rest_tensors)
    d_layers = sum(dense_bytes(m) for m in layers.values())
    d32 = sum(dense_bytes(m, torch.float32) for m in layers.values())
    s_layers = sum(stored_bytes(m) for m in layers.values())
    return {
        "dense_dtype": ",".join(sorted({str(m.dtype).removeprefix("torch.") for m in layers.values()})),
        "dense_bytes_layers": d_layers,
        "stored_bytes_layers": s_layers,
        "rest_bytes": rest,
        "dense_bytes_model": d_layers + rest,
        "stored_bytes_model": s_layers + rest,
        "compression_rate_layers": 1.0 - s_layers / d_layers if d_layers else 0.0,
        "compression_rate_model": 1.0 - (s_layers + rest) / (d_layers + rest) if d_layers + rest else 0.0,
        "compression_rate_layers_vs_fp32": 1.0 - s_layers / d32 if d32 else 0.0,
        "compression_rate_model_vs_fp32": 1.0 - (s_layers + rest) / (d32 + rest32) if d32 + rest32 else 0.0,
    }


def memory_report(model: nn.Module) -> dict[str, Any]:
    """What the loaded model holds: ``resident_bytes`` (every tensor, each storage once: parameters,
    buffers, codes, kernel copies, decode scratch), its ratio to the stored bytes, and the kernel mix."""
    inner = _inner(model)
    layers = compressed_layers(inner)
    held = held_tensor_bytes(inner)
    stored = storage_report(inner)["stored_bytes_model"]
    return {"resident_bytes": held, "stored_bytes": stored, "resident_vs_stored": held / stored if stored else None,
            "inference_form_layers": sum(1 for m in layers.values() if m.is_compact),
            "kernels": dict(Counter(m.execution for m in layers.values()))}


def measured_storage(path: str | Path) -> dict[str, int]:
    """Bytes on disk of a saved compressed checkpoint (tensor files and everything)."""
    path = Path(path)
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    out = {"layers_file": files.get("layers.safetensors", 0), "rest_file": files.get("rest.safetensors", 0),
           "total": sum(files.values())}
    shards = sum(size for rel, size in files.items() if rel.startswith(f"{SHARD_DIR}/"))
    if shards:  # written a block at a time: each block's tensors in a file of its own
        out["shard_files"] = shards
    return out


def _layer_flops(layer: CompressedLinear, tokens: int) -> tuple[int, int, int]:
    """(dense, executed, sparsity-aware) multiply-add FLOPs (2 per MAC) of one layer for ``tokens`` rows."""
    m, n, r = layer.out_features, layer.in_features, layer.rank
    dense = 2 * tokens * m * n
    s_exec = 2 * tokens * m * n if (layer.weight is not None or layer.base is not None) else 0
    lr = 2 * tokens * r * (m + n)
    nnz = layer.nnz() + (m * n if layer.base is not None else 0)
    return dense, s_exec + lr, 2 * tokens * nnz + lr


@torch.no_grad()
def flops_report(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, int]:
    """FLOPs of one forward pass on ``batch``: dense, executed and sparsity-aware (labelled)."""
    from torch.utils.flop_counter import FlopCounterMode

    inner = _inner(model)
    device = next(inner.parameters()).device
    layers = compressed_layers(inner)
    tokens: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: tokens.__setitem__(
        n, tokens.get(n, 0) + args[0].numel() // args[0].shape[-1])) for n, m in layers.items()]
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            inner(**to_device(batch, device))
    finally:
        for h in hooks:
            h.remove()
    executed_total = int(counter.get_total_flops())
    d = e = s = 0
    for n, m in layers.items():
        ld, le, ls = _layer_flops(m, tokens.get(n, 0))
        d, e, s = d + ld, e + le, s + ls
    base = executed_total - e
    return {"dense_flops": base + d, "executed_flops": executed_total, "sparsity_aware_flops": base + s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], Any], warmup: int = 2, iters: int = 10, device: torch.device | None = None
                    ) -> dict[str, float]:
    """Median, min and p90 wall time (ms) of ``fn`` after ``warmup`` calls."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "iters": iters}


def peak_memory(fn: Callable[[], Any], device: torch.device | None = None, interval: float = 0.001) -> dict[str, int]:
    """Peak memory while ``fn`` runs: max allocated on CUDA, peak process RSS (sampled) on CPU."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "increase_bytes": int(peak - base), "kind": "cuda_max_allocated"}
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {"peak_bytes": int(peak[0]), "increase_bytes": int(peak[0] - base), "kind": "cpu_rss_sampled"}


def resize_batch(batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """The batch with its leading dimension repeated or cut to ``size``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            reps = -(-size // v.shape[0])
            out[k] = v.repeat(reps, *([1] * (v.dim() - 1)))[:size]
        else:
            out[k] = v
    return out


@torch.no_grad()
def profile_model(
    model: nn.Module,
    batch: Mapping[str, Any],
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 2,
    iters: int = 10,
) -> dict[str, Any]:
    """Complete efficiency profile: parameters, bytes, FLOPs, latency and peak memory per batch size."""
    inner = _inner(model)
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    try:
        report: dict[str, Any] = {"parameters": parameter_report(inner), "storage": storage_report(inner),
                                  "memory": memory_report(inner), "device": str(device), "per_batch_size": {}}
        for bs in batch_sizes:
            b = to_device(resize_batch(batch, bs), device)
            entry = {"flops": flops_report(inner, b)}
            entry["latency"] = measure_latency(lambda b=b: inner(**b), warmup, iters, device)
            entry["memory"] = peak_memory(lambda b=b: inner(**b), device)
            report["per_batch_size"][str(bs)] = entry
    finally:
        inner.train(was_training)
    return report


def benchmark_2to4(out_features: int, in_features: int, tokens: int, device: torch.device | str = "cuda",
                   iters: int = 50) -> dict[str, float]:
    """Latency of a 2:4-sparse fp16 linear (``to_sparse_semi_structured``) vs dense on ``device``."""
    import torch.nn.functional as F

    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("2:4 semi-structured kernels need a CUDA device")
    from torch.sparse import to_sparse_semi_structured

    w = torch.randn(out_features, in_features, device=device, dtype=torch.float16)
    w = w * nm_mask(w.abs(), 2, 4).to(w.dtype)
    x = torch.randn(tokens, in_features, device=device, dtype=torch.float16)
    ws = to_sparse_semi_structured(w)
    dense = measure_latency(lambda: F.linear(x, w), 5, iters, device)["median_ms"]
    sparse = measure_latency(lambda: F.linear(x, ws), 5, iters, device)["median_ms"]
    return {"dense_ms": dense, "sparse_2to4_ms": sparse, "speedup": dense / sparse}


#: kernels tried on each device, in order (``factored`` is the baseline every layer has)
CANDIDATES = {"cpu": ("merged", "w8a8", "csr", "int8_weight", "int4_weight"),
              "cuda": ("merged", "w8a8", "semi_structured", "torchao")}
#: kernels calling raw aten ops that have crashed the process on some shapes: first tried in a child process
RISKY = frozenset({"int8_weight", "int4_weight"})
_PROVEN: dict[tuple[Any, ...], str | None] = {}
#: a kernel that holds bytes beyond the stored form must take at most this share of factored's time
MIN_GAIN = 0.9
#: by default the compressed layers hold at most this multiple of their stored bytes, kernel copies included
MAX_HELD_RATIO = 1.1


def survives(fn: Callable[[], bool], timeout: float = 60.0) -> str | None:
    """Run ``fn`` in a forked child process; ``None`` when it returned True, else why not.

    A kernel that segfaults or aborts takes only the child down. Without ``fork`` (Windows) nothing
    is proven and the answer says so.
    """
    if not hasattr(os, "fork"):
        return "not proven (no fork on this platform)"
    pid = os.fork()
    if pid == 0:  # the child: one thread, no cleanup handlers, no crash report, only an exit status
        code = 2
        try:
            faulthandler.disable()
            torch.set_num_threads(1)
            code = 0 if fn() else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"did not finish in {timeout:.0f} s"
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        return f"crashed the process (signal {os.WTERMSIG(status)})"
    code = os.WEXITSTATUS(status)
    return None if code == 0 else ("raised an error" if code == 2 else "gave wrong or non-finite outputs")


def _close(out: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.isfinite(out).all()) and torch.allclose(
        out.float(), reference.float(), rtol=tol, atol=tol * float(reference.abs().max().clamp_min(1)))


def _layer_inputs(model: nn.Module, layers: Mapping[str, CompressedLinear], batch: Mapping[str, Any],
                  device: torch.device) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def remember(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the inputs stay as they are
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(remember(n)) for n, m in layers.items()]
    try:
        model(**to_device(batch, device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


@torch.no_grad()
def optimize_execution(model: nn.Module, batch: Mapping[str, Any], iters: int = 10,
                       modes: Sequence[str] | None = None, max_extra_bytes: float | None = None,
                       max_held_ratio: float | None = MAX_HELD_RATIO) -> dict[str, dict[str, Any]]:
    """Give every compressed layer its fastest eval kernel, measured on its real input shape.

    Candidates (:data:`CANDIDATES`, or ``modes``) are the kernels a layer's parts, dtype and device
    allow (:meth:`~rcc_compression.compression.layers.CompressedLinear.execution_support`): ``merged``
    everywhere, ``w8a8`` for layers whose activations are quantized, ``csr`` for sparse float S,
    the int8/int4 weight-only kernels, 2:4 and torchao on CUDA. A candidate whose output differs from
    ``factored`` beyond rounding is discarded, and one of the raw aten kernels (:data:`RISKY`) is
    first run in a child process, so a crash cannot take the job down. ``max_extra_bytes`` (a share
    of the layer's held bytes) excludes kernels that hold more than that on top, e.g. ``merged``'s
    float copy: ``0`` keeps the model at its stored size. ``max_held_ratio`` bounds the whole model:
    the compressed layers hold at most that multiple of their stored form's bytes (default 1.1), the
    kernels that buy the least time per extra byte giving way first; ``None`` lifts it. The stored
    (saved) form does not change.

    Returns, per layer: ``kernel``, its median ``ms``, ``held_bytes`` with it, ``stored_bytes`` (held by
    the stored form alone) and ``tried`` (each candidate's ms, or why it was not used).
    """
    inner = _inner(model)
    device = next(inner.parameters()).device
    layers = compressed_layers(inner)
    was_training = inner.training
    inner.eval()
    shapes = _layer_inputs(inner, layers, batch, device)
    records: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        if name not in shapes:
            continue
        records[name] = _choose_kernel(layer, shapes[name], device, iters, modes, max_extra_bytes)
    if max_held_ratio is not None:
        _keep_within(layers, records, max_held_ratio)
    _whole_model_check(inner, layers, records, batch, device, iters)
    for r in records.values():
        r.pop("lean")
    inner.train(was_training)
    return records


def _choose_kernel(layer: CompressedLinear, shape: tuple[int, ...], device: torch.device, iters: int,
                   modes: Sequence[str] | None, max_extra_bytes: float | None) -> dict[str, Any]:
    """Time every applicable kernel of one layer on an input of ``shape``; keep the fastest that agrees."""
    x = torch.randn(shape, device=device, dtype=layer.dtype)
    layer.set_execution("factored")
    reference = layer(x)
    base_bytes = layer.held_bytes()
    best, best_ms = "factored", measure_latency(lambda: layer(x), 2, iters, device)["median_ms"]
    lean = (best, best_ms)  # the fastest kernel holding nothing beyond the stored form
    tried: dict[str, Any] = {"factored": round(best_ms, 4)}
    for mode in modes or CANDIDATES.get(device.type, ()):
        if mode == "factored":
            continue
        why = layer.execution_support(mode)
        if why is None and mode in RISKY:
            key = (mode, layer.dtype, device.type, layer.in_features, layer.out_features, shape[:-1] != (1,))
            if key not in _PROVEN:
                _PROVEN[key] = survives(lambda m=mode: layer.set_execution(m) and _close(layer(x), reference,
                                                                                         layer.dtype))
            why = _PROVEN[key]
        if why is None and not layer.set_execution(mode):
            why = "could not be prepared"
        if why is None:
            extra = layer.held_bytes() - base_bytes
            if max_extra_bytes is not None and extra > max_extra_bytes * base_bytes:
                why = f"holds {extra} bytes more than the layer"
        if why is None:
            _sync(device)
            t0 = time.perf_counter()
            out = layer(x)
            _sync(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            if not _close(out, reference, layer.dtype):
                why = "outputs differ from factored"
            elif first_ms > 20 * best_ms + 1.0:  # far slower even allowing for a first call: not worth timing
                why = f"first call {first_ms:.1f} ms"
        if why is not None:
            tried[mode] = why
            layer.set_execution("factored")
            continue
        ms = measure_latency(lambda: layer(x), 2, iters, device)["median_ms"]
        tried[mode] = round(ms, 4)
        extra = layer.held_bytes() - base_bytes
        if extra > 0 and ms > MIN_GAIN * tried["factored"]:  # memory spent for a gain within the noise: no
            tried[mode] = f"{ms:.4f} ms: not {1 / MIN_GAIN - 1:.0%} faster for {extra} bytes more"
        elif ms < best_ms:
            best, best_ms = mode, ms
        if extra <= 0 and ms < lean[1]:
            lean = (mode, ms)
        layer.set_execution("factored")
    layer.set_execution(best)
    return {"kernel": best, "ms": best_ms, "held_bytes": layer.held_bytes(), "stored_bytes": base_bytes,
            "lean": lean, "tried": tried}


def _keep_within(layers: Mapping[str, CompressedLinear], records: dict[str, dict[str, Any]], ratio: float) -> None:
    """Hand layers back to their lean kernel (nothing held beyond the stored form) until the compressed
    layers hold at most ``ratio`` times their stored bytes, least time saved per extra byte first."""
    over = sum(r["held_bytes"] for r in records.values()) - ratio * sum(r["stored_bytes"] for r in records.values())
    extra = {n: r["held_bytes"] - r["stored_bytes"] for n, r in records.items() if r["kernel"] != r["lean"][0]}
    for n in sorted(extra, key=lambda n: (records[n]["lean"][1] - records[n]["ms"]) / max(extra[n], 1)):
        if over <= 0:
            break
        r = records[n]
        r["tried"][r["kernel"]] = f"{r['ms']:.4f} ms: beyond the model's held-bytes budget ({ratio:g}x stored)"
        r["kernel"], r["ms"] = r["lean"]
        layers[n].set_execution(r["kernel"])
        held = layers[n].held_bytes()
        over -= r["held_bytes"] - held
        r["held_bytes"] = held


def _whole_model_check(inner: nn.Module, layers: Mapping[str, CompressedLinear], records: dict[str, dict[str, Any]],
                       batch: Mapping[str, Any], device: torch.device, iters: int) -> None:
    """Layers timed alone can mislead (caches, dispatch): keep the per-layer choice only if the whole
    model runs at least as fast with it as with every layer ``factored``."""
    if all(r["kernel"] == "factored" for r in records.values()):
        return
    b = to_device(batch, device)
    plans = {"chosen": {n: r["kernel"] for n, r in records.items()}, "factored": dict.fromkeys(records, "factored")}
    times: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(3):
        for label, plan in plans.items():
            for n, kernel in plan.items():
                layers[n].set_execution(kernel)
            times[label].append(measure_latency(lambda: inner(**b), 1, iters, device)["median_ms"])
    keep = statistics.median(times["chosen"]) < statistics.median(times["factored"])
    for n, r in records.items():
        if not keep:
            r["tried"]["whole model"] = "the chosen kernels were not faster together"
            r["kernel"] = "factored"
        layers[n].set_execution(r["kernel"])
        r["held_bytes"] = layers[n].held_bytes()


def kernel_mix(records: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """How many layers run each kernel (from :func:`optimize_execution`'s records)."""
    return dict(Counter(r["kernel"] for r in records.values()))


@torch.no_grad()
def compare_efficiency(
    models: Mapping[str, nn.Module],
    batch: Mapping[str, Any],
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 2,
    iters: int = 6,
    rounds: int = 7,
) -> dict[str, dict[str, Any]]:
    """:func:`profile_model` for several models, with their latencies measured interleaved.

    Timing the models in alternation (``rounds`` times, median of the round medians) keeps a busy
    or throttling machine from favouring whichever model happened to run first; many short rounds
    (7 x 6 calls) follow the machine's drift more closely than a few long ones.
    """
    reports = {}
    for name, model in models.items():
        inner = _inner(model)
        inner.eval()
        device = next(inner.parameters()).device
        rep: dict[str, Any] = {"parameters": parameter_report(inner), "storage": storage_report(inner),
                               "memory": memory_report(inner), "device": str(device), "per_batch_size": {}}
        for bs in batch_sizes:
            b = to_device(resize_batch(batch, bs), device)
            rep["per_batch_size"][str(bs)] = {"flops": flops_report(inner, b),
                                              "memory": peak_memory(lambda b=b, m=inner: m(**b), device)}
        reports[name] = rep
    for bs in batch_sizes:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                inner = _inner(model)
                device = next(inner.parameters()).device
                b = to_device(resize_batch(batch, bs), device)
                runs[name].append(measure_latency(lambda b=b, m=inner: m(**b), warmup, iters, device))
        for name, lat in runs.items():
            reports[name]["per_batch_size"][str(bs)]["latency"] = {
                "median_ms": statistics.median(r["median_ms"] for r in lat),
                "min_ms": min(r["min_ms"] for r in lat),
                "p90_ms": statistics.median(r["p90_ms"] for r in lat),
                "iters": iters * rounds,
            }
    return reports
