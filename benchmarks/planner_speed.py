"""Planning time and memory of the per-layer planner (bits x rank x sparsity).

1. A fixed small model, so a change that slows planning shows: a randomly initialised BERT with
   all-MiniLM-L6-v2's shapes (6 layers, width 384, 36 target Linear layers), 4 batches of 32
   random token sequences of 64 tokens, planned to 4x (``rate.apply_layer_plan``, stages dare +
   nullu + quant). Timed in alternation: the default (output-sensitivity weights, candidates
   scored on the planned prefix's inputs, ``cascade.plan_inputs: sequential``) and the one-pass
   planner on the dense model's inputs (``plan_inputs: dense``), each ``--repeats`` times; prints
   seconds, candidates per second and the ratio sequential / dense, all from one run.
2. ``--vit``: the one call ``compress_model(model, 0.75, method="cascade")`` with the default
   configuration on a ViT-B/32-shaped CLIP (``random-clip-vit-b32``, 151 M parameters) with 4
   calibration batches of 16 random image-text pairs, in a fresh process: seconds, seconds per
   phase (first to last progress report), the peak resident set as a ratio to the model's bytes
   (targets 3 minutes and 3x) and the largest resident set sampled in each phase (where the peak is).

Usage: python benchmarks/planner_speed.py [--repeats 2] [--threads N] [--vit]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import torch


def small_model() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1000, 30000, (32, 64), generator=g),
                "attention_mask": torch.ones(32, 64, dtype=torch.long)} for _ in range(4)]
    return model, batches


def plan_once(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], inputs: str) -> dict:
    from rcc_compression.compression.rate import apply_layer_plan
    from rcc_compression.compression.registry import CompressionSection

    section = CompressionSection.model_validate({"cascade": {"stages": ["dare", "nullu"], "plan_inputs": inputs}})
    t0 = time.perf_counter()
    plan = apply_layer_plan(model, section, 0.75, calibration_data=batches)
    return {"seconds": time.perf_counter() - t0, "candidates": plan["candidates"],
            "predicted_error": plan["predicted_error"]}


def small_part(repeats: int) -> dict:
    model, batches = small_model()
    runs: dict[str, list[dict]] = {"sequential": [], "dense": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(plan_once(model, batches, mode))
    best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
    cands = runs["dense"][0]["candidates"]
    print(f"[1] planning a MiniLM-shaped BERT (36 layers, {cands} candidates) to 4x, best of {repeats}: "
          f"sequential {best['sequential']:.1f} s, dense inputs {best['dense']:.1f} s "
          f"({cands / best['dense']:.1f} candidates/s); ratio sequential / dense "
          f"{best['sequential'] / best['dense']:.2f}")
    return {"runs": runs, "best": best}


def vit_child() -> dict:
    from rcc_compression import compress_model
    from rcc_compression.models import get_model
    from rcc_compression.utils.memory import peak_resident_bytes, resident_bytes

    base = resident_bytes()
    model = get_model("random-clip-vit-b32")
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.model.parameters(), *model.model.buffers()])
    g = torch.Generator().manual_seed(0)
    batches = [model.synthetic_batch(16, g) for _ in range(4)]
    phases: dict[str, list[float]] = {}
    now = ["setup"]
    rss_peak: dict[str, float] = {}  # the largest resident set sampled while each phase was the last reported
    start_rss = resident_bytes()

    def seen(what: str, done: int, total: int) -> None:
        now[0] = what.split(" ")[0].rstrip(":")
        span = phases.setdefault(now[0], [time.perf_counter() - t0] * 2)
        span[1] = time.perf_counter() - t0

    def sample(stop: threading.Event) -> None:
        while not stop.wait(0.05):
            rss = resident_bytes() or 0
            rss_peak[now[0]] = max(rss_peak.get(now[0], 0), rss)

    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop,), daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    out = compress_model(model, 0.75, "cascade", calibration_data=batches, progress=False, progress_callback=seen)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    stats = out.compression_stats
    return {"seconds": seconds, "model_bytes": model_bytes, "rss_after_import": base, "rss_at_start": start_rss,
            "peak_rss": peak_resident_bytes(), "achieved_rate": stats["achieved_rate"],
            "kept": (stats.get("plan_choice") or {}).get("chosen"), "phases": phases, "rss_peak": rss_peak,
            "skipped": [r["skipped"] for r in stats["records"] if r.get("skipped")]}


def vit_part(threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--vit-child"] + (["--threads", str(threads)] if threads else [])
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    gib = 2**30
    res["peak_ratio"] = res["peak_rss"] / res["model_bytes"]
    print(f"[2] ViT-B/32-shaped CLIP at 4x, one call with the defaults: {res['seconds']:.0f} s (target 180 s), "
          f"size {1 / (1 - res['achieved_rate']):.2f}x, kept {res['kept']}; peak resident "
          f"{res['peak_rss'] / gib:.2f} GiB = {res['peak_ratio']:.2f}x the model ({res['model_bytes'] / gib:.3f} GiB; "
          "target <= 3x)")
    print("    phases (first..last progress report, s): " +
          ", ".join(f"{k} {a:.0f}..{b:.0f}" for k, (a, b) in res["phases"].items()))
    print(f"    resident set: {res['rss_after_import'] / gib:.2f} GiB after import, "
          f"{res['rss_at_start'] / gib:.2f} GiB with the model and batches; the largest sampled while each "
          "phase was the last reported (GiB): " +
          ", ".join(f"{k} {v / gib:.2f}" for k, v in res["rss_peak"].items()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vit", action="store_true", help="also the ViT-B/32-shaped one call (fresh process)")
    ap.add_argument("--vit-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vit_child:
        print(json.dumps(vit_child()))
        return
    print(f"{torch.get_num_threads()} threads")
    if not args.skip_small:
        small_part(args.repeats)
    if args.vit:
        vit_part(args.threads)


if __name__ == "__main__":
    main()
