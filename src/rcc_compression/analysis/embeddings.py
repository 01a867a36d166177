"""Embedding geometry: how compression moves image and text embeddings, in numbers and in 2-D maps.

An :class:`EmbeddingSet` holds the images of a labelled dataset and every class's prompts (one
point per template) as one model embeds them (``rcc analyze`` collects them). :func:`project_2d`
maps points to the plane with t-SNE (scikit-learn) or UMAP (umap-learn); :func:`joint_projection`
fits one map on dense and compressed points together, so the two panels share coordinates and a
shift between them is a real shift. The numbers behind the picture, computed in the full
embedding space:

- :func:`knn_accuracy`: leave-one-out k-nearest-neighbour class accuracy (cosine);
- :func:`neighbourhood_overlap`: share of each item's k nearest neighbours that stay neighbours;
- :func:`embedding_drift`: cosine similarity between an item's dense and compressed embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Method = Literal["tsne", "umap"]


@dataclass
class EmbeddingSet:
    """Normalised embeddings with class labels: ``images`` (N x D), ``texts`` (C*T x D), and their labels."""

    images: np.ndarray
    image_labels: np.ndarray
    texts: np.ndarray
    text_labels: np.ndarray
    classnames: list[str]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest neighbours (cosine) of every row, itself excluded."""
    x = _normalise(x)
    if k >= x.shape[0]:
        raise ValueError(f"k={k} needs more than {k} points, got {x.shape[0]}")
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    part = np.argpartition(-sim, k, axis=1)[:, :k]
    return part


def knn_accuracy(x: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN class accuracy under cosine similarity (majority vote, ties to the lowest class)."""
    labels = np.asarray(labels, dtype=np.int64)
    nb = _neighbours(x, k)
    votes = np.zeros((labels.size, int(labels.max()) + 1))
    np.add.at(votes, (np.repeat(np.arange(labels.size), k), labels[nb].ravel()), 1.0)
    return float((votes.argmax(axis=1) == labels).mean())


def neighbourhood_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each item's ``k`` nearest neighbours in ``a`` that are among its ``k`` nearest in ``b``."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two embeddings must hold the same items, got {a.shape[0]} and {b.shape[0]}")
    na, nb = _neighbours(a, k), _neighbours(b, k)
    n = a.shape[0]
    ma = np.zeros((n, n), dtype=bool)
    ma[np.repeat(np.arange(n), k), na.ravel()] = True
    hits = ma[np.repeat(np.arange(n), k), nb.ravel()].reshape(n, k).sum(axis=1)
    return float(hits.mean() / k)


def embedding_drift(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Cosine similarity of each item's two embeddings: mean, 5th percentile, minimum."""
    if a.shape != b.shape:
        raise ValueError(f"the two embeddings must have one shape, got {a.shape} and {b.shape}")
    cos = (_normalise(a) * _normalise(b)).sum(axis=1)
    return {"mean_cosine": float(cos.mean()), "p05_cosine": float(np.quantile(cos, 0.05)),
            "min_cosine": float(cos.min())}


def project_2d(x: np.ndarray, method: Method = "tsne", seed: int = 0, perplexity: float = 30.0,
               n_neighbors: int = 15) -> np.ndarray:
    """A 2-D map of the rows of ``x`` (cosine geometry): t-SNE (scikit-learn) or UMAP (umap-learn)."""
    x = _normalise(x)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"a 2-D map needs at least 4 points, got {n}")
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), metric="cosine", init="pca",
                    random_state=seed).fit_transform(x.astype(np.float32))
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), metric="cosine", random_state=seed,
                            n_jobs=1)
        return np.asarray(reducer.fit_transform(x.astype(np.float32)))
    raise ValueError(f"unknown method {method!r}; allowed: tsne, umap")


def joint_projection(dense: EmbeddingSet, compressed: EmbeddingSet, method: Method = "tsne", seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """One 2-D map fitted on dense and compressed images and texts together, split back per set."""
    parts = [dense.images, dense.texts, compressed.images, compressed.texts]
    y = project_2d(np.concatenate(parts), method, seed)
    cuts = np.cumsum([len(p) for p in parts])[:-1]
    di, dt, ci, ct = np.split(y, cuts)
    return {"dense_images": di, "dense_texts": dt, "compressed_images": ci, "compressed_texts": ct}


def trustworthiness(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """How faithfully a 2-D map ``y`` keeps the ``k``-neighbourhoods of ``x`` (scikit-learn; 1 is perfect)."""
    from sklearn.manifold import trustworthiness as tw

    return float(tw(_normalise(x), y, n_neighbors=k, metric="cosine"))


def embedding_report(dense: EmbeddingSet, compressed: EmbeddingSet, k: int = 10) -> dict[str, Any]:
    """The numbers: k-NN accuracy (dense, compressed), neighbourhood overlap and drift, for images and texts."""
    out: dict[str, Any] = {"k": k, "classes": len(dense.classnames)}
    for part, lab in (("images", "image_labels"), ("texts", "text_labels")):
        a, b = getattr(dense, part), getattr(compressed, part)
        labels = getattr(dense, lab)
        kk = min(k, a.shape[0] - 1)
        out[part] = {
            "items": int(a.shape[0]),
            "knn_accuracy_dense": knn_accuracy(a, labels, min(5, kk)),
            "knn_accuracy_compressed": knn_accuracy(b, labels, min(5, kk)),
            "neighbourhood_overlap": neighbourhood_overlap(a, b, kk),
            **embedding_drift(a, b),
        }
    return out
