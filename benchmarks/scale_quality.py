"""Quality of the sequential pipeline against the whole cascade on a bundled model, at one rate, in one run.

Both pipelines compress the same model with ``compress_model(..., pipeline=...)`` on the same world
calibration batches (the gate's holdout held out), then the compressed models are evaluated on the
world test split (zero-shot and retrieval, bootstrap 95 % intervals). Prints, per pipeline, the rate
reached, the gate's relative output error with its interval, and the headline metrics with theirs.

Usage: python benchmarks/scale_quality.py [--model rcc-clip-world] [--rate 0.75] [--method cascade]
"""

from __future__ import annotations

import argparse
import time

from rcc_compression import compress_model, evaluate_model
from rcc_compression.jobs.compress import headline_metrics


def gate_error(stats: dict) -> tuple[float, list[float]]:
    """The gate's relative output error and its 95 % interval (whole: the last passing step; sequential: the end)."""
    if "pipeline" in stats:
        return stats["gate"]["output_error"], stats["gate"]["output_error_ci"]
    last = [r for r in stats["records"] if r.get("passed") and r.get("output_error_ci")][-1]
    return last["output_error"], last["output_error_ci"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rcc-clip-world")
    p.add_argument("--rate", type=float, default=0.75)
    p.add_argument("--method", default="cascade")
    args = p.parse_args()
    dense = evaluate_model(args.model, benchmarks=["zero_shot", "retrieval"], datasets=["world"])
    print(f"{args.model} dense: " + ", ".join(f"{k} {v:.4f}" for k, v in headline_metrics(dense).items()))
    print(f"compress_model({args.model!r}, {args.rate}, {args.method!r}, pipeline=...), world calibration")
    for pipeline in ("whole", "sequential"):
        t0 = time.perf_counter()
        model = compress_model(args.model, args.rate, args.method, pipeline=pipeline, progress=False)
        seconds = time.perf_counter() - t0
        stats = model.compression_stats
        err, (lo, hi) = gate_error(stats)
        res = evaluate_model(model, benchmarks=["zero_shot", "retrieval"], datasets=["world"])
        shown = []
        for bench, per in res["results"].items():
            for spec, r in per.items():
                for name in ("top1", "i2t_R@1", "t2i_R@1"):
                    m = r["metrics"].get(name)
                    if isinstance(m, dict):
                        shown.append(f"{bench} {spec} {name} {m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
        print(f"{pipeline:>10}: rate {stats['achieved_rate']:.4f} in {seconds:.1f} s; gate output error {err:.3e} "
              f"[{lo:.3e}, {hi:.3e}]\n    " + "\n    ".join(shown), flush=True)

if __name__ == "__main__":
    main()
