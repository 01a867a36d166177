"""Peak memory and time against depth: the sequential pipeline (a block at a time) and the whole cascade.

For each depth N a randomly initialised CLIP with N blocks in each tower (width W, MLP 4W, patch 32
on 224 px images) is written to disk as sharded safetensors (a shard at a time: the writer never
holds more than one shard of up to 1 GiB), then compressed in a *fresh process* that reports its own peak resident set
(Linux ``VmHWM``: this program's own, not the parent's size at ``fork`` that ``ru_maxrss`` carries) and wall time:

- ``sequential``: :class:`~rcc_compression.compression.sequential.SequentialPipeline` reading the
  checkpoint a block at a time (the model skeleton on the meta device) and writing the compressed
  checkpoint block by block;
- ``whole`` (``--whole``): the same compression through ``compress_model(..., pipeline="whole")``
  on the model loaded whole, its checkpoint saved, for the ratio.

The compression is ``quant`` int8 (4x of the fp32 layers; ``--rounding nearest`` or ``gptq``), or with
``--rate R`` the per-layer plan (``--stages``) for that rate. ``--bigg`` adds a CLIP ViT-bigG-shaped
model (vision 48 blocks of width 1664, MLP 8192; text 32 blocks of width 1280, MLP 5120: 2.5 B
parameters, 10 GB in fp32).

Usage: python benchmarks/scale.py --width 512 --blocks 6 12 24 48 [--whole] [--rounding nearest|gptq]
                                  [--rate 0.75 --stages quant] [--bigg] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def clip_config(width: int, blocks: int, text_width: int | None = None, text_blocks: int | None = None,
                mlp: int | None = None, text_mlp: int | None = None, heads: int = 8, text_heads: int = 8,
                patch: int = 32) -> Any:
    """A ``CLIPConfig``: vision ``blocks`` x ``width`` (224 px, ``patch``), text likewise (defaults: the same)."""
    from transformers import CLIPConfig

    tw, tb = text_width or width, text_blocks or blocks
    return CLIPConfig(
        text_config=dict(hidden_size=tw, intermediate_size=text_mlp or 4 * tw, num_hidden_layers=tb,
                         num_attention_heads=text_heads, max_position_embeddings=77),
        vision_config=dict(hidden_size=width, intermediate_size=mlp or 4 * width, num_hidden_layers=blocks,
                           num_attention_heads=heads, image_size=224, patch_size=patch),
        projection_dim=min(tw, 1280),
    )


def bigg_config() -> Any:
    """CLIP ViT-bigG/14's shapes (OpenCLIP laion2b: 2.54 B parameters)."""
    return clip_config(1664, 48, text_width=1280, text_blocks=32, mlp=8192, text_mlp=5120, heads=16, text_heads=20,
                       patch=14)


def write_random_checkpoint(config: Any, out: Path, seed: int = 0, shard_bytes: int = 1 << 30) -> int:
    """Write a randomly initialised ``CLIPModel(config)`` to ``out`` as sharded safetensors (with an index), one
    shard resident at a time; returns the bytes written."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import CLIPModel

    with init_empty_weights(include_buffers=False):
        model = CLIPModel(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    sizes = [0]
    files: list[str] = []

    def flush() -> None:
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(out / files[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1]))
            shard.clear()
            sizes.append(0)

    for key, t in model.state_dict().items():
        if t.is_meta:
            if "norm" in key and key.endswith("weight"):
                value = torch.ones(t.shape)
            elif key.endswith("bias"):
                value = torch.zeros(t.shape)
            elif key == "logit_scale":
                value = torch.tensor(2.6592)
            else:
                value = torch.randn(t.shape, generator=gen) * 0.02
        else:
            value = t.clone()
        shard[key] = value.contiguous()
        sizes[-1] += value.numel() * value.element_size()
        if sizes[-1] >= shard_bytes:
            flush()
    flush()
    total = sum(sizes)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def batches(config: Any, n: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` random image-text batches of ``size`` for a CLIP of ``config`` (16 tokens per caption)."""
    g = torch.Generator().manual_seed(seed)
    vc, tc = config.vision_config, config.text_config
    return [{"pixel_values": torch.randn(size, 3, vc.image_size, vc.image_size, generator=g),
             "input_ids": torch.randint(0, tc.vocab_size, (size, 16), generator=g),
             "attention_mask": torch.ones(size, 16, dtype=torch.long)} for _ in range(n)]


def section_dict(args: argparse.Namespace) -> dict[str, Any]:
    if args.rate is not None:
        return {"cascade": {"stages": args.stages, "validation_threshold": 0.0},
                "quant": {"rounding": args.rounding}}
    return {"cascade": {"stages": ["quant"], "validation_threshold": 0.0},
            "quant": {"bits": 8, "rounding": args.rounding}}


