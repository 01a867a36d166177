"""Cascade speed on a randomly initialised CLIP ViT-B/32-shaped model.

Prints, measured in one run on the device in use:

1. the default cascade (dare -> nullu -> alphaedit, design-document defaults, no fine-tuning)
   against the sum of ``torch.linalg.svd`` over the same weights (target ratio <= 1.5 on an
   H100/H200);
2. image-encoder throughput of the model compressed 2x (``compress_model(compression_rate=0.5,
   method="nullu")``: low rank is what dense kernels can turn into speed) against dense, in fp16
   on CUDA (target >= 1.5x) and fp32 on the CPU;
3. a 2:4 semi-structured sparse linear against dense (CUDA only);
4. peak memory of the cascade of 1. as a ratio to the model's bytes: the cascade runs again in a
   fresh process, which reports its peak resident set (Linux ``VmHWM``: its own, not its parent's;
   on CUDA also the peak of allocated device memory), so nothing from 1.-3. is counted. Target <= 3x. Measured with the
   teacher's weights and rollback copies in files (``cascade.offload: disk``, the default) and,
   in a second fresh process, resident (``memory``).

Usage: python benchmarks/cascade_speed.py [--device cuda|cpu] [--rounds N] [--batch 256] [--only memory]
                                          [--offload disk|memory|both]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.config import load_config
from rcc_compression.evaluation.efficiency import benchmark_2to4, measure_latency
from rcc_compression.models import get_model
from rcc_compression.models.clip import CLIPWrapper
from rcc_compression.utils.memory import peak_resident_bytes, resident_bytes


def vit_b32(device: torch.device, dtype: torch.dtype) -> CLIPWrapper:
    """A randomly initialised CLIP with ViT-B/32's shapes (``random-clip-vit-b32``), seeded."""
    return get_model("random-clip-vit-b32").to(device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def svd_baseline(model: torch.nn.Module, names: list[str], device: torch.device) -> float:
    weights = [model.get_submodule(n).weight.detach().float() for n in names]
    torch.linalg.svd(weights[0], full_matrices=False)  # library warm-up
    sync(device)
    t0 = time.perf_counter()
    for w in weights:
        torch.linalg.svd(w, full_matrices=False)
    sync(device)
    return time.perf_counter() - t0


def default_cascade(rounds: int | None, device: torch.device, offload: str | None = None) -> CascadePipeline:
    """The cascade this benchmark times: design-document defaults, no fine-tuning, no gate."""
    sets = ["compression.dare.fine_tune_epochs=0", "compression.alphaedit.num_epochs=0",
            "compression.cascade.validation_threshold=0.0"]
    if offload:
        sets.append(f"compression.cascade.offload={offload}")
    if rounds:
        sets.append(f"compression.cascade.rounds={rounds}")
    return CascadePipeline(load_config(None, sets).compression, seed=0, device=device, num_synthetic_batches=3)


def memory_child(rounds: int | None, device: torch.device, offload: str) -> dict:
    """Run the cascade once in this (fresh) process and report its memory."""
    base = resident_bytes()  # interpreter, torch and transformers imported
    model = vit_b32(device, torch.float32)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.model.parameters(), *model.model.buffers()])
    loaded = resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pipe = default_cascade(rounds, device, offload)
    t0 = time.perf_counter()
    pipe.compress(model)
    out = {"rounds": pipe.rounds, "offload": offload, "seconds": time.perf_counter() - t0,
           "model_bytes": model_bytes, "rss_after_import": base, "rss_model_loaded": loaded,
           "peak_rss": peak_resident_bytes()}
    if device.type == "cuda":
        out["peak_cuda_allocated"] = torch.cuda.max_memory_allocated()
    return out


def measure_memory(rounds: int | None, device: torch.device, offload: str) -> dict:
    """Peak memory of the cascade in a fresh process, as ratios to the model's bytes."""
    cmd = [sys.executable, __file__, "--memory-child", "--device", str(device), "--offload", offload]
    if rounds:
        cmd += ["--rounds", str(rounds)]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    mb = res["model_bytes"]
    res["peak_ratio"] = res["peak_rss"] / mb
    res["peak_over_loaded_ratio"] = (res["peak_rss"] - res["rss_model_loaded"]) / mb
    if "peak_cuda_allocated" in res:
        res["peak_cuda_ratio"] = res["peak_cuda_allocated"] / mb
    gib = 2 ** 30
    print(f"[4] peak memory, cascade of [1] ({res['rounds']} rounds, offload {offload}, {res['seconds']:.0f} s) in a "
          f"fresh process: model {mb / gib:.3f} GiB; peak resident {res['peak_rss'] / gib:.2f} GiB = "
          f"{res['peak_ratio']:.2f}x the model (target <= 3x); {res['rss_model_loaded'] / gib:.2f} GiB with the "
          f"model built and nothing run, the cascade adds {res['peak_over_loaded_ratio']:.2f}x")
    if "peak_cuda_ratio" in res:
        print(f"    peak CUDA allocated {res['peak_cuda_allocated'] / gib:.2f} GiB = {res['peak_cuda_ratio']:.2f}x")
    return res


