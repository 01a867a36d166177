"""``rcc analyze RUN``: why a compressed run keeps (or loses) quality, written next to the run.

Four reports, each a part that is written whole (JSON, CSV, Markdown, figure) and skipped when
it is already there, so an interrupted analysis continues where it stopped:

- ``subspace``: per layer, principal angles and Grassmann distances between the dense and the
  compressed weight's dominant row and column spaces; subspace overlap across layers; with
  ``--against RUN2``, the same measures between the two runs' compressed layers;
- ``nullspace``: per layer, the numerical null space of the calibration inputs and the share of
  the dense (and compressed) weight's energy that lies in it;
- ``sensitivity``: every compressed layer compressed alone at the run's planned settings, ranked
  by the drop of the gate metric (and of zero-shot top-1 on the validation split when the run
  evaluates zero-shot);
- ``embeddings``: image and class-prompt embeddings of the test split, dense next to compressed,
  in t-SNE and UMAP maps fitted jointly, with k-NN accuracy, neighbourhood overlap and drift.

Everything goes to ``RUN/analysis/`` (or ``--output``), with ``report.md`` linking the parts.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis.embeddings import EmbeddingSet, embedding_report, joint_projection
from ..analysis.sensitivity import SHRINKING_STAGES, layer_sensitivity
from ..analysis.subspace import GrassmannAnalyzer
from ..compression.calibration import collect_layer_stats
from ..compression.layers import compressed_layers
from ..compression.registry import CompressionSection
from ..compression.storage import load_compressed, read_manifest
from ..config import RCCConfig, load_config
from ..data.datasets import open_world
from ..data.transforms import transform_for
from ..data.world import DEFAULT_SEED, ensure_world
from ..errors import CheckpointError, ConfigError
from ..evaluation.common import embed_images, subset
from ..evaluation.zero_shot import evaluate_zero_shot, get_templates
from ..models.registry import get_model
from ..utils.io import atomic_write_json, atomic_write_text, directory_lock
from ..utils.logging import get_logger
from ..visualization.analysis import (
    plot_embeddings,
    plot_grassmann_distances,
    plot_overlap_matrix,
    plot_sensitivity,
    short_layer_name,
)
from .api import CompressionPipeline
from .common import calibration_batches

log = get_logger("analyze")

PARTS = ("subspace", "nullspace", "sensitivity", "embeddings")
METHODS = ("tsne", "umap")


@torch.no_grad()
def collect_embeddings(wrapper: Any, dataset: Any, templates: Sequence[str] | str | None = None,
                       batch_size: int = 64) -> EmbeddingSet:
    """Image embeddings of a class-labelled dataset and one text embedding per (class, template)."""
    if not getattr(dataset, "classnames", None):
        raise ConfigError(f"{getattr(dataset, 'source', 'dataset')}: embeddings by class need class names")
    tpl = get_templates(templates if templates is not None else getattr(dataset, "templates", None))
    was_training = wrapper.training
    wrapper.eval()
    try:
        images, index = embed_images(wrapper, dataset, batch_size)
        labels = np.array([dataset.records[i].label for i in index.tolist()], dtype=np.int64)
        prompts = [t.format(c) for c in dataset.classnames for t in tpl]
        texts = torch.cat([wrapper.encode_text(prompts[i: i + 256], normalize=True).float()
                           for i in range(0, len(prompts), 256)])
    finally:
        wrapper.train(was_training)
    text_labels = np.repeat(np.arange(len(dataset.classnames)), len(tpl))
    return EmbeddingSet(images.cpu().numpy(), labels, texts.cpu().numpy(), text_labels, list(dataset.classnames))


def load_run(run_dir: Path) -> tuple[RCCConfig, Any, Any, Any]:
    """(config, dense wrapper, compressed wrapper, the compression section as planned for the run)."""
    cfg_file, ckpt = run_dir / "config.yaml", run_dir / "compressed"
    if not cfg_file.is_file() or not (ckpt / "manifest.json").is_file():
        raise CheckpointError(f"{run_dir}: not a finished compress run (needs config.yaml and compressed/)")
    cfg = load_config(cfg_file)
    manifest = read_manifest(ckpt)
    planned = (manifest.get("config") or {}).get("compression")
    section = CompressionSection.model_validate(planned) if planned else cfg.compression
    dense = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
    comp = load_compressed(ckpt, model=get_model(cfg.model.name, cfg.model.type, cfg.model.dtype,
                                                 seed=cfg.experiment.seed))
    return cfg, dense, comp, section


def world_of(cfg: RCCConfig, split: str) -> Path | None:
    """The reference world the run evaluates on (``world`` or a generated world directory), or ``None``."""
    for spec in cfg.evaluation.datasets or ["world"]:
        text = str(spec)
        if text == "world" or text.startswith("world:"):  # the world itself or one of its parts (world:captions)
            return ensure_world(DEFAULT_SEED, splits=(split,))
        path = Path(text.split("#", 1)[0]).expanduser()  # a generated world directory, or DIR#part
        if (path / "world.json").is_file():
            return path
    return None


def _table_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _done(out: Path, part: str, overwrite: bool) -> dict[str, Any] | None:
    path = out / f"{part}.json"
    if path.is_file() and not overwrite:
        log.info("%s: already written, kept (--overwrite to redo)", path)
        return json.loads(path.read_text(encoding="utf-8"))
    return None


# ----------------------------------------------------------------------------- the parts
def subspace_part(out: Path, dense: nn.Module, comp: nn.Module, energy: float,
                  against: nn.Module | None = None, title: str = "") -> dict[str, Any]:
    """Grassmann distances per layer (dense vs compressed; and vs another run), overlap across layers."""
    an = GrassmannAnalyzer(energy=energy)
    rep = an.compare_models(dense, comp)
    names = list(rep["layers"])
    rep["overlap_across_layers"] = {"dense": an.overlap_across_layers(dense, names),
                                    "compressed": an.overlap_across_layers(comp, names)}
    header = ["layer", "shape", "k", "rank_compressed", "relative_weight_error", "rows_geodesic",
              "rows_geodesic_normalised", "rows_overlap", "rows_max_angle_deg", "columns_geodesic",
              "columns_geodesic_normalised", "columns_overlap", "columns_max_angle_deg"]
    rows = [[n, "x".join(map(str, v["shape"])), v["k"], v["rank_compressed"], v["relative_weight_error"],
             v["rows"]["geodesic"], v["rows"]["geodesic_normalised"], v["rows"]["overlap"], v["rows"]["max_angle_deg"],
             v["columns"]["geodesic"], v["columns"]["geodesic_normalised"], v["columns"]["overlap"],
             v["columns"]["max_angle_deg"]] for n, v in rep["layers"].items()]
    atomic_write_text(out / "subspace.csv", _table_csv(header, rows))
    plot_grassmann_distances(rep["layers"], out / "grassmann.png", title=title or "Grassmann distance per layer")
    for which in ("dense", "compressed"):
        for dim, block in rep["overlap_across_layers"][which].items():
            if len(block["layers"]) > 1:
                plot_overlap_matrix(block["layers"], block["overlap"], out / f"overlap_{which}_{dim}.png",
                                    title=f"{which}: row-space overlap of layers reading {dim} inputs")
    if against is not None:
        rep["against"] = an.compare_runs(comp, against, names)
        plot_grassmann_distances(rep["against"]["layers"], out / "grassmann_against.png",
                                 title="Grassmann distance per layer, this run vs the other run")
    md = ["# Subspaces: dense vs compressed", "",
          f"Dominant subspaces hold {energy:.0%} of each dense weight's spectral energy (capped by the compressed "
          "rank). Geodesic distance normalised by its maximum sqrt(k) pi/2 (0: same subspace, 1: orthogonal).", "",
          "| layer | k | rank | rel. weight error | rows: distance | rows: overlap | columns: distance | "
          "columns: overlap |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {short_layer_name(n)} | {v['k']} | {v['rank_compressed']} | {v['relative_weight_error']:.4f} | "
           f"{v['rows']['geodesic_normalised']:.4f} | {v['rows']['overlap']:.4f} | "
           f"{v['columns']['geodesic_normalised']:.4f} | {v['columns']['overlap']:.4f} |"
           for n, v in rep["layers"].items()]
    s = rep["summary"]
    if s:
        md += ["", f"Mean normalised distance: rows {s['rows']['mean_geodesic_normalised']:.4f}, columns "
                   f"{s['columns']['mean_geodesic_normalised']:.4f}.", "", "![Grassmann distances](grassmann.png)"]
    atomic_write_text(out / "subspace.md", "\n".join(md) + "\n")
    atomic_write_json(out / "subspace.json", rep)
    return rep


def nullspace_part(out: Path, cfg: RCCConfig, dense: Any, comp: Any, tolerances: Sequence[float]) -> dict[str, Any]:
    """Null space of each layer's calibration inputs and the weight energy in it."""
    names = list(compressed_layers(comp.model))
    batches = calibration_batches(dense, cfg, cfg.calibration.source)
    n_hold = cfg.calibration.holdout_batches
    fit = batches[:-n_hold] if n_hold and len(batches) > n_hold else batches
    stats = collect_layer_stats(dense.model, names, fit, gram=True)
    moments = {n: stats[n].second_moment for n in names}
    rep = {"tolerances": list(tolerances), "calibration": {"source": cfg.calibration.source, "batches": len(fit)},
           "layers": GrassmannAnalyzer().null_spaces(dense.model, moments, comp.model, tolerances)}
    header = ["layer", "input_dim", "effective_rank", "rel_tol", "null_dim", "weight_energy_share",
              "compressed_weight_energy_share"]
    rows = [[n, v["input_dim"], v["effective_rank"], t["rel_tol"], t["null_dim"], t["weight_energy_share"],
             t.get("compressed_weight_energy_share")] for n, v in rep["layers"].items() for t in v["tolerances"]]
    atomic_write_text(out / "nullspace.csv", _table_csv(header, rows))
    md = ["# Null space of the calibration inputs", "",
          "Per layer: the input directions whose energy is below a tolerance times the largest eigenvalue of the "
          "calibration inputs' second moment, and the share of the weight's energy acting on them.", "",
          "| layer | inputs | effective rank | " + " | ".join(
              f"null dim @ {t:g} | weight energy @ {t:g} | compressed @ {t:g}" for t in tolerances) + " |",
          "|---|---:|---:|" + "---:|" * (3 * len(tolerances))]
    for n, v in rep["layers"].items():
        cells = " | ".join(f"{t['null_dim']} | {t['weight_energy_share']:.4f} | "
                           f"{t.get('compressed_weight_energy_share', 0.0):.4f}" for t in v["tolerances"])
        md.append(f"| {short_layer_name(n)} | {v['input_dim']} | {v['effective_rank']:.1f} | {cells} |")
    atomic_write_text(out / "nullspace.md", "\n".join(md) + "\n")
    atomic_write_json(out / "nullspace.json", rep)
    return rep


