"""ONNX export of the bundled CLIP compressed 4x: accuracy, size and ONNX Runtime latency against PyTorch.

Prints, measured in one run on the CPU:

1. max |ONNX Runtime - PyTorch| of the compressed export (image and text graphs; must be < 1e-4);
2. stored size: the ONNX files and their tensors against the compressed checkpoint's tensor files,
   and the dense ONNX export for scale;
3. median latency of the image and text encoders at a few batch sizes: PyTorch dense, PyTorch
   compressed (the kernels ``optimize_execution`` chose), ONNX Runtime dense and compressed.

Usage: python benchmarks/onnx_latency.py [--threads 1] [--batches 1 8 32] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_model import compressed_checkpoint  # noqa: E402

from rcc_compression.compression.export import checkpoint_bytes, load_deployable  # noqa: E402
from rcc_compression.compression.onnx_export import export_onnx, ort_session  # noqa: E402
from rcc_compression.evaluation.efficiency import measure_latency, optimize_execution  # noqa: E402


def onnx_tensor_bytes(directory: Path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for f in sorted(directory.glob("*.onnx"))
               for i in onnx.load(str(f)).graph.initializer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--work", default=None, help="directory for the checkpoint and exports (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="rcc-onnx-"))
    ckpt = compressed_checkpoint(work / "clip-4x")
    dense = load_deployable("rcc-clip-world").wrapper
    comp = load_deployable(ckpt).wrapper
    m_comp = export_onnx(comp, work / "onnx-4x", overwrite=True)
    m_dense = export_onnx(dense, work / "onnx-dense", overwrite=True)
    optimize_execution(comp.model, comp.synthetic_batch(8, torch.Generator().manual_seed(0)))
    res: dict = {"threads": args.threads, "checkpoint_tensor_bytes": checkpoint_bytes(ckpt),
                 "onnx_bytes": m_comp["onnx_bytes"], "onnx_tensor_bytes": onnx_tensor_bytes(work / "onnx-4x"),
                 "dense_onnx_bytes": m_dense["onnx_bytes"],
                 "max_abs_diff": {k: v["max_abs_diff"] for k, v in m_comp["graphs"].items()}, "latency_ms": {}}
    print(f"rcc-clip-world 4x, CPU, {args.threads} thread(s)")
    for k, v in res["max_abs_diff"].items():
        print(f"  {k:18s} max |ONNX Runtime - PyTorch| = {v:.2e}")
    print(f"  size: ONNX {res['onnx_bytes']:,} B (tensors {res['onnx_tensor_bytes']:,} B) vs checkpoint tensors "
          f"{res['checkpoint_tensor_bytes']:,} B = {res['onnx_bytes'] / res['checkpoint_tensor_bytes']:.3f}x "
          f"(tensors {res['onnx_tensor_bytes'] / res['checkpoint_tensor_bytes']:.3f}x); "
          f"dense ONNX {res['dense_onnx_bytes']:,} B")
    sessions = {}
    for tag, d in (("dense", work / "onnx-dense"), ("4x", work / "onnx-4x")):
        sessions[tag] = {g: ort_session(d / g, args.threads) for g in ("vision_model.onnx", "text_model.onnx")}
    g = torch.Generator().manual_seed(1)
    size = dense.image_size
    print(f"  {'graph':6s} {'batch':>5s} {'torch dense':>12s} {'torch 4x':>10s} {'ORT dense':>10s} {'ORT 4x':>8s}"
          "   (median ms)")
    for batch in args.batches:
        px = torch.randn(batch, 3, size, size, generator=g)
        ids = dense.tokenize(["a small red circle above two blue squares"] * batch)
        cases = {
            "image": ((lambda w, px=px: w.encode_image(px, normalize=False)), "vision_model.onnx",
                      {"pixel_values": px.numpy()}),
            "text": ((lambda w, ids=ids: w.encode_text(ids["input_ids"], ids["attention_mask"], normalize=False)),
                     "text_model.onnx", {k: v.numpy() for k, v in ids.items()}),
        }
        for name, (fn, graph, feed) in cases.items():
            row = {}
            with torch.inference_mode():
                for tag, w in (("torch_dense", dense), ("torch_4x", comp)):
                    row[tag] = measure_latency(lambda fn=fn, w=w: fn(w), 3, args.iters)["median_ms"]
                ref = fn(comp).numpy()
            for tag in ("dense", "4x"):
                sess = sessions[tag][graph]
                row[f"ort_{tag}"] = measure_latency(lambda sess=sess, feed=feed: sess.run(None, feed), 3,
                                                    args.iters)["median_ms"]
            row["max_abs_diff"] = float(np.abs(sessions["4x"][graph].run(None, feed)[0] - ref).max())
            res["latency_ms"][f"{name}@{batch}"] = row
            print(f"  {name:6s} {batch:5d} {row['torch_dense']:12.3f} {row['torch_4x']:10.3f} {row['ort_dense']:10.3f}"
                  f" {row['ort_4x']:8.3f}   ORT 4x / torch 4x = {row['ort_4x'] / row['torch_4x']:.2f}x;"
                  f" |diff| {row['max_abs_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