# --------------------------------------------------------------------------------------------- child
def child(args: argparse.Namespace) -> dict[str, Any]:
    """One compression in this (fresh) process; its peak resident set, time and what it wrote."""
    from transformers import CLIPConfig

    from rcc_compression.compression.registry import CompressionSection
    from rcc_compression.utils.memory import peak_resident_bytes, resident_bytes

    directory = Path(args.child)
    config = CLIPConfig.from_pretrained(directory)
    data = batches(config, args.batches + 1, args.batch_size, 0) if args.batches else []
    fit, hold = data[:-1], data[-1:]  # --batches 0: from the weights alone (round to nearest), no gate
    work = Path(tempfile.mkdtemp(prefix="rcc-scale-", dir=args.workdir))
    base = resident_bytes()
    t0 = time.perf_counter()
    try:
        if args.mode == "sequential":
            from rcc_compression.compression.placement import CheckpointSource
            from rcc_compression.compression.sequential import SequentialPipeline

            pipe = SequentialPipeline(CompressionSection.model_validate(section_dict(args)), calibration_data=fit,
                                      holdout_data=hold, rate=args.rate, run_dir=work / "run",
                                      output_dir=work / "compressed")
            result = pipe.run(CheckpointSource(directory))
            blocks = [{k: b[k] for k in ("block", "seconds", "peak_rss", "rss")} for b in result.blocks]
            stored = result.manifest["stored_bytes"]
        else:
            from transformers import CLIPModel

            from rcc_compression import compress_model
            from rcc_compression.compression.storage import save_compressed

            model = CLIPModel.from_pretrained(directory).eval()
            compress_model(model, args.rate, "cascade" if args.rate is not None else "quant", calibration_data=fit,
                           holdout_data=hold, pipeline="whole", progress=False,
                           config={"compression": section_dict(args)})
            stored = save_compressed(model, work / "compressed")["stored_bytes"]
            blocks = []
        seconds = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in (work / "compressed").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"peak_rss": peak_resident_bytes(), "base_rss": base, "seconds": seconds, "blocks": blocks,
            "stored_bytes": stored, "checkpoint_bytes": on_disk}


def run_child(directory: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(directory), "--mode", mode, "--rounding", args.rounding,
           "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--stages", *args.stages]
    if args.rate is not None:
        cmd += ["--rate", str(args.rate)]
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run on {directory} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, mode: str, model_bytes: int, r: dict[str, Any]) -> str:
    per = [b["seconds"] for b in r["blocks"]]
    per_block = f"{sum(per) / len(per):6.2f} s/block" if per else " " * 13
    if per:  # the highest peak seen at the end of a block (the rest: set-up, the gate, the files outside blocks)
        per_block += f", {max(b['peak_rss'] for b in r['blocks']) / GIB:.3f} GiB by the last block"
    ratio = r["stored_bytes"]["layers_dense"] / max(r["stored_bytes"]["layers"], 1)
    return (f"{label:>14} {mode:>10}  model {model_bytes / GIB:7.3f} GiB  peak RSS {r['peak_rss'] / GIB:6.3f} GiB "
            f"({r['peak_rss'] / model_bytes:5.2f}x model; {r['base_rss'] / GIB:.2f} GiB after imports)  "
            f"time {r['seconds']:8.1f} s  {per_block}  layers {ratio:.2f}x smaller")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--blocks", type=int, nargs="*", default=[6, 12, 24, 48])
    p.add_argument("--whole", action="store_true", help="also the whole cascade at each depth (the baseline)")
    p.add_argument("--bigg", action="store_true", help="also a CLIP ViT-bigG-shaped model (10 GB)")
    p.add_argument("--rate", type=float, default=None, help="plan this rate (default: int8 quant, fixed)")
    p.add_argument("--stages", nargs="+", default=["quant"])
    p.add_argument("--rounding", choices=["nearest", "gptq"], default="gptq")
    p.add_argument("--batches", type=int, default=2,
                   help="calibration batches (one more is held out); 0: none, the weights alone (--rounding nearest)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where checkpoints and run directories go (default: /tmp)")
    p.add_argument("--keep", default=None, help="keep the dense checkpoints in this directory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="sequential", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compression: "
          + (f"rate {args.rate} over {args.stages}" if args.rate is not None else "quant int8 (fixed)")
          + f", {args.rounding} rounding; " + (f"{args.batches} calibration batches of {args.batch_size} + 1 held out"
                                                if args.batches else "no calibration data (the weights alone)"))
    models = [(f"W{args.width} N{n}", clip_config(args.width, n)) for n in args.blocks]
    if args.bigg:
        models.append(("bigG", bigg_config()))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rcc-scale-models-", dir=args.workdir))
    seq_rows: list[tuple[int, dict[str, Any]]] = []
    try:
        for label, config in models:
            directory = root / label.replace(" ", "-")
            if not (directory / "model.safetensors.index.json").is_file():
                nbytes = write_random_checkpoint(config, directory)
            else:
                nbytes = json.loads((directory / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
            r = run_child(directory, "sequential", args)
            print(row(label, "sequential", nbytes, r), flush=True)
            if label != "bigG":
                seq_rows.append((nbytes, r))
            if args.whole and label != "bigG":
                w = run_child(directory, "whole", args)
                print(row(label, "whole", nbytes, w) + f"  [sequential peak / whole peak = "
                      f"{r['peak_rss'] / w['peak_rss']:.2f}]", flush=True)
            if not args.keep:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if len(seq_rows) > 1:
        depth = [float(n) for n in args.blocks]
        peaks = [r["peak_rss"] for _, r in seq_rows]
        per_block = [sum(b["seconds"] for b in r["blocks"]) / len(r["blocks"]) for _, r in seq_rows]
        total = [r["seconds"] for _, r in seq_rows]
        mean_d, mean_t = sum(depth) / len(depth), sum(total) / len(total)
        slope = (sum((d - mean_d) * (t - mean_t) for d, t in zip(depth, total, strict=True))
                 / sum((d - mean_d) ** 2 for d in depth))
        fit = [mean_t + slope * (d - mean_d) for d in depth]
        worst = max(abs(t - f) / t for t, f in zip(total, fit, strict=True))
        print(f"sequential peak RSS across depths: max/min = {max(peaks) / min(peaks):.3f} (target <= 1.10); "
              f"seconds per block: max/min = {max(per_block) / min(per_block):.3f}; total time vs depth: "
              f"{slope:.2f} s per depth step + {mean_t - slope * mean_d:.1f} s, largest departure from the line "
              f"{worst:.1%} (target <= 10 %)")

if __name__ == "__main__":
    main()
