"""Inference: what a compressed model stores, holds in memory and costs per call, against dense and against the
tools a user would pick instead. Every ratio is measured in one run, the latencies in alternating rounds.

Models (``--models``):

- ``vit-b32``: ``random-clip-vit-b32`` (CLIP ViT-B/32's shapes, random weights, seeded): image and text
  encoders together (batch 1: one 224 x 224 image and one caption; batch 8: eight of each, captions of
  the world's lengths). Quality: cosine of the embeddings to dense float32. Our formats are rounded to
  nearest (no planner: random weights have nothing to plan on), so this row measures speed and memory.
- ``rcc-clip-world``: the bundled reference CLIP; quality is colour+shape zero-shot top-1 on the world's
  test split. Our formats are planned by ``compress_model`` (GPTQ rounding, the per-layer planner).
- ``minilm``: all-MiniLM-L6-v2 with its real weights (``benchmarks/real_weights.py``): embedding cosine to
  dense and retrieval MRR. Planned by ``compress_model``.

Formats: dense float32 and bfloat16; ours weight-only 4x (rate 0.75) and 8x (rate 0.875) and W8A8 4x (rate
0.75, ``quant.activations: int8``), each in its inference form with the kernels ``optimize_execution``
measures fastest (for the weight-only formats, among those holding nothing beyond the stored form:
``inference.kernels: memory``); ONNX Runtime: dense, ours (W8A8 through MatMulInteger, weight-only through MatMulNBits);
the tools: onnxruntime's ``quantize_dynamic`` (int8 weights, dynamic int8 activations), torchao
(``Int8DynamicActivationInt8WeightConfig``, ``Int8WeightOnlyConfig``) and optimum-quanto (qint8 and qint4
weights). Columns: stored MB (files' tensors), resident MB (every tensor the loaded model holds; for ONNX
Runtime the process's resident-set growth when the session is made), median latency at batch 1 and 8,
ratio to dense float32, quality. With ``--rss``, ours and dense are also loaded in fresh processes and
their resident-set growth (load + one batch-8 call) compared.

Usage: python benchmarks/inference.py [--models vit-b32,rcc-clip-world,minilm] [--threads 1] [--rounds 5]
       [--no-tools] [--no-onnx] [--rss] [--device cpu|cuda] [--json out.json]
(the tools: pip install 'rcc-compression[bench]'; a tool that is not installed is a row saying so)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rcc_compression import compress_model, evaluate_model  # noqa: E402
from rcc_compression.compression.layers import held_tensor_bytes, to_inference  # noqa: E402
from rcc_compression.compression.storage import save_compressed  # noqa: E402
from rcc_compression.evaluation.efficiency import kernel_mix, measure_latency, optimize_execution  # noqa: E402
from rcc_compression.models import get_model  # noqa: E402

FORMATS = {  # name -> (compression rate, quant keys); None: dense
    "ours weight-only 4x": (0.75, {"activations": "none"}),
    "ours weight-only 8x": (0.875, {"activations": "none"}),
    "ours W8A8 4x": (0.75, {"activations": "int8", "activation_error": 1.0}),
}
FIXED = {  # the same formats without a planner (random weights): every layer the same codes
    "ours weight-only 4x": {"bits": 8, "activations": "none"},
    "ours weight-only 8x": {"bits": 4, "group_size": 128, "symmetric": False, "activations": "none"},
    "ours W8A8 4x": {"bits": 8, "activations": "int8", "activation_error": 1.0},
}


# ------------------------------------------------------------------------------ models and their inputs
class Case:
    """One model: the dense wrapper or module, inputs per batch size, calibration, and a quality measure."""

    def __init__(self, name: str, dense: nn.Module, inputs: dict[int, dict[str, torch.Tensor]],
                 calibration: list[dict[str, torch.Tensor]], quality: Callable[[nn.Module], dict[str, float]],
                 planned: bool, clip: bool) -> None:
        self.name, self.dense, self.inputs, self.calibration = name, dense, inputs, calibration
        self.quality, self.planned, self.clip = quality, planned, clip


def _clip_inputs(wrapper: Any, bs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    b = wrapper.synthetic_batch(bs, torch.Generator().manual_seed(seed))
    return {"pixel_values": b["pixel_values"], "input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _embedding_cosine(dense: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Callable[[nn.Module], dict]:
    with torch.no_grad():
        ref = [dense(**b) for b in batches]

    def quality(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            outs = [model(**b) for b in batches]
        cos = []
        for o, r in zip(outs, ref, strict=True):
            for key in ("image_embeds", "text_embeds"):
                cos.append(F.cosine_similarity(getattr(o, key).float(), getattr(r, key).float(), dim=-1).mean())
        return {"cosine": float(torch.stack(cos).mean())}

    return quality


def vit_b32_case() -> Case:
    wrapper = get_model("random-clip-vit-b32").eval()
    inputs = {bs: _clip_inputs(wrapper, bs) for bs in (1, 8)}
    calibration = [_clip_inputs(wrapper, 8, seed=s) for s in range(1, 4)]
    quality = _embedding_cosine(wrapper, [_clip_inputs(wrapper, 8, seed=s) for s in range(10, 12)])
    return Case("vit-b32", wrapper, inputs, calibration, quality, planned=False, clip=True)


def world_case() -> Case:
    wrapper = get_model("rcc-clip-world").eval()
    inputs = {bs: _clip_inputs(wrapper, bs) for bs in (1, 8)}

    def quality(model: nn.Module) -> dict[str, float]:
        res = evaluate_model(model, benchmarks=["zero_shot"], datasets=["world"], bootstrap_samples=0)
        return {"colour+shape top-1": res["results"]["zero_shot"]["world:colour_shape"]["metrics"]["top1"]["value"]}

    return Case("rcc-clip-world", wrapper, inputs, [], quality, planned=True, clip=True)


def minilm_case() -> Case:
    from real_weights import batches_of, calibration_texts, load_encoder, retrieval_pairs, scores

    enc, tok = load_encoder()
    pairs = retrieval_pairs(300, 1)
    q = batches_of(tok, [p[0] for p in pairs], 32)
    d = batches_of(tok, [p[1] for p in pairs], 32)
    with torch.no_grad():
        dense_emb = (torch.cat([enc(**b) for b in q]), torch.cat([enc(**b) for b in d]))
    texts = [p[1] for p in pairs[:8]]
    inputs = {bs: batches_of(tok, texts[:bs], bs)[0] for bs in (1, 8)}

    def quality(model: nn.Module) -> dict[str, float]:
        s = scores(model, q, d, dense_emb)
        return {"cosine": s["cosine"], "MRR": s["MRR"]}

    return Case("minilm", enc, inputs, batches_of(tok, calibration_texts(128, 0), 16), quality, planned=True,
                clip=False)


CASES = {"vit-b32": vit_b32_case, "rcc-clip-world": world_case, "minilm": minilm_case}


# ------------------------------------------------------------------------------ measuring
def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a model holds, each storage once; tensor subclasses (torchao, quanto) by their parts."""

    def parts(t: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return [p for n in names for p in parts(getattr(t, n))]
        if isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
            return parts(t.data)
        return [t]

    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for piece in [p for t in tensors for p in parts(t)]:
        key = piece.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += piece.untyped_storage().nbytes()
    return total


def stored_tensor_bytes(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            total += sum(_slice_bytes(h.get_slice(k)) for k in h.keys())
    return total


def _slice_bytes(s: Any) -> int:
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1, "F64": 8}
    return int(np.prod(s.get_shape())) * sizes[s.get_dtype()]


def compress(case: Case, fmt: str, work: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Our format of the case's model, saved (stored bytes from the files) and in its inference form."""
    t0 = time.perf_counter()
    model = copy.deepcopy(case.dense)
    thr = {"cascade": {"validation_threshold": 0.0}}
    if case.planned:
        rate, quant = FORMATS[fmt]
        out = compress_model(model, rate, "quant", calibration_data=case.calibration or None,
                             config={"compression": {"quant": quant, **thr}})
    else:
        quant = {"rounding": "nearest", **FIXED[fmt]}
        out = compress_model(model, None, "quant", calibration_data=case.calibration,
                             config={"compression": {"quant": quant, **thr}})
    seconds = time.perf_counter() - t0
    path = work / f"{case.name}-{fmt.replace(' ', '-')}"
    save_compressed(out, path, overwrite=True)
    inner = out.model if hasattr(out, "model") and isinstance(out.model, nn.Module) else out
    to_inference(inner)
    # weight-only formats are the memory path: no kernel that holds more than the stored form
    records = optimize_execution(out, case.inputs[8], iters=3, max_extra_bytes=0.0 if "weight-only" in fmt else None)
    stats = out.compression_stats
    acts = stats.get("stages", {}).get("quant", {}).get("activations", {})
    return out, {"stored_bytes": stored_tensor_bytes(path), "path": str(path), "kernels": kernel_mix(records),
                 "compress_s": round(seconds, 1), "rate": stats.get("achieved_rate"),
                 "int8_activation_layers": acts.get("int8")}


def tool_variants(case: Case) -> dict[str, tuple[nn.Module | None, str]]:
    """The PyTorch tools' versions of the dense model (or why a tool is not there)."""
    out: dict[str, tuple[nn.Module | None, str]] = {}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for label, cfg in (("torchao int8 dynamic act + int8 weight", Int8DynamicActivationInt8WeightConfig()),
                           ("torchao int8 weight-only", Int8WeightOnlyConfig())):
            m = copy.deepcopy(case.dense)
            quantize_(m, cfg)
            out[label] = (m, "")
    except Exception as exc:  # noqa: BLE001 - any failure of an optional tool is a row, not a crash
        out["torchao"] = (None, f"not run: {type(exc).__name__}: {str(exc)[:80]}")
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize

        for label, w in (("optimum-quanto qint8 weights", qint8), ("optimum-quanto qint4 weights", qint4)):
            m = copy.deepcopy(case.dense)
            quantize(m, weights=w)
            freeze(m)
            out[label] = (m, "")
    except Exception as exc:  # noqa: BLE001
        out["optimum-quanto"] = (None, f"not run: {type(exc).__name__}: {str(exc)[:80]}")
    return out


def onnx_variants(case: Case, ours: dict[str, nn.Module], work: Path, threads: int) -> dict[str, dict[str, Any]]:
    """ONNX Runtime sessions: dense, ours, and onnxruntime's own quantize_dynamic of the dense export."""
    import onnxruntime as ort
    import psutil

    from rcc_compression.compression.onnx_export import export_onnx, ort_session

    exports = {"ONNX dense": case.dense, **{f"ONNX {k}": v for k, v in ours.items()}}
    out: dict[str, dict[str, Any]] = {}
    for label, model in exports.items():
        d = work / label.replace(" ", "-")
        export_onnx(model, d, overwrite=True, verify=False)
        out[label] = {"dir": d}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = work / "ONNX-quantize_dynamic"
    q.mkdir(exist_ok=True)
    for g in ("vision_model.onnx", "text_model.onnx"):
        quantize_dynamic(str(work / "ONNX-dense" / g), str(q / g), weight_type=QuantType.QInt8)
    out["onnxruntime quantize_dynamic (int8)"] = {"dir": q}
    proc = psutil.Process()
    for entry in out.values():
        before = proc.memory_info().rss
        entry["sessions"] = {g: ort_session(entry["dir"] / g, threads, decode_at_load=False)
                             for g in ("vision_model.onnx", "text_model.onnx")}
        entry["stored_bytes"] = sum((entry["dir"] / g).stat().st_size for g in ("vision_model.onnx",
                                                                                 "text_model.onnx"))
        for bs in (1, 8):
            _onnx_call(entry, case.inputs[bs])
        entry["resident_bytes"] = proc.memory_info().rss - before
    del ort
    return out


def _onnx_call(entry: dict[str, Any], inputs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    s = entry["sessions"]
    img = s["vision_model.onnx"].run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0]
    txt = s["text_model.onnx"].run(None, {"input_ids": inputs["input_ids"].numpy(),
                                          "attention_mask": inputs["attention_mask"].numpy()})[0]
    return img, txt


def fresh_rss(path: str | None, name: str, dense_dir: str | None) -> dict[str, float]:
    """Resident-set growth of a fresh process that loads ``path`` (ours) or the dense model and runs batch 8.

    Measured from after a first (meta-device) model construction: transformers imports ~140 MiB of optional
    libraries then, whichever model is loaded."""
    code = f"""
import json, torch, psutil
torch.set_num_threads(1)
from rcc_compression.compression.storage import load_compressed
from transformers import CLIPConfig, CLIPModel
from rcc_compression.utils.memory import peak_resident_bytes, release_memory
with torch.device("meta"):  # the libraries a first model construction imports: not the model's memory
    CLIPModel(CLIPConfig())
release_memory()
proc = psutil.Process(); base = proc.memory_info().rss
path = {path!r}
model = load_compressed(path) if path else CLIPModel.from_pretrained({dense_dir!r})
loaded = proc.memory_info().rss
pix = torch.randn(8, 3, 224, 224); ids = torch.randint(0, 49000, (8, 20)); att = torch.ones_like(ids)
inner = model.model if hasattr(model, "model") else model
with torch.no_grad():
    inner(pixel_values=pix, input_ids=ids, attention_mask=att)
after = proc.memory_info().rss
print(json.dumps({{"load": loaded - base, "after_call": after - base,
                  "peak": peak_resident_bytes() - base}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_all(calls: dict[str, Callable[[], Any]], rounds: int, iters: int) -> dict[str, float]:
    """Median latency of each call over alternating rounds (drift on a busy machine favours none)."""
    runs: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            runs[k].append(measure_latency(fn, 1, iters)["median_ms"])
    return {k: statistics.median(v) for k, v in runs.items()}


# ------------------------------------------------------------------------------ single layers
LAYER_SHAPES = {"ViT-B/32 fc1 768->3072, 400 tokens (batch 8)": (768, 3072, 400),
                "ViT-B/32 fc2 3072->768, 400 tokens": (3072, 768, 400),
                "MiniLM fc1 384->1536, 1024 tokens": (384, 1536, 1024),
                "ViT-B/32 fc1, 50 tokens (batch 1)": (768, 3072, 50),
                "ViT-B/32 fc1, 1 token": (768, 3072, 1)}


@torch.no_grad()
def layer_table(rounds: int) -> dict[str, dict[str, float]]:
    """One Linear of each shape through every kernel: dense fp32/bf16, our layer's kernels (factored decode,
    w8a8, int8/int4 weight-only) and fbgemm's dynamic int8 Linear (per-tensor activation scale)."""
    from rcc_compression.compression.layers import CompressedLinear
    from rcc_compression.compression.quant import quantize_nearest

    out: dict[str, dict[str, float]] = {}
    print(f"\n## single layers (threads {torch.get_num_threads()}): median ms, ratio to dense fp32, relative error\n")
    for label, (n, m, tokens) in LAYER_SHAPES.items():
        lin = nn.Linear(n, m)
        x = torch.randn(tokens, n)
        ref = lin(x)
        calls: dict[str, tuple[Callable[[], Any], Any]] = {"dense fp32": (lambda lin=lin, x=x: lin(x), None)}
        lin16 = copy.deepcopy(lin).to(torch.bfloat16)
        x16 = x.bfloat16()
        calls["dense bf16"] = (lambda lin16=lin16, x16=x16: lin16(x16), None)
        for label2, bits, group, act, dtype, mode in (
                ("int8 codes, decoded per call fp32", 8, None, None, torch.float32, "factored"),
                ("W8A8 per-token (w8a8 kernel)", 8, None, 8, torch.float32, "w8a8"),
                ("int8 weight-only kernel bf16", 8, None, None, torch.bfloat16, "int8_weight"),
                ("int4 g128 weight-only kernel bf16", 4, 128, None, torch.bfloat16, "int4_weight")):
            layer = CompressedLinear.from_linear(lin)
            layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), bits, group, group is None))
            layer.set_activations(act)
            layer = layer.to(dtype).eval().compact()
            if layer.set_execution(mode):
                xi = x.to(dtype)
                calls[label2] = (lambda la=layer, xi=xi: la(xi), layer)
        dq = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(lin)), {nn.Linear},
                                                    dtype=torch.qint8)
        calls["fbgemm dynamic int8 (per-tensor activations)"] = (lambda dq=dq, x=x: dq(x), None)
        times = time_all({k: v[0] for k, v in calls.items()}, rounds, 5)
        print(f"{label}")
        rows = {}
        for name, ms in times.items():
            err = float((calls[name][0]().float() - ref).norm() / ref.norm())
            rows[name] = {"ms": ms, "vs_fp32": ms / times["dense fp32"], "rel_error": err}
            print(f"  {name:<46} {ms:9.3f} ms  {ms / times['dense fp32']:6.3f}x  error {err:.4f}")
        out[label] = rows
    return out


