"""Image-text retrieval: image-to-text and text-to-image recall at 1, 5 and 10.

Every image has several captions. An image query succeeds at k if any of its captions is among the
k most similar texts; a caption query succeeds if its image is among the k most similar images
(CLIP_benchmark's convention). The rank of the right answer is the number of candidates scoring
strictly higher, so exact ties count in the query's favour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..analysis.stats import DEFAULT_SAMPLES, bootstrap_ci, median_statistic
from ..errors import DataError
from .common import embed_images, progress_iter

KS = (1, 5, 10)


def retrieval_ranks(
    similarity: torch.Tensor, text_to_image: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank of a right caption per image, rank of the right image per caption), 0-based.

    ``similarity`` is images x texts; ``text_to_image[t]`` is the image index of caption ``t``.
    """
    n_img, n_txt = similarity.shape
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have {n_txt} entries, got {tuple(text_to_image.shape)}")
    owner = text_to_image.to(similarity.device)
    i2t = torch.empty(n_img, dtype=torch.long)
    for start in range(0, n_img, chunk):
        sim = similarity[start : start + chunk]
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        own = owner[None, :] == rows[:, None]
        best = sim.masked_fill(~own, float("-inf")).max(dim=1).values
        i2t[start : start + sim.shape[0]] = (sim > best[:, None]).sum(dim=1).cpu()
    right = similarity[owner, torch.arange(n_txt, device=similarity.device)]
    t2i = (similarity > right[None, :]).sum(dim=0).cpu()
    return i2t, t2i


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, np.ndarray]:
    """Per query, whether the rank is below k (hit at k), for each k."""
    r = ranks.cpu().numpy()
    return {k: (r < k) for k in ks}


def retrieval_metrics(
    similarity: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = KS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """``i2t_R@k`` and ``t2i_R@k`` and the median ranks (1-based), with bootstrap CIs over queries."""
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    hi, ht = recall_at_k(i2t, ks), recall_at_k(t2i, ks)
    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = bootstrap_ci(hi[k].astype(np.float64), samples=samples, seed=seed).to_dict()
        metrics[f"t2i_R@{k}"] = bootstrap_ci(ht[k].astype(np.float64), samples=samples, seed=seed + 1).to_dict()
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        metrics[f"{name}_median_rank"] = bootstrap_ci(
            ranks.numpy().astype(np.float64) + 1, median_statistic, samples=samples, seed=seed
        ).to_dict()
    return metrics


@torch.no_grad()
def evaluate_retrieval(
    wrapper: Any,
    dataset: Any,
    batch_size: int = 64,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    max_captions: int | None = None,
    progress: bool = False,
    per_item: bool = False,
) -> dict[str, Any]:
    """Retrieval on a captions dataset with a CLIP or SigLIP wrapper (all captions of every image are texts).

    Candidates are ranked by cosine similarity; SigLIP's sigmoid score ranks them the same way.

    ``per_item=True`` adds ``per_item``: the R@1 hit of every image query (``i2t_R@1``) and every
    caption query (``t2i_R@1``), in dataset order (for paired tests between two models).
    """
    if "retrieval" not in getattr(wrapper, "tasks", ()):
        raise DataError("retrieval needs a contrastive model (CLIP, SigLIP)")
    images, index = embed_images(wrapper, dataset, batch_size, progress=progress, what="retrieval images")
    texts, owner = [], []
    for row, i in enumerate(index.tolist()):
        caps = dataset.records[i].captions[:max_captions]
        texts += caps
        owner += [row] * len(caps)
    if not texts:
        raise DataError(f"{dataset.source}: no captions to retrieve")
    chunks = range(0, len(texts), 256)
    parts = [
        wrapper.encode_text(texts[s : s + 256], normalize=True).float()
        for s in progress_iter(chunks, len(chunks), "retrieval texts", progress)
    ]
    text_emb = torch.cat(parts)
    sim = images @ text_emb.t()
    result: dict[str, Any] = {
        "metrics": retrieval_metrics(sim, torch.tensor(owner), samples=samples, seed=seed),
        "images": int(images.shape[0]),
        "texts": len(texts),
    }
    if per_item:
        i2t, t2i = retrieval_ranks(sim, torch.tensor(owner))
        result["per_item"] = {"i2t_R@1": (i2t < 1).int().tolist(), "t2i_R@1": (t2i < 1).int().tolist()}
    return result
