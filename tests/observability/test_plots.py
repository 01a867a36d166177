"""Plots: pure functions of run records, each checked against the numbers it draws."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from rcc_compression.analysis.snapshots import singular_values, vision_attention, weight_histograms
from rcc_compression.visualization.compression_plots import layer_grid, layer_heatmap_figure, spectra_figure
from rcc_compression.visualization.figures import FIGURES, draw_run_figures, save_figure
from rcc_compression.visualization.model_plots import cls_maps, rollout
from rcc_compression.visualization.records import load_run

RUN_FIGURES = {name for name, spec in FIGURES.items() if spec.scope == "run"}
EXPECTED = {"rate_quality", "cascade_trace", "layer_heatmap", "spectra", "weights", "attention", "training"}


def test_the_job_writes_every_figure_as_png_and_svg(small_run):
    for name in EXPECTED:
        png, svg = small_run / "figures" / f"{name}.png", small_run / "figures" / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert b"<svg" in svg.read_bytes()[:400], name


def test_every_registered_figure_draws_from_records_alone(small_run):
    figs = draw_run_figures(load_run(small_run))
    assert EXPECTED <= set(figs) <= RUN_FIGURES
    assert all(isinstance(f, Figure) for f in figs.values())


def test_a_run_without_records_draws_nothing(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "running"}))
    assert draw_run_figures(load_run(tmp_path)) == {}


def test_heatmap_cells_are_the_manifest_numbers(small_run):
    run = load_run(small_run)
    manifest = json.loads((small_run / "compressed" / "manifest.json").read_text())
    rows = run.layer_table()
    assert [r["layer"] for r in rows] == list(manifest["layers"])
    labels, cols, grid = layer_grid(rows, "rank")
    assert grid.shape == (len(labels), len(cols)) and np.isfinite(grid).sum() == len(rows)
    assert sorted(grid[np.isfinite(grid)].tolist()) == sorted(float(i["rank"]) for i in manifest["layers"].values())
    _, _, sparsity = layer_grid(rows, "sparsity")
    expected = [1 - i["nnz"] / (i["in_features"] * i["out_features"]) for i in manifest["layers"].values()]
    assert np.allclose(sorted(sparsity.ravel()), sorted(expected))
    fig = layer_heatmap_figure(run)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
        "sparsity of S", "rank kept / full rank", "stored / dense bytes"]


def test_heatmap_shows_bit_width_once_layers_are_quantized(small_run, tmp_path):
    run_dir = tmp_path / "quantized"
    shutil.copytree(small_run, run_dir, ignore=shutil.ignore_patterns("wandb", "tensorboard", "checkpoints"))
    mpath = run_dir / "compressed" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for k, info in enumerate(manifest["layers"].values()):
        info["quant"] = {"weight": {"bits": 4 if k % 2 else 8, "group_size": 32, "symmetric": True}}
    mpath.write_text(json.dumps(manifest))
    run = load_run(run_dir)
    _, _, bits = layer_grid(run.layer_table(), "bits")
    assert sorted(set(bits.ravel().tolist())) == [4.0, 8.0]
    titles = [ax.get_title() for ax in layer_heatmap_figure(run).axes if ax.get_title()]
    assert "bit width" in titles


def test_spectra_are_the_dense_weights_singular_values_with_the_kept_rank(small_run):
    run = load_run(small_run)
    views = run.views
    ranks = views["meta"]["ranks"]
    assert ranks == {r["layer"]: r["rank"] for r in run.layer_table()}
    for name in views["meta"]["layers"]:
        s = views["tensors"][f"spectrum/{name}"]
        assert np.all(np.diff(s) <= 1e-6) and s[-1] >= 0
    ranked = [n for n, r in ranks.items() if r > 0]
    fig = spectra_figure(run, ranked[:1])
    line = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert line and line[0].get_xdata()[0] == ranks[ranked[0]]


def test_figure_maths_on_known_inputs():
    torch.manual_seed(0)
    w = {"a": torch.randn(6, 4), "b": torch.randn(6, 4), "c": torch.randn(3, 5)}
    sv = singular_values(w)
    for k, t in w.items():
        assert torch.allclose(sv[k], torch.linalg.svdvals(t), atol=1e-5)
    h = weight_histograms(w, {k: v * (v.abs() > 0.5) for k, v in w.items()}, bins=9)
    for k, t in w.items():
        assert h[k]["dense"].sum() == t.numel() == h[k]["compressed"].sum()
        assert h[k]["compressed"][4] >= (t.abs() <= 0.5).sum()  # pruned entries land in the bin around 0
    attn = torch.softmax(torch.randn(3, 5, 5), -1).numpy()
    eye = np.broadcast_to(np.eye(5), (3, 5, 5))
    assert np.allclose(rollout(eye), np.eye(5)) and np.allclose(rollout(attn).sum(-1), 1)
    maps = cls_maps(attn, 2)
    assert all(m.shape == (2, 2) and np.isclose(m.sum(), 1) for m in maps.values())


def test_vision_attention_restores_the_model(tiny_clip):
    model = tiny_clip.model
    before = model.config._attn_implementation
    model.train()
    attn = vision_attention(model, tiny_clip.synthetic_batch(1, torch.Generator().manual_seed(0))["pixel_values"])
    assert model.config._attn_implementation == before and model.training
    assert attn.shape[0] == model.config.vision_config.num_hidden_layers
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:2]), atol=1e-5)


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_save_figure_is_atomic_and_complete(tmp_path, fmt):
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    (path,) = save_figure(fig, tmp_path / "f", [fmt])
    assert path.name == f"f.{fmt}" and path.stat().st_size > 100 and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_pareto_front_of_a_search(search_dir):
    run = load_run(search_dir)
    assert run.kind == "study"
    figs = draw_run_figures(run)
    assert set(figs) == {"pareto"}
    ax = figs["pareto"].axes[0]
    front_line = next(ln for ln in ax.get_lines() if ln.get_label() == "Pareto front")
    assert list(front_line.get_xdata()) == [400.0, 500.0, 900.0] and list(front_line.get_ydata()) == [0.95, 0.97, 0.99]
    assert ax.get_xlabel() == "stored_bytes" and ax.get_ylabel() == "retention"


def test_metric_labels_for_legends_and_tables():
    from rcc_compression.visualization.compression_plots import metric_label

    assert metric_label("zero_shot world:colour_shape top1") == "zero-shot top-1 (colour_shape)"
    assert metric_label("retrieval world:captions i2t_R@1", short=False) == "retrieval R@1 image->text (world:captions)"
    assert metric_label("not a result key") == "not a result key"
