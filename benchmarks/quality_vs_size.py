"""Quality retained against size: single methods and the cascade at 2x, 4x and 10x.

For the bundled reference CLIP and BLIP, at each size ratio (dense bytes / stored bytes of the
compressed layers) it compresses a fresh copy with: magnitude pruning alone, wanda alone, SVD
alone, activation-aware SVD alone, activation-aware SVD with the sequential refit, the cascade in
its default order (dare(wanda) -> nullu (activation-aware, refit), budget split planned by
``compress_model``), and the same cascade followed by the closed-form alphaedit recovery (fit
on the compressed model's own inputs). No
fine-tuning anywhere. It prints retention (compressed metric / dense metric) of zero-shot top-1
and retrieval R@1 (CLIP) and CIDEr (BLIP), all measured in this one run on the world's test
split, and checks the targets.

Usage: python benchmarks/quality_vs_size.py [--models rcc-clip-world,rcc-blip-world] [--ratios 2,4,10]
       [--max-items 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from rcc_compression import compress_model, evaluate_model, get_model
from rcc_compression.data.calibration import build_calibration_batches
from rcc_compression.jobs.compress import headline_metrics

NO_FT = {"iterations": 1, "fine_tune_epochs": 0}
REFIT = {"decomposition_method": "activation_aware", "refit": "sequential"}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("dare", {"dare": {**NO_FT, "scorer": "magnitude"}}),
    "wanda": ("dare", {"dare": {**NO_FT, "scorer": "wanda"}}),
    "svd": ("nullu", {"nullu": {"decomposition_method": "svd"}}),
    "aa-svd": ("nullu", {"nullu": {"decomposition_method": "activation_aware"}}),
    "aa-svd+refit": ("nullu", {"nullu": REFIT}),
    "cascade": ("cascade", {"dare": {**NO_FT, "scorer": "wanda"}, "nullu": REFIT,
                            "cascade": {"stages": ["dare", "nullu"]}}),
    "cascade+alphaedit": ("cascade", {"dare": {**NO_FT, "scorer": "wanda"}, "nullu": REFIT,
                                      "alphaedit": {"mode": "closed_form", "fit_inputs": "sequential"},
                                      "cascade": {"stages": ["dare", "nullu", "alphaedit"]}}),
}
SINGLE = ("magnitude", "wanda", "svd", "aa-svd", "aa-svd+refit")
TARGETS = {2: 0.99, 4: 0.95, 10: 0.90}


def metrics_of(model: Any, kind: str, max_items: int, seed: int) -> dict[str, float]:
    benches = ["zero_shot", "retrieval"] if kind == "clip" else ["captioning"]
    res = evaluate_model(model, benchmarks=benches, datasets=["world"], bootstrap_samples=0, seed=seed,
                         max_items=max_items)
    keep = ("top1", "i2t_R@1", "t2i_R@1") if kind == "clip" else ("CIDEr",)
    return headline_metrics(res, keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="rcc-clip-world,rcc-blip-world")
    ap.add_argument("--ratios", default="2,4,10")
    ap.add_argument("--max-items", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    ratios = [float(r) for r in args.ratios.split(",")]
    report: dict[str, Any] = {"ratios": ratios, "models": {}}
    for name in args.models.split(","):
        dense = get_model(name)
        kind = dense.model_type
        calib = build_calibration_batches(dense, "world", 10, 32, args.seed)
        base = metrics_of(dense, kind, args.max_items, args.seed)
        print(f"\n== {name}: dense " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
        rows: dict[str, dict[str, Any]] = {}
        for ratio in ratios:
            rate = 1.0 - 1.0 / ratio
            for label, (method, section) in METHODS.items():
                t0 = time.perf_counter()
                cfg = {"compression": {**section, "cascade": {**section.get("cascade", {}),
                                                              "validation_threshold": 0.0}},
                       "experiment": {"seed": args.seed}}
                try:
                    model = compress_model(get_model(name), compression_rate=rate, method=method,
                                           calibration_data=calib[:8], config=cfg)
                except Exception as exc:  # noqa: BLE001 - a method that cannot reach a rate is a result too
                    rows[f"{ratio:g}x {label}"] = {"error": str(exc)}
                    print(f"{ratio:>4g}x {label:<18} cannot: {exc}")
                    continue
                m = metrics_of(model, kind, args.max_items, args.seed)
                ret = {k: (m[k] / base[k] if base[k] else float("nan")) for k in base}
                achieved = model.compression_stats["achieved_rate"]
                rows[f"{ratio:g}x {label}"] = {"ratio": ratio, "method": label, "achieved_rate": achieved,
                                               "metrics": m, "retention": ret,
                                               "seconds": round(time.perf_counter() - t0, 1)}
                print(f"{ratio:>4g}x {label:<18} rate {achieved:.4f}  " +
                      "  ".join(f"{k.split()[-1]} {m[k]:.4f} ({ret[k] * 100:5.1f}%)" for k in base))
        report["models"][name] = {"dense": base, "rows": rows}
        # targets
        first = next((k for k in base if "colour_shape top1" in k or k.endswith("CIDEr")), next(iter(base)))
        for ratio in ratios:
            target = TARGETS.get(int(ratio))
            best_single = max(rows.get(f"{ratio:g}x {s}", {}).get("retention", {}).get(first, 0.0) for s in SINGLE)
            casc = max(rows.get(f"{ratio:g}x {c}", {}).get("retention", {}).get(first, 0.0)
                       for c in ("cascade", "cascade+alphaedit"))
            verdict = f"{ratio:g}x: best cascade {casc * 100:.1f}% vs best single {best_single * 100:.1f}% of {first}"
            if target:
                verdict += f"; target {target * 100:.0f}%: {'met' if casc >= target else 'missed'}"
            print(verdict)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
