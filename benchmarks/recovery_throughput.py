"""Recovery-training throughput: samples per second of distillation steps on a compressed CLIP.

A step is what ``rcc train`` does per batch: teacher forward (or a read of its cached outputs),
student forward and backward, contrastive KD plus feature loss, clipping, AdamW. Prints,
measured in one run:

1. CPU, the bundled reference CLIP (``rcc-clip-world``) on world batches, 50 % magnitude-pruned:
   fp32 with the teacher computed, bf16 autocast, and fp32 with the teacher's outputs read from
   the disk cache, with their ratios to the first;
2. CUDA (skipped without a GPU): a randomly initialised ViT-B/32-shaped CLIP, 50 % pruned,
   fp32 against bf16 autocast.

Usage: python benchmarks/recovery_throughput.py [--cpu-batch 32] [--cuda-batch 256] [--steps 8] [--threads N]
       [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from typing import Any

import torch
from torch import nn

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.config import TrainingSection
from rcc_compression.models.registry import get_model
from rcc_compression.training.losses import DistillationLoss, model_family
from rcc_compression.training.recovery import trainable_parameters
from rcc_compression.training.teacher import Teacher
from rcc_compression.training.trainer import CompressionTrainer, DistillationObjective


def vit_b32(device: torch.device) -> Any:
    """A randomly initialised CLIP with ViT-B/32's shapes (``random-clip-vit-b32``)."""
    return get_model("random-clip-vit-b32").to(device)


def pruned(wrapper: Any, batch: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A 50 % magnitude-pruned copy of the wrapper's model (the engine's dare stage, no fine-tuning)."""
    student = copy.deepcopy(wrapper)
    cfg = {"cascade": {"stages": ["dare"], "validation_threshold": 0.0},
           "dare": {"pruning_rate": 0.5, "iterations": 1, "fine_tune_epochs": 0}}
    CascadePipeline(cfg, calibration_data=[batch], holdout_data=[batch], device=device).compress(student)
    return student.model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(student: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
               precision: str = "fp32", cache: bool = False, epochs: int = 2) -> float:
    """Samples per second over ``epochs`` passes of ``batches`` after one untimed pass (warm-up, cache fill)."""
    student = copy.deepcopy(student)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_fn = Teacher(teacher, cache_dir=tmp if cache else None, device=device)
        objective = DistillationObjective(DistillationLoss(model_family(student), temperature=2.0), teacher_fn)
        cfg = TrainingSection(precision=precision, scheduler="constant", learning_rate=1e-5)
        trainer = CompressionTrainer(student, objective, cfg, train_data=batches, device=device, num_epochs=epochs + 1,
                                     params=trainable_parameters(student, "compressed"))
        trainer.train_epoch()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(epochs):
            trainer.train_epoch()
        sync(device)
        elapsed = time.perf_counter() - t0
        if cache and teacher_fn.cache_hits < epochs * len(batches):
            raise RuntimeError("the teacher cache was not used")
    return epochs * sum(b["pixel_values"].shape[0] for b in batches) / elapsed


def data_for(wrapper: Any, world: bool, n: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``size``: from the reference world, or synthetic (models without a world tokenizer)."""
    if world:
        from rcc_compression.data.calibration import build_calibration_batches

        batches = build_calibration_batches(wrapper, "world", n, size, 0)
    else:
        g = torch.Generator().manual_seed(0)
        batches = [wrapper.synthetic_batch(size, g) for _ in range(n)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-batch", type=int, default=32)
    ap.add_argument("--cuda-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="batches per timed pass")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads()}

    cpu = torch.device("cpu")
    name = "rcc-clip-world"
    wrapper = get_model(name)
    batches = data_for(wrapper, True, args.steps, args.cpu_batch, cpu)
    student = pruned(wrapper, batches[0], cpu)
    fp32 = throughput(student, wrapper.model, batches, cpu)
    bf16 = throughput(student, wrapper.model, batches, cpu, precision="bf16")
    cached = throughput(student, wrapper.model, batches, cpu, cache=True)
    out["cpu"] = {"model": name, "data": "world", "batch": args.cpu_batch,
                  "samples_per_s": {"fp32": fp32, "bf16": bf16, "fp32_cached_teacher": cached},
                  "ratio_to_fp32": {"bf16": bf16 / fp32, "fp32_cached_teacher": cached / fp32}}
    print(f"CPU ({torch.get_num_threads()} threads), {name}, 50% pruned, batch {args.cpu_batch}:")
    print(f"  fp32, teacher computed       {fp32:10.1f} samples/s")
    print(f"  bf16 autocast                {bf16:10.1f} samples/s  ({bf16 / fp32:.2f}x fp32)")
    print(f"  fp32, teacher from the cache {cached:10.1f} samples/s  ({cached / fp32:.2f}x fp32)")

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        big = vit_b32(gpu)
        gbatches = data_for(big, False, max(2, args.steps // 2), args.cuda_batch, gpu)
        gstudent = pruned(big, gbatches[0], gpu)
        g32 = throughput(gstudent, big.model, gbatches, gpu)
        g16 = throughput(gstudent, big.model, gbatches, gpu, precision="bf16")
        out["cuda"] = {"device": torch.cuda.get_device_name(0), "model": "ViT-B/32-shaped CLIP, random init",
                       "batch": args.cuda_batch, "samples_per_s": {"fp32": g32, "bf16": g16},
                       "ratio_bf16_to_fp32": g16 / g32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        print(f"CUDA ({torch.cuda.get_device_name(0)}), ViT-B/32-shaped CLIP, 50% pruned, batch {args.cuda_batch}:")
        print(f"  fp32                         {g32:10.1f} samples/s")
        print(f"  bf16 autocast                {g16:10.1f} samples/s  ({g16 / g32:.2f}x fp32)")
    else:
        out["cuda"] = None
        print("CUDA: not measured: no GPU")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
