"""Zero-shot classification (docs/evaluation.md; CLIP, Radford et al., ICML 2021): prompt templates, top-k,
per-class recall.

A class's text embedding is the mean of its L2-normalised template embeddings, normalised again
(the OpenAI/CLIP_benchmark convention). Metrics: top-1 and top-5 accuracy and mean per-class
recall, each with a bootstrap 95 % CI; datasets that name held-out classes (the reference world's
unseen colour-shape pairs) also get the same metrics on the ``seen`` and ``unseen`` subsets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis.stats import DEFAULT_SAMPLES, bootstrap_ci, class_recall_statistic
from ..errors import DataError
from .common import embed_images


@lru_cache(maxsize=1)
def _template_file() -> dict[str, Any]:
    text = resources.files("rcc_compression.evaluation").joinpath("data/templates.json").read_text(encoding="utf-8")
    return json.loads(text)


def template_sets() -> list[str]:
    """Names of the shipped template sets."""
    return [k for k, v in _template_file().items() if isinstance(v, list)]


def get_templates(name_or_list: str | Sequence[str] | None, dataset: str | None = None) -> list[str]:
    """Templates by set name (``openai_imagenet``, ``world``, ``world_colour``, ``simple``) or as a list.

    ``None`` picks the dataset's default set (``openai_imagenet`` when the dataset has none).
    """
    data = _template_file()
    if name_or_list is None:
        name_or_list = data["datasets"].get(dataset or "", "openai_imagenet")
    if isinstance(name_or_list, str):
        if name_or_list not in data or not isinstance(data[name_or_list], list):
            raise DataError(f"unknown template set {name_or_list!r}; shipped: {', '.join(template_sets())}")
        return list(data[name_or_list])
    templates = list(name_or_list)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise DataError(f"templates must be non-empty strings with '{{}}' for the class name; bad: {bad[:3]}")
    return templates


@torch.no_grad()
def classifier_weights(
    wrapper: Any, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Class text embeddings (C x D): mean of normalised template embeddings, normalised again."""
    prompts = [t.format(c) for c in classnames for t in templates]
    parts = [
        wrapper.encode_text(prompts[i : i + batch_size], normalize=True) for i in range(0, len(prompts), batch_size)
    ]
    emb = torch.cat(parts).float().view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, np.ndarray]:
    """For each k, whether the true label is among the k highest logits (one bool per item)."""
    out = {}
    order = logits.argsort(dim=1, descending=True)
    for k in ks:
        kk = min(k, logits.shape[1])
        out[k] = (order[:, :kk] == labels[:, None]).any(dim=1).cpu().numpy()
    return out


def per_class_recall(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of every class (NaN for classes without items)."""
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    totals = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / totals, np.nan)


def zero_shot_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """top-k accuracies and mean per-class recall with bootstrap CIs, from logits and labels."""
    labels_np = labels.cpu().numpy().astype(np.int64)
    num_classes = logits.shape[1]
    correct = topk_correct(logits, labels, ks)
    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"top{k}"] = bootstrap_ci(correct[k].astype(np.float64), samples=samples, seed=seed).to_dict()
    top1 = correct[min(ks)].astype(np.float64)
    stat = class_recall_statistic(labels_np, num_classes)
    metrics["mean_per_class_recall"] = bootstrap_ci(top1, stat, samples=samples, seed=seed, strata=labels_np).to_dict()
    return metrics


@torch.no_grad()
def evaluate_zero_shot(
    wrapper: Any,
    dataset: Any,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 64,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = False,
    per_item: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification of a class-folder (or labelled HF) dataset with a CLIP or SigLIP wrapper.

    Classes are ranked by cosine similarity, which is SigLIP's ranking too (its sigmoid score is
    monotone in it).

    ``per_item=True`` adds ``per_item``: each image's dataset index, label and top-1 hit (for
    paired significance tests between two models on the same images).
    """
    if "zero_shot" not in getattr(wrapper, "tasks", ()):
        raise DataError("zero-shot classification needs a contrastive model (CLIP, SigLIP)")
    if not dataset.classnames:
        raise DataError(f"{dataset.source}: no class names; zero-shot needs a class-name file")
    tpl_spec = templates if templates is not None else getattr(dataset, "templates", None)
    tpl = get_templates(tpl_spec)
    weights = classifier_weights(wrapper, dataset.classnames, tpl)
    images, index = embed_images(wrapper, dataset, batch_size, progress=progress, what="zero-shot images")
    labels = torch.tensor([dataset.records[i].label for i in index.tolist()])
    logits = images.float() @ weights.t().to(images.device).float()
    result: dict[str, Any] = {
        "metrics": zero_shot_metrics(logits, labels, samples, seed),
        "templates": tpl_spec if isinstance(tpl_spec, str) else f"{len(tpl)} custom",
        "num_templates": len(tpl),
        "num_classes": len(dataset.classnames),
        "items": int(labels.numel()),
    }
    if per_item:
        hit = topk_correct(logits, labels.to(logits.device), (1,))[1]
        result["per_item"] = {"index": index.tolist(), "label": labels.tolist(), "top1": hit.astype(int).tolist()}
    held_out = set((getattr(dataset, "meta", {}) or {}).get("held_out_pairs", []))
    unseen_cls = torch.tensor([name in held_out for name in dataset.classnames])
    if held_out and unseen_cls.any():
        mask = unseen_cls[labels]
        for name, sel in (("seen", ~mask), ("unseen", mask)):
            if sel.any():
                result[f"metrics_{name}"] = zero_shot_metrics(logits[sel], labels[sel], samples, seed)
                result[f"items_{name}"] = int(sel.sum())
    return result