def memory_parts(rounds: int | None, device: torch.device, offload: str) -> dict:
    """Part 4 for the offload modes asked for (``both``: files, then resident)."""
    modes = ["disk", "memory"] if offload == "both" else [offload]
    return {m: measure_memory(rounds, device, m) for m in modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=None, help="cascade rounds (default: dare.iterations = 10)")
    ap.add_argument("--batch", type=int, default=256 if torch.cuda.is_available() else 16)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--only", choices=["memory"], default=None, help="run only part 4 (peak memory)")
    ap.add_argument("--offload", choices=["disk", "memory", "both"], default="both",
                    help="part 4: where the teacher and rollback copies live (cascade.offload)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(args.rounds, device, args.offload)))
        return
    out: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.only == "memory":
        out["memory"] = memory_parts(args.rounds, device, args.offload)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)
        return

    # 1. cascade vs SVD sum
    model = vit_b32(device, torch.float32)
    pipe = default_cascade(args.rounds, device)
    names = [n for n in pipe.stages[0].layer_names(model.model)]
    svd_s = svd_baseline(model.model, names, device)
    sync(device)
    t0 = time.perf_counter()
    pipe.compress(model)
    sync(device)
    cascade_s = time.perf_counter() - t0
    per_stage: dict[str, float] = {}
    for r in pipe.records:
        per_stage[r["stage"]] = per_stage.get(r["stage"], 0.0) + r["seconds"]
    out["cascade"] = {"layers": len(names), "rounds": pipe.rounds, "cascade_s": cascade_s, "svd_sum_s": svd_s,
                      "ratio": cascade_s / svd_s, "per_stage_s": per_stage,
                      "final_layer_compression": pipe.records[-1]["achieved"]["compression_rate"]}
    print(f"[1] default cascade ({pipe.rounds} rounds, {len(names)} layers): {cascade_s:.2f} s; "
          f"sum of torch.linalg.svd: {svd_s:.2f} s; ratio {cascade_s / svd_s:.2f} (target <= 1.5 on H100/H200)")
    print("    per stage (s): " + ", ".join(f"{k} {v:.2f}" for k, v in per_stage.items()))
    del model, pipe

    # 2. compressed (2x, low rank) vs dense image-encoder throughput
    from rcc_compression import compress_model

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dense = vit_b32(device, torch.float32)
    comp = compress_model(copy.deepcopy(dense), compression_rate=0.5, method="nullu",
                          config={"compression": {"cascade": {"validation_threshold": 0.0}},
                                  "experiment": {"seed": 0}})
    rate = comp.compression_stats["achieved_rate"]
    pixels = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)
    dense.model.to(dtype)
    comp.model.to(dtype)
    iters = 20 if device.type == "cuda" else 5
    with torch.inference_mode():
        td = measure_latency(lambda: dense.model.vision_model(pixel_values=pixels), 3, iters, device)["median_ms"]
        tc = measure_latency(lambda: comp.model.vision_model(pixel_values=pixels), 3, iters, device)["median_ms"]
    out["throughput"] = {"dtype": str(dtype), "batch": args.batch, "layer_compression_rate": rate,
                         "dense_img_s": args.batch / td * 1e3, "compressed_img_s": args.batch / tc * 1e3,
                         "speedup": td / tc, "ranks": sorted({m.rank for m in compressed_layers(comp.model).values()})}
    print(f"[2] image encoder, {dtype}, batch {args.batch}, layers compressed {1 / (1 - rate):.2f}x (rate {rate:.3f}): "
          f"dense {args.batch / td * 1e3:.0f} img/s, compressed {args.batch / tc * 1e3:.0f} img/s, "
          f"speedup {td / tc:.2f}x (target >= 1.5x on GPU in fp16)")

    # 3. 2:4 vs dense
    if device.type == "cuda":
        res = benchmark_2to4(3072, 768, 12800, device)
        out["sparse_2to4"] = res
        print(f"[3] 2:4 linear 3072x768, 12800 tokens, fp16: dense {res['dense_ms']:.3f} ms, "
              f"2:4 {res['sparse_2to4_ms']:.3f} ms, speedup {res['speedup']:.2f}x")
    else:
        out["sparse_2to4"] = "not measured: 2:4 kernels need CUDA"
        print("[3] 2:4 vs dense: not measured (2:4 semi-structured kernels need CUDA)")

    # 4. peak memory of the cascade, in a fresh process
    out["memory"] = memory_parts(args.rounds, device, args.offload)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