# ------------------------------------------------------------------------------ the run
def run_case(case: Case, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {"dense float32": case.dense,
                                    "dense bfloat16": copy.deepcopy(case.dense).to(torch.bfloat16)}
    ours: dict[str, nn.Module] = {}
    for fmt in FORMATS:
        model, info = compress(case, fmt, work)
        models[fmt] = ours[fmt] = model
        rows[fmt] = info
    for name in ("dense float32", "dense bfloat16"):
        rows[name] = {"stored_bytes": tensor_bytes(models[name])}
    if not args.no_tools:
        for label, (model, why) in tool_variants(case).items():
            rows[label] = {"note": why}
            if model is not None:
                models[label] = model
    for name, model in list(models.items()):
        try:
            rows[name]["quality"] = case.quality(model)
        except Exception as exc:  # noqa: BLE001 - a tool that cannot run this model is a row saying so
            rows[name]["note"] = f"does not run: {type(exc).__name__}: {str(exc)[:80]}"
            del models[name]
            continue
        rows[name]["resident_bytes"] = held_tensor_bytes(model) if name in ours else tensor_bytes(model)
        rows[name].setdefault("stored_bytes", rows[name]["resident_bytes"])
    onnx = onnx_variants(case, {k: v for k, v in ours.items()}, work, args.threads) if (
        case.clip and not args.no_onnx) else {}
    for bs in (1, 8):
        inputs = case.inputs[bs]
        calls: dict[str, Callable[[], Any]] = {}
        for name, model in models.items():
            calls[name] = lambda m=model, b=inputs: m(**b)
        for label, entry in onnx.items():
            calls[label] = lambda e=entry, b=inputs: _onnx_call(e, b)
        with torch.no_grad():
            times = time_all(calls, args.rounds, args.iters)
        for name, ms in times.items():
            rows.setdefault(name, {})[f"ms_bs{bs}"] = ms
    if onnx:
        with torch.no_grad():
            ref = case.dense(**case.inputs[8])
        for label, entry in onnx.items():
            img, txt = _onnx_call(entry, case.inputs[8])
            cos = [F.cosine_similarity(torch.from_numpy(got), want.float(), dim=-1).mean()
                   for got, want in ((img, ref.image_embeds), (txt, ref.text_embeds))]
            rows[label].update(stored_bytes=entry["stored_bytes"], resident_bytes=entry["resident_bytes"],
                               quality={"cosine to dense (batch 8)": float(torch.stack(cos).mean())},
                               note="resident: RSS growth of making the sessions and two calls")
    if args.rss and case.name == "vit-b32":
        dense_dir = work / "dense-hf"
        case.dense.model.save_pretrained(dense_dir)
        rows["dense float32"]["fresh_rss"] = fresh_rss(None, "dense", str(dense_dir))
        for fmt in FORMATS:
            rows[fmt]["fresh_rss"] = fresh_rss(rows[fmt]["path"], fmt, None)
    return rows


def print_table(name: str, rows: dict[str, dict[str, Any]]) -> None:
    dense = rows["dense float32"]
    print(f"\n## {name} (threads {torch.get_num_threads()})\n")
    print("| format | stored MB | resident MB | bs=1 ms | vs dense | bs=8 ms | vs dense | quality | kernels |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for fmt, r in rows.items():
        def mb(k: str, r: dict = r) -> str:
            return f"{r[k] / 1e6:.2f}" if r.get(k) else "-"

        def ms(bs: int, r: dict = r) -> tuple[str, str]:
            v = r.get(f"ms_bs{bs}")
            return ("-", "-") if v is None else (f"{v:.2f}", f"{v / dense[f'ms_bs{bs}']:.3f}x")

        q = ", ".join(f"{k} {v:.4f}" for k, v in (r.get("quality") or {}).items()) or r.get("note", "-")
        if r.get("quality") and str(fmt).startswith(("ONNX", "onnxruntime")):
            q += " (resident: RSS growth of making the sessions and two calls)"
        kern = ", ".join(f"{k} {v}" for k, v in (r.get("kernels") or {}).items()) or "-"
        print(f"| {fmt} | {mb('stored_bytes')} | {mb('resident_bytes')} | {' | '.join(ms(1))} | {' | '.join(ms(8))} "
              f"| {q} | {kern} |")
    fresh = {k: v["fresh_rss"] for k, v in rows.items() if "fresh_rss" in v}
    if fresh:
        for when, label in (("load", "after loading"), ("after_call", "after one batch-8 call")):
            d = fresh["dense float32"][when]
            print(f"\nfresh-process resident-set growth, {label}: " + "; ".join(
                f"{k} {v[when] / 2**20:.0f} MiB ({v[when] / d:.3f}x)" for k, v in fresh.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit-b32,rcc-clip-world,minilm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-tools", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--rss", action="store_true", help="fresh-process resident sets (vit-b32)")
    ap.add_argument("--layers", action="store_true", help="also the single-layer kernel table")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        print("GPU rows: not measured (this script times the CPU paths; run cascade_speed.py --device cuda)")
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="rcc-inference-"))
    results: dict[str, Any] = {}
    if args.layers:
        results["layers"] = layer_table(args.rounds)
    for name in [m for m in args.models.split(",") if m]:
        rows = run_case(CASES[name](), args, work)
        print_table(name, rows)
        results[name] = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
