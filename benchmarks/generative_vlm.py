"""A generative VLM compressed: rcc-llava-world's CIDEr and VQA accuracy retained at 4x and 8x, per tower.

For the bundled LLaVA-style model it measures, in this one run, dense and compressed captioning
(CIDEr, beam 3) and VQA accuracy on the world's test split (1,000 images, 1,000 questions),
without fine-tuning:

- ``all``: every default target layer (vision tower, projector, language model) planned per
  layer (bits x rank x sparsity: dare -> nullu -> quant, GPTQ rounding, activation-aware SVD) to
  the size ratio of the compressed layers (4x: rate 0.75, 8x: rate 0.875);
- ``vision quantized`` vs ``vision skipped`` at the same bytes of the whole model (``rate_scope:
  model``): the first plans every tower, the second ignores the vision tower (stored dense) so
  the projector and language model must give up its share.

Each compression prints its per-tower bytes and the output agreement with only that tower
compressed. Calibration: 8 batches of 16 world train images (captions and questions), 2 held out.
``--no-protect`` turns the towers' default protections off (``compression.towers.protect: []``).

Usage: python benchmarks/generative_vlm.py [--ratios 4,8] [--model-ratios 2,3] [--max-items N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from rcc_compression import compress_model, evaluate_model, get_model

MODEL = "rcc-llava-world"
STAGES = {"cascade": {"stages": ["dare", "nullu", "quant"]}, "dare": {"iterations": 1, "fine_tune_epochs": 0},
          "nullu": {"decomposition_method": "activation_aware"}}
SKIP_VISION = [r"(^|\.)lm_head$", r"vision_tower"]
TARGETS = {4: 0.99, 8: 0.95}


def quality(model: Any, max_items: int | None) -> dict[str, float]:
    """CIDEr and VQA accuracy on the world's test split (beam 3 captions, greedy answers)."""
    res = evaluate_model(model, ["captioning", "vqa"], ["world"], bootstrap_samples=0, max_items=max_items)
    r = res["results"]
    return {"CIDEr": r["captioning"]["world:captions"]["metrics"]["CIDEr"]["value"],
            "VQA": r["vqa"]["world:vqa"]["metrics"]["accuracy"]["value"]}


def compress(rate: float, scope: str, skip_vision: bool, protect: bool = True) -> tuple[Any, float]:
    """A compressed copy of the reference model and the seconds it took."""
    comp: dict[str, Any] = {k: dict(v) for k, v in STAGES.items()}
    if not protect:
        comp["towers"] = {"protect": []}
    if skip_vision:
        for stage in ("dare", "nullu", "quant"):
            comp.setdefault(stage, {})["ignore"] = SKIP_VISION
    t0 = time.perf_counter()
    model = compress_model(MODEL, rate, scope=scope, config={"compression": comp}, progress=False)
    return model, time.perf_counter() - t0


def tower_lines(model: Any) -> list[str]:
    out = []
    for tower, t in model.compression_stats["towers"].items():
        agree = f", agreement alone {t['agreement_alone']:.4f}" if "agreement_alone" in t else ""
        out.append(f"    {tower:<15} {t['dense_bytes']:>9,} -> {t['stored_bytes']:>9,} bytes "
                   f"({t['compressed_layers']}/{t['linear_layers']} layers compressed{agree})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="4,8", help="size ratios of the compressed layers (all towers)")
    ap.add_argument("--model-ratios", default="2,3", help="whole-model size ratios: vision quantized vs skipped")
    ap.add_argument("--max-items", type=int, default=None, help="evaluate a seeded subset (default: all)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--no-protect", action="store_true", help="compression.towers.protect: [] (no protected layers)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dense = quality(get_model(MODEL), args.max_items)
    print(f"{MODEL} dense: CIDEr {dense['CIDEr']:.4f}, VQA accuracy {dense['VQA']:.4f}")
    rows: list[dict[str, Any]] = []
    runs = [(int(r), 1 - 1 / float(r), "layers", False, "all towers") for r in args.ratios.split(",") if r]
    for r in [r for r in args.model_ratios.split(",") if r]:
        rate = 1 - 1 / float(r)
        runs += [(float(r), rate, "model", False, "vision quantized"), (float(r), rate, "model", True,
                                                                         "vision skipped")]
    for ratio, rate, scope, skip, label in runs:
        model, secs = compress(rate, scope, skip, protect=not args.no_protect)
        q = quality(model, args.max_items)
        row = {"ratio": ratio, "rate": rate, "scope": scope, "method": label,
               "achieved_rate": model.compression_stats["achieved_rate"], "seconds": round(secs, 1),
               "CIDEr": q["CIDEr"], "VQA": q["VQA"], "CIDEr_retention": q["CIDEr"] / dense["CIDEr"],
               "VQA_retention": q["VQA"] / dense["VQA"], "towers": model.compression_stats["towers"],
               "stages": model.compression_stats.get("plan", {}).get("stages"),
               "plan_choice": (model.compression_stats.get("plan_choice") or {}).get("chosen"),
               "protection": (model.compression_stats.get("plan") or {}).get("towers", {}).get("protection")}
        rows.append(row)
        target = TARGETS.get(int(ratio)) if scope == "layers" else None
        kept = min(row["CIDEr_retention"], row["VQA_retention"])
        verdict = "" if target is None else f"  target >= {target:.0%}: {'met' if kept >= target else 'MISSED'}"
        print(f"{label:<17} {ratio:g}x ({scope}, rate {rate:.3f}, reached {row['achieved_rate']:.4f}, {secs:.0f} s): "
              f"CIDEr {q['CIDEr']:.4f} ({row['CIDEr_retention']:.2%}), VQA {q['VQA']:.4f} "
              f"({row['VQA_retention']:.2%}){verdict}")
        print("\n".join(tower_lines(model)))
        prot = row["protection"] or {}
        print(f"    plan kept after the end-to-end check: {row['plan_choice'] or 'per-layer plan'}; protected "
              f"{len(prot.get('protected', {}))} layers (lifted {len(prot.get('lifted', {}))}, released "
              f"{len(prot.get('released', []))})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": MODEL, "dense": dense, "rows": rows}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
