"""Latency of quantized layers against dense, measured in one run (CPU by default).

1. Single layers with the shapes of the bundled CLIP (64 -> 256), a MiniLM-L6 text encoder
   (384 -> 1536, 1536 -> 384) and ViT-B/32 (768 -> 3072), fed the tokens of a batch of 8: the
   dense matmul (fp32, bf16), an 8-bit per-channel quantized layer run as dequantize-then-matmul
   (the ``merged`` kernel: dense speed by construction) and through the int8 weight-only kernel
   ``torch.ops.aten._weight_int8pack_mm`` (fp32 and bf16 activations). Timings of the variants
   are interleaved (median of ``--rounds`` round medians).
2. The whole bundled CLIP quantized to 8 bits, its kernels chosen by measurement
   (``optimize_execution``), against the dense model at batch 1 and 8 (``compare_efficiency``).

Usage: python benchmarks/quant_speed.py [--threads N] [--device cpu|cuda] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from rcc_compression.compression.layers import CompressedLinear
from rcc_compression.compression.quant import quantize_nearest
from rcc_compression.evaluation.efficiency import measure_latency

SHAPES = {"rcc-clip-world mlp (64->256, 8x50 tokens)": (64, 256, 400),
          "MiniLM fc1 (384->1536, 8x128 tokens)": (384, 1536, 1024),
          "MiniLM fc2 (1536->384, 8x128 tokens)": (1536, 384, 1024),
          "ViT-B/32 fc1 (768->3072, 8x50 tokens)": (768, 3072, 400)}


def _layer(n: int, m: int, dtype: torch.dtype, device: torch.device) -> CompressedLinear:
    lin = torch.nn.Linear(n, m).to(device=device, dtype=dtype)
    layer = CompressedLinear.from_linear(lin)
    layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), 8))
    return layer.eval()


@torch.no_grad()
def layer_table(device: torch.device, rounds: int) -> None:
    print(f"[1] single layers on {device} ({torch.get_num_threads()} threads), median ms; ratio to dense fp32")
    for label, (n, m, tokens) in SHAPES.items():
        variants = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, n, device=device, dtype=dtype)
            layer = _layer(n, m, dtype, device)
            w = layer.weight.detach().clone()
            tag = "fp32" if dtype == torch.float32 else "bf16"
            variants[f"dense {tag}"] = lambda x=x, w=w: F.linear(x, w)
            layer.set_execution("merged")
            variants[f"int8 dequantized {tag}"] = lambda x=x, f=layer._fast[1]: F.linear(x, f)
            k8 = layer.int8_kernels()["weight"]
            variants[f"int8 kernel {tag}"] = lambda x=x, k=k8: torch.ops.aten._weight_int8pack_mm(x, k[0], k[1])
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                iters = 3 if "kernel" in name and device.type == "cpu" else 10
                times[name].append(measure_latency(fn, 1, iters, device)["median_ms"])
        base = statistics.median(times["dense fp32"])
        print(f"  {label}")
        for name, ts in times.items():
            ms = statistics.median(ts)
            print(f"    {name:<24} {ms:9.3f} ms  {ms / base:7.2f}x")


def model_table(device: torch.device) -> None:
    from rcc_compression import get_model
    from rcc_compression.compression.cascade import CascadePipeline
    from rcc_compression.evaluation.efficiency import compare_efficiency, optimize_execution

    dense = get_model("rcc-clip-world").to(device)
    model = get_model("rcc-clip-world").to(device)
    pipe = CascadePipeline({"quant": {"bits": 8, "rounding": "nearest"},
                            "cascade": {"stages": ["quant"], "validation_threshold": 0.0}})
    pipe.run(model)
    batch = model.synthetic_batch(8, torch.Generator().manual_seed(0))
    kernels = optimize_execution(model, batch)
    effs = compare_efficiency({"dense": dense, "int8": model}, batch, batch_sizes=(1, 8), rounds=5)
    chosen = {k: list(kernels.values()).count(k) for k in sorted(set(kernels.values()))}
    print(f"[2] rcc-clip-world quantized to 8 bits on {device}; kernels chosen by measurement: {chosen}")
    for bs in ("1", "8"):
        d = effs["dense"]["per_batch_size"][bs]["latency"]["median_ms"]
        q = effs["int8"]["per_batch_size"][bs]["latency"]["median_ms"]
        print(f"    batch {bs}: dense {d:.2f} ms, int8 {q:.2f} ms, ratio {q / d:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA: not measured: no GPU")
        return
    torch.manual_seed(0)
    layer_table(device, args.rounds)
    model_table(device)


if __name__ == "__main__":
    main()