def sensitivity_part(out: Path, cfg: RCCConfig, dense: Any, comp: Any, section: Any,
                     layers: Sequence[str] | None, stages: Sequence[str] | None, task_metric: bool,
                     progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """Each compressed layer alone at the run's planned settings, ranked."""
    names = list(layers) if layers else list(compressed_layers(comp.model))
    batches = calibration_batches(dense, cfg, cfg.calibration.source)
    n_hold = cfg.calibration.holdout_batches
    fit, hold = (batches[:-n_hold], batches[-n_hold:]) if n_hold and len(batches) > n_hold else (batches, batches)
    metric_fn = None
    world = world_of(cfg, "val") if task_metric else None
    if world is not None:
        ds = open_world(world, "colour_shape", "val", transform_for(dense))

        def metric_fn(wrapper: Any) -> float:
            res = evaluate_zero_shot(wrapper, ds, batch_size=cfg.evaluation.batch_size, samples=0)
            return float(res["metrics"]["top1"]["value"])

    rep = layer_sensitivity(dense, section, names, fit, hold, stages=stages, metric_fn=metric_fn,
                            seed=cfg.experiment.seed, progress=progress, pipeline=CompressionPipeline,
                            training=cfg.training)
    rep["metric"] = "zero_shot world:colour_shape top1 (val)" if metric_fn is not None else None
    header = ["rank", "layer", "gate_retention", "gate_drop", "metric", "metric_drop", "stored_bytes", "dense_bytes"]
    rows = [[r["rank"], r["layer"], r["gate_retention"], r["gate_drop"], r.get("metric"), r.get("metric_drop"),
             r["stored_bytes"], r["dense_bytes"]] for r in rep["layers"]]
    atomic_write_text(out / "sensitivity.csv", _table_csv(header, rows))
    plot_sensitivity(rep["layers"], out / "sensitivity.png", key=rep["ranked_by"])
    md = ["# Layer sensitivity", "",
          f"Each layer compressed alone with the run's planned settings ({' > '.join(rep['stages'])}), the gate "
          "opened; ranked by the drop of " + ("zero-shot colour+shape top-1 on the validation split "
                                              f"(dense {rep['dense_metric']:.4f})" if metric_fn is not None else
                                              "output agreement with the dense model on held-out calibration batches")
          + ".", "", "| rank | layer | gate retention | metric | drop | stored / dense bytes |",
          "|---:|---|---:|---:|---:|---:|"]
    for r in rep["layers"]:
        metric = f"{r['metric']:.4f}" if r.get("metric") is not None else "-"
        md.append(f"| {r['rank']} | {short_layer_name(r['layer'])} | {r['gate_retention']:.4f} | {metric} | "
                  f"{r[rep['ranked_by']]:+.4f} | {r['stored_bytes'] / r['dense_bytes']:.3f} |")
    md += ["", "![sensitivity](sensitivity.png)"]
    atomic_write_text(out / "sensitivity.md", "\n".join(md) + "\n")
    atomic_write_json(out / "sensitivity.json", rep)
    return rep


def embeddings_part(out: Path, cfg: RCCConfig, dense: Any, comp: Any, methods: Sequence[str], max_items: int | None,
                    split: str = "test") -> dict[str, Any]:
    """Embedding measures and joint 2-D maps (dense next to compressed) on the world's colour+shape classes."""
    world = world_of(cfg, split)
    if world is None:
        return {"skipped": "embeddings by class need the reference world among evaluation.datasets"}
    ds = subset(open_world(world, "colour_shape", split, transform_for(dense)), max_items, cfg.experiment.seed)
    d = collect_embeddings(dense, ds, batch_size=cfg.evaluation.batch_size)
    c = collect_embeddings(comp, ds, batch_size=cfg.evaluation.batch_size)
    rep = embedding_report(d, c)
    rep["dataset"] = f"world:colour_shape ({split}, {len(ds)} images)"
    rep["maps"] = {}
    for method in methods:
        proj = joint_projection(d, c, method, seed=cfg.experiment.seed)  # type: ignore[arg-type]
        name = f"embeddings_{method}.png"
        plot_embeddings(proj, d.image_labels, d.text_labels, d.classnames, out / name,
                        method={"tsne": "t-SNE", "umap": "UMAP"}[method],
                        title=f"{cfg.model.name}: dense vs compressed embeddings ({rep['dataset']})")
        rep["maps"][method] = name
    md = ["# Embeddings: dense vs compressed", "", f"{rep['dataset']}, {rep['classes']} classes; k = {rep['k']}.", "",
          "| embeddings | items | k-NN accuracy dense | k-NN accuracy compressed | neighbourhood overlap | "
          "mean cosine to dense | 5th percentile |", "|---|---:|---:|---:|---:|---:|---:|"]
    for part in ("images", "texts"):
        v = rep[part]
        md.append(f"| {part} | {v['items']} | {v['knn_accuracy_dense']:.4f} | {v['knn_accuracy_compressed']:.4f} | "
                  f"{v['neighbourhood_overlap']:.4f} | {v['mean_cosine']:.4f} | {v['p05_cosine']:.4f} |")
    md += [""] + [f"![{m}]({n})" for m, n in rep["maps"].items()]
    atomic_write_text(out / "embeddings.md", "\n".join(md) + "\n")
    atomic_write_json(out / "embeddings.json", rep)
    return rep


# ----------------------------------------------------------------------------- the job
def run_analyze(
    run_dir: str | Path,
    output: str | Path | None = None,
    parts: Sequence[str] = PARTS,
    against: str | Path | None = None,
    energy: float = 0.9,
    tolerances: Sequence[float] = (1e-6, 1e-4, 1e-2),
    methods: Sequence[str] = METHODS,
    max_items: int | None = 512,
    sensitivity_layers: Sequence[str] | None = None,
    sensitivity_stages: Sequence[str] | None = SHRINKING_STAGES,
    task_metric: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the analysis reports of a compress run; returns them by part."""
    run_dir = Path(run_dir)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"unknown analysis part {bad[0]!r}; allowed: {', '.join(PARTS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown embedding method {bad[0]!r}; allowed: {', '.join(METHODS)}")
    out = Path(output) if output is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out):
        cfg, dense, comp, section = load_run(run_dir)
        other = load_run(Path(against))[2] if against is not None else None
        if task_metric is None:
            task_metric = "zero_shot" in cfg.evaluation.benchmarks and dense.model_type == "clip"
        reports: dict[str, Any] = {}
        for i, part in enumerate(parts):
            if progress is not None:
                progress("analysis parts", i, len(parts))
            done = _done(out, part, overwrite or (part == "subspace" and against is not None))
            if done is not None:
                reports[part] = done
                continue
            log.info("analysis: %s", part)
            if part == "subspace":
                reports[part] = subspace_part(out, dense.model, comp.model, energy,
                                              other.model if other is not None else None,
                                              title=f"{cfg.model.name}: Grassmann distance per layer")
            elif part == "nullspace":
                reports[part] = nullspace_part(out, cfg, dense, comp, tolerances)
            elif part == "sensitivity":
                reports[part] = sensitivity_part(out, cfg, dense, comp, section, sensitivity_layers,
                                                 sensitivity_stages, task_metric, progress)
            elif part == "embeddings":
                if dense.model_type != "clip":
                    reports[part] = {"skipped": "embeddings by class need a CLIP model"}
                    continue
                reports[part] = embeddings_part(out, cfg, dense, comp, methods, max_items)
        lines = [f"# Analysis of {run_dir}", ""] + [f"- [{p}]({p}.md)" for p in parts if (out / f"{p}.md").is_file()]
        for p in parts:  # a part that could not run says why, in the log and the report
            why = reports.get(p, {}).get("skipped")
            if why:
                log.warning("analysis: %s skipped: %s", p, why)
                lines.append(f"- {p}: skipped ({why})")
        atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
        if progress is not None:
            progress("analysis parts", len(parts), len(parts))
        return reports
