"""Embedding geometry: neighbourhood measures with known answers, and 2-D maps that keep clusters apart."""

from __future__ import annotations

import numpy as np
import pytest

from rcc_compression.analysis.embeddings import (
    EmbeddingSet,
    embedding_drift,
    embedding_report,
    joint_projection,
    knn_accuracy,
    neighbourhood_overlap,
    project_2d,
    trustworthiness,
)


def _clusters(n_per: int = 30, classes: int = 3, dim: int = 16, spread: float = 0.3, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centres])
    return x, np.repeat(np.arange(classes), n_per)


def test_neighbourhood_measures() -> None:
    x, y = _clusters()
    assert knn_accuracy(x, y, 5) == 1.0
    assert neighbourhood_overlap(x, x, 10) == 1.0
    rng = np.random.default_rng(1)
    shuffled = x[rng.permutation(len(x))]  # the same points given to other items
    assert neighbourhood_overlap(x, shuffled, 10) < 0.5
    assert knn_accuracy(shuffled, y, 5) < 0.7
    drift = embedding_drift(x, x * 2.0)  # a rescaling leaves every cosine at 1
    assert drift["mean_cosine"] == pytest.approx(1.0) and drift["min_cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same items"):
        neighbourhood_overlap(x, x[:-1])


def test_tsne_keeps_clusters_apart_and_joint_maps_share_coordinates() -> None:
    x, y = _clusters()
    emb = project_2d(x, "tsne", seed=0, perplexity=10)
    assert emb.shape == (len(x), 2)
    assert knn_accuracy(np.c_[emb, np.ones(len(emb))], y, 5) == 1.0  # clusters stay separate in the plane
    assert trustworthiness(x, emb, 5) > 0.9
    texts, ty = x[::10], y[::10]
    dense = EmbeddingSet(x, y, texts, ty, ["a", "b", "c"])
    same = joint_projection(dense, dense, "tsne", seed=0)
    assert set(same) == {"dense_images", "dense_texts", "compressed_images", "compressed_texts"}
    assert same["dense_images"].shape == (len(x), 2) and same["compressed_texts"].shape == (len(texts), 2)
    rep = embedding_report(dense, dense, k=5)
    assert rep["images"]["neighbourhood_overlap"] == 1.0 and rep["texts"]["mean_cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown method"):
        project_2d(x, "pca")  # type: ignore[arg-type]


@pytest.mark.slow
def test_umap_keeps_clusters_apart() -> None:
    """UMAP compiles with numba on first use (minutes on a busy 2-core machine): selected with -m slow."""
    x, y = _clusters()
    emb = project_2d(x, "umap", seed=0)
    assert emb.shape == (len(x), 2)
    assert knn_accuracy(np.c_[emb, np.ones(len(emb))], y, 5) == 1.0
