"""Colour+shape retention of a private recovery run (``rcc train`` with ``training.privacy``).

Evaluates zero-shot top-1 on the world's ``colour_shape`` test split for: the dense model, the
compressed model the run started from, the model the run kept (``RUN/compressed``) and the model
after its last private step (``RUN/checkpoints/last``: ``rcc train`` keeps the input model when the
noisy steps did not lower the validation loss, so this shows what DP-SGD itself left). Prints each
accuracy, its retention (compressed / dense) and the privacy the run spent.

Usage: python benchmarks/private_recovery.py --source runs/demo --run runs/demo-dp [--dense rcc-clip-world]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcc_compression.compression.storage import load_compressed
from rcc_compression.evaluation.suite import evaluate_model
from rcc_compression.models.registry import get_model
from rcc_compression.utils.io import load_safetensors


def top1(model: object) -> float:
    res = evaluate_model(model, ["zero_shot"], ["world:colour_shape"], batch_size=128, bootstrap_samples=0, seed=0)
    metrics = next(iter(res["results"]["zero_shot"].values()))["metrics"]
    value = metrics["top1"]
    return float(value["value"] if isinstance(value, dict) else value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="the compressed run rcc train started from")
    ap.add_argument("--run", type=Path, required=True, help="the rcc train run directory")
    ap.add_argument("--dense", default="rcc-clip-world")
    args = ap.parse_args()
    results = json.loads((args.run / "train_results.json").read_text(encoding="utf-8"))
    dense = top1(get_model(args.dense))
    rows = {"dense": dense, "input (compressed)": top1(load_compressed(args.source / "compressed")),
            f"kept by rcc train ({results['kept']})": top1(load_compressed(args.run / "compressed"))}
    last = args.run / "checkpoints" / "last"
    if (last / "model.safetensors").is_file():
        wrapper = load_compressed(args.source / "compressed")
        state = load_safetensors(last / "model.safetensors")
        for alias, original in json.loads((last / "trainer_state.json").read_text())["aliases"].items():
            state[alias] = state[original]
        wrapper.model.load_state_dict(state, strict=True)
        rows[f"after the last step ({results['steps']})"] = top1(wrapper)
    for name, acc in rows.items():
        print(f"{name:32s} colour+shape top-1 {acc:.4f}  retention {acc / dense:.4f}")
    private = results.get("privacy")
    if private:
        print(f"privacy: epsilon {private['epsilon_spent']:.3f} of {private['epsilon_budget']:g} (delta "
              f"{private['delta']:g}); {private['steps']} steps, noise multiplier {private['noise_multiplier']:.4f}, "
              f"sample rate {private['sample_rate']:.4g} of {private['items']} items, "
              f"clip {private['max_grad_norm']:g}")
    else:
        print("privacy: none (ordinary training)")
    print(f"val_loss {results['before'].get('val_loss', float('nan')):.4g} -> {results['after'].get('val_loss'):.4g}")


if __name__ == "__main__":
    main()
