"""Ablation and ordering studies: variants of the cascade at equal stored bytes, over seeds, with significance.

``rcc ablate`` runs every non-empty subset of the configured stages (kept in their order) plus
any named variants; ``rcc order`` runs every permutation of the stages. Every variant compresses
to the same ``compression.cascade.target_rate`` (the planner puts each on the same stored bytes,
which the table reports as measured), once per seed; the seed changes the calibration sample and
every random draw, never the test items.

Each (variant, seed) unit is one ``rcc compress`` job in ``runs/<variant>/seed-<s>/`` followed by
a per-item evaluation (each test image's zero-shot hit, each query's R@1 hit) written to
``items.json``; a finished unit is never run again, an interrupted one resumes from its cascade
checkpoint, so a killed study continues where it stopped. The table compares every variant with
the reference (the full cascade in its configured order):

- each metric's mean over seeds with a Student-t 95 % interval, and its retention of the dense model;
- the difference from the reference, paired by test item (per-item hits averaged over seeds), with a
  paired-bootstrap 95 % interval, a paired permutation p-value, the Wilcoxon signed-rank p-value and
  the matched-pairs rank-biserial effect size;
- permutation p-values corrected with Holm-Bonferroni across the whole table.

Outputs in the study directory: ``study.json`` (the specification), ``results.json``,
``results.csv``, ``results.md`` and one figure per metric.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..analysis.significance import (
    aggregate_seeds,
    holm_bonferroni,
    paired_bootstrap_test,
    paired_permutation_test,
    wilcoxon_test,
)
from ..compression.records import last_passed
from ..compression.storage import load_compressed
from ..config import RCCConfig, dump_config, load_config, nest_keys
from ..errors import CheckpointError, CompressionError, ConfigError
from ..evaluation.suite import evaluate_model
from ..models.registry import get_model
from ..utils.io import atomic_write_json, atomic_write_text, directory_lock
from ..utils.logging import get_logger
from ..visualization.analysis import plot_comparison
from .compress import run_compress

log = get_logger("studies")

#: stages whose bytes the rate planner sets; a variant without one cannot be put on the rate
RATE_STAGES = ("dare", "nullu")
ITEM_METRICS = ("top1", "i2t_R@1", "t2i_R@1")


@dataclass
class Variant:
    """One arm of a study: a name and the config keys it changes (dotted keys)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def stages(self, base: Sequence[str]) -> list[str]:
        return list(self.overrides.get("compression.cascade.stages", base))


def subset_variants(stages: Sequence[str]) -> list[Variant]:
    """Every non-empty subset of ``stages`` in their order, the full cascade first (named ``full``)."""
    out = [Variant("full", {"compression.cascade.stages": list(stages)})]
    for r in range(len(stages) - 1, 0, -1):
        for combo in itertools.combinations(stages, r):
            out.append(Variant("+".join(combo), {"compression.cascade.stages": list(combo)}))
    return out


def order_variants(stages: Sequence[str]) -> list[Variant]:
    """Every permutation of ``stages``, the configured order first."""
    return [Variant(" > ".join(p), {"compression.cascade.stages": list(p)})
            for p in itertools.permutations(stages)]


def load_variants(path: str | Path) -> list[Variant]:
    """Named variants from YAML: ``variants: {name: {dotted.key: value, ...}, ...}``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config error: {path}: cannot read variants: {' '.join(str(exc).split())[:200]}") from None
    block = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
        raise ConfigError(f"config error: {path}: expected 'variants:' mapping names to {{config.key: value}}")
    return [Variant(str(name), dict(over)) for name, over in block.items()]


@dataclass
class StudySpec:
    """What a study runs: the base config, its variants (the first is the reference), seeds and split."""

    kind: str
    base: dict[str, Any]
    variants: list[Variant]
    seeds: list[int]
    split: str = "test"
    metrics: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": "rcc-study", "format_version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudySpec:
        if data.get("format") != "rcc-study":
            raise CheckpointError("not a study specification (study.json)")
        return cls(data["kind"], data["base"], [Variant(**v) for v in data["variants"]], list(data["seeds"]),
                   data.get("split", "test"), data.get("metrics"))

    @property
    def reference(self) -> Variant:
        return self.variants[0]


def make_spec(kind: str, cfg: RCCConfig, seeds: int | Sequence[int], extra: Sequence[Variant] = (),
              split: str = "test", metrics: Sequence[str] | None = None, subsets: bool = True) -> StudySpec:
    """A study over ``cfg``: ``ablate`` (stage subsets) or ``order`` (permutations), plus named variants.

    ``subsets=False`` (ablate only) compares the named variants with the base config alone.
    """
    if cfg.compression.cascade.target_rate is None:
        raise ConfigError("config error: compression.cascade.target_rate: a study compares variants at equal stored "
                          "bytes, so it needs a rate (--rate or compression.cascade.target_rate)")
    if not cfg.evaluation.benchmarks:
        raise ConfigError("config error: evaluation.benchmarks: a study needs task metrics (e.g. [zero_shot, "
                          "retrieval])")
    stages = list(cfg.compression.cascade.stages)
    if kind == "order" or "quant" not in stages:
        # each variant keeps its own stages in its own order: one byte split, not a per-layer plan
        # (which adds quant and fixes the order dare -> quant -> nullu)
        cfg = cfg.model_copy(deep=True)
        cfg.compression.cascade.planner = "split"
    if kind == "ablate":
        variants = subset_variants(stages) if subsets else subset_variants(stages)[:1]
    elif kind == "order":
        variants = order_variants(stages)
    else:
        raise ValueError(f"unknown study kind {kind!r}")
    names = [v.name for v in variants]
    for v in extra:
        if v.name in names:
            raise ConfigError(f"config error: variant {v.name!r} is already in the study; rename it")
        names.append(v.name)
        variants.append(v)
    seed_list = list(range(cfg.experiment.seed, cfg.experiment.seed + seeds)) if isinstance(seeds, int) else list(
        seeds)
    if not seed_list:
        raise ConfigError("config error: a study needs at least one seed")
    spec = StudySpec(kind, dump_config(cfg), variants, seed_list, split, list(metrics) if metrics else None)
    for v in variants:  # every variant's config must validate before anything runs
        variant_config(spec, v, seed_list[0])
    return spec


def variant_config(spec: StudySpec, variant: Variant, seed: int) -> RCCConfig:
    """The config of one unit: the base, the variant's keys, the seed."""
    try:
        return load_config(None, data=_merge(spec.base, nest_keys({**variant.overrides, "experiment.seed": seed})))
    except ConfigError as exc:
        raise ConfigError(f"variant {variant.name!r}: {exc}") from None


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def slug(name: str) -> str:
    """A directory name for a variant."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name.replace(" > ", "-")).strip("_") or "variant"


# ----------------------------------------------------------------------------- per-item evaluation
def item_scores(wrapper: Any, cfg: RCCConfig, split: str) -> dict[str, Any]:
    """Per-item hits of the configured benchmarks: ``{"metrics": {key: mean}, "items": {key: [0/1, ...]}}``."""
    res = evaluate_model(wrapper, benchmarks=cfg.evaluation.benchmarks, datasets=cfg.evaluation.datasets or ["world"],
                         split=split, batch_size=cfg.evaluation.batch_size, bootstrap_samples=0,
                         seed=cfg.experiment.seed, per_item=True)
    items: dict[str, list[int]] = {}
    for bench, per_dataset in res["results"].items():
        for ds, r in per_dataset.items():
            for name, hits in r.get("per_item", {}).items():
                if name in ITEM_METRICS:
                    items[f"{bench} {ds} {name}"] = list(hits)
            if "index" in r.get("per_item", {}):
                items[f"{bench} {ds} index"] = list(r["per_item"]["index"])
    return {"metrics": {k: float(np.mean(v)) for k, v in items.items() if not k.endswith(" index")},
            "items": items}


# ----------------------------------------------------------------------------- the runner
def run_study(spec: StudySpec, run_dir: str | Path, resume: bool = False,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run every (variant, seed) unit not yet finished, then write the table. Returns the results."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with directory_lock(run_dir):
        spec_file = run_dir / "study.json"
        if resume and spec_file.is_file():
            saved = StudySpec.from_json(json.loads(spec_file.read_text(encoding="utf-8")))
            if saved.to_json() != spec.to_json():
                raise CheckpointError(f"{run_dir}: holds a study with another specification; resume it with its own "
                                      "(rcc ablate/order --resume DIR) or use a new directory")
        atomic_write_json(spec_file, spec.to_json())
        units = [(v, s) for v in spec.variants for s in spec.seeds]
        total = len(units) + 1
        _dense_unit(spec, run_dir)
        if progress is not None:
            progress(f"{spec.kind}: units", 1, total)
        for i, (variant, seed) in enumerate(units, 2):
            _run_unit(spec, variant, seed, run_dir)
            if progress is not None:
                progress(f"{spec.kind}: units", i, total)
        results = compare_variants(spec, run_dir)
        generate_report(spec, results, run_dir)
        return results


def _dense_unit(spec: StudySpec, run_dir: Path) -> dict[str, Any]:
    path = run_dir / "dense" / "items.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    cfg = variant_config(spec, spec.reference, spec.seeds[0])
    wrapper = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
    out = item_scores(wrapper, cfg, spec.split)
    atomic_write_json(path, out)
    return out


def _run_unit(spec: StudySpec, variant: Variant, seed: int, run_dir: Path) -> dict[str, Any]:
    unit = run_dir / "runs" / slug(variant.name) / f"seed-{seed}"
    done = unit / "items.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    cfg = variant_config(spec, variant, seed)
    stages = list(cfg.compression.cascade.stages)
    record: dict[str, Any] = {"variant": variant.name, "seed": seed, "stages_configured": stages}
    if not any(s in RATE_STAGES for s in stages):
        record.update(applicable=False, reason=f"no stage of {stages} changes stored bytes at a planned rate "
                                               f"(needs {' or '.join(RATE_STAGES)})")
        atomic_write_json(done, record)
        return record
    resume_unit = (unit / "progress.json").is_file()
    if unit.exists() and not resume_unit:
        shutil.rmtree(unit)  # a unit stopped before its first checkpoint starts again
    unit.mkdir(parents=True, exist_ok=True)
    atomic_write_text(unit / "config.yaml", yaml.safe_dump(dump_config(cfg), sort_keys=False))
    log.info("%s: variant %s, seed %d", spec.kind, variant.name, seed)
    try:
        results = run_compress(cfg, unit, resume=resume_unit, evaluate=False)
    except CompressionError as exc:
        record.update(applicable=False, reason=str(exc))
        atomic_write_json(done, record)
        return record
    base = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
    wrapper = load_compressed(unit / "compressed", model=base)
    scores = item_scores(wrapper, cfg, spec.split)
    sb = results["stored_bytes_reported"]
    last = last_passed(results["records"])
    record.update(
        applicable=True, stages_run=list(results["stages"]), plan=results.get("plan"),
        stored_bytes=int(sb["layers"] + sb["rest"]), stored_bytes_layers=int(sb["layers"]),
        dense_bytes_layers=int(sb["layers_dense"]),
        compression_rate_layers=1.0 - sb["layers"] / sb["layers_dense"] if sb["layers_dense"] else 0.0,
        gate_retention=results["gate"]["retention"], stopped_early=results["stopped_early"],
        cascade_rate=last.achieved.compression_rate if last else None, **scores,
    )
    atomic_write_json(done, record)
    return record


# ----------------------------------------------------------------------------- the table
def compare_variants(spec: StudySpec, run_dir: Path) -> dict[str, Any]:
    """Aggregate over seeds, compare every variant with the reference (paired by item), correct with Holm."""
    dense = json.loads((run_dir / "dense" / "items.json").read_text(encoding="utf-8"))
    units = {(v.name, s): json.loads((run_dir / "runs" / slug(v.name) / f"seed-{s}" / "items.json").read_text(
        encoding="utf-8")) for v in spec.variants for s in spec.seeds}
    metrics = spec.metrics or [k for k in dense["metrics"] if dense["metrics"][k] > 0]
    unknown = [m for m in metrics if m not in dense["metrics"]]
    if unknown:
        raise ConfigError(f"metric {unknown[0]!r} was not measured; measured: {', '.join(dense['metrics'])}")
    ref = spec.reference.name

    def seed_items(name: str, metric: str) -> np.ndarray | None:
        rows = [units[(name, s)] for s in spec.seeds]
        if not all(r.get("applicable") for r in rows):
            return None
        for r in rows:
            key = f"{metric.rsplit(' ', 1)[0]} index"
            if key in r["items"] and r["items"][key] != dense["items"].get(key):
                raise CheckpointError(f"{name}: evaluated on other items than the dense model ({key})")
        return np.array([r["items"][metric] for r in rows], dtype=np.float64)  # seeds x items

    rows: list[dict[str, Any]] = []
    comparisons: list[tuple[int, str]] = []
    for v in spec.variants:
        per_seed = [units[(v.name, s)] for s in spec.seeds]
        row: dict[str, Any] = {"variant": v.name, "overrides": v.overrides, "reference": v.name == ref,
                               "applicable": all(u.get("applicable") for u in per_seed)}
        if not row["applicable"]:
            row["reason"] = next(u.get("reason") for u in per_seed if not u.get("applicable"))
            rows.append(row)
            continue
        row["stages_run"] = sorted({" > ".join(u["stages_run"]) for u in per_seed})
        for key in ("stored_bytes", "stored_bytes_layers", "compression_rate_layers", "gate_retention"):
            vals = [u[key] for u in per_seed if u.get(key) is not None]
            row[key] = aggregate_seeds(vals).to_dict() if vals else None
        row["stopped_early"] = sum(bool(u["stopped_early"]) for u in per_seed)
        row["metrics"], row["retention"], row["vs_reference"] = {}, {}, {}
        for m in metrics:
            x = seed_items(v.name, m)
            vals = x.mean(axis=1)
            row["metrics"][m] = aggregate_seeds(vals).to_dict()
            row["retention"][m] = aggregate_seeds(vals / dense["metrics"][m]).to_dict()
            y = seed_items(ref, m)
            if v.name != ref and y is not None:
                a, b = x.mean(axis=0), y.mean(axis=0)
                seeds_test = paired_permutation_test(x.mean(axis=1), y.mean(axis=1))
                row["vs_reference"][m] = {
                    "paired_bootstrap": paired_bootstrap_test(a, b, samples=5000).to_dict(),
                    "paired_permutation": paired_permutation_test(a, b, samples=5000).to_dict(),
                    "wilcoxon": wilcoxon_test(a, b).to_dict(),
                    "over_seeds_permutation": seeds_test.to_dict(),
                }
                comparisons.append((len(rows), m))
        rows.append(row)
    for test in ("paired_permutation", "wilcoxon", "paired_bootstrap"):
        adjusted = holm_bonferroni([rows[i]["vs_reference"][m][test]["p_value"] for i, m in comparisons])
        for (i, m), p in zip(comparisons, adjusted, strict=True):
            rows[i]["vs_reference"][m][test]["p_holm"] = float(p)
    cfg = variant_config(spec, spec.reference, spec.seeds[0])
    return {"kind": spec.kind, "model": cfg.model.name, "rate": cfg.compression.cascade.target_rate,
            "rate_scope": cfg.compression.cascade.rate_scope, "seeds": spec.seeds, "split": spec.split,
            "reference": ref, "metrics": metrics, "dense": {m: dense["metrics"][m] for m in metrics},
            "items": {m: len(dense["items"][m]) for m in metrics}, "comparisons": len(comparisons), "rows": rows}


def _ci(agg: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    if agg is None:
        return "-"
    return (f"{agg['mean'] * scale:.{digits}f} [{agg['ci_low'] * scale:.{digits}f}, "
            f"{agg['ci_high'] * scale:.{digits}f}]")


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The study as Markdown: bytes per variant, then one table per metric with CIs and p-values."""
    title = {"ablate": "Ablation", "order": "Cascade order"}.get(results["kind"], results["kind"])
    lines = [f"# {title}: {results['model']} at rate {results['rate']} ({results['rate_scope']}), "
             f"seeds {', '.join(map(str, results['seeds']))}, {results['split']} split", "",
             f"Reference: `{results['reference']}`. Means over seeds with Student-t 95 % intervals; differences "
             "from the reference paired by test item (hits averaged over seeds) with paired-bootstrap 95 % "
             f"intervals; p-values of the paired permutation test, Holm-corrected over the table's "
             f"{results['comparisons']} comparisons, and of the Wilcoxon signed-rank test; effect size: "
             "matched-pairs rank-biserial correlation.", "",
             "| variant | stages run | layer compression rate | stored MB (model) | gate retention | stopped early |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        if not r["applicable"]:
            lines.append(f"| `{r['variant']}` | n/a: {r['reason']} | - | - | - | - |")
            continue
        lines.append(f"| `{r['variant']}` | {'; '.join(r['stages_run'])} | {_ci(r['compression_rate_layers'])} | "
                     f"{_ci(r['stored_bytes'], 1e-6, 3)} | {_ci(r['gate_retention'])} | "
                     f"{r['stopped_early']}/{len(results['seeds'])} |")
    for m in results["metrics"]:
        lines += ["", f"## {m} (dense {results['dense'][m]:.4f}, {results['items'][m]} items)", "",
                  "| variant | value | retention | difference vs reference | p (permutation) | p (Holm) | "
                  "p (Wilcoxon) | effect size |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["rows"]:
            if not r["applicable"]:
                continue
            cmp = r["vs_reference"].get(m)
            if cmp is None:
                diff = p = ph = pw = es = "-" if not r["reference"] else "(reference)"
            else:
                b = cmp["paired_bootstrap"]
                diff = f"{b['mean_difference']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]"
                p, ph = _p(cmp["paired_permutation"]["p_value"]), _p(cmp["paired_permutation"]["p_holm"])
                pw, es = _p(cmp["wilcoxon"]["p_value"]), f"{cmp['wilcoxon']['effect_size']:+.3f}"
            lines.append(f"| `{r['variant']}` | {_ci(r['metrics'][m])} | {_ci(r['retention'][m])} | {diff} | {p} | "
                         f"{ph} | {pw} | {es} |")
    return "\n".join(lines) + "\n"


def results_csv(results: Mapping[str, Any]) -> str:
    """One row per (variant, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "metric", "applicable", "stages_run", "mean", "ci_low", "ci_high", "retention",
                "stored_bytes", "compression_rate_layers", "difference", "diff_ci_low", "diff_ci_high",
                "p_permutation", "p_permutation_holm", "p_wilcoxon", "p_wilcoxon_holm", "p_bootstrap",
                "effect_size_rank_biserial", "cohens_dz", "p_over_seeds"])
    for r in results["rows"]:
        if not r["applicable"]:
            w.writerow([r["variant"], "", False, "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
                        ""])
            continue
        for m in results["metrics"]:
            agg, ret, cmp = r["metrics"][m], r["retention"][m], r["vs_reference"].get(m)
            c = cmp or {}
            b, pp, pw = c.get("paired_bootstrap", {}), c.get("paired_permutation", {}), c.get("wilcoxon", {})
            w.writerow([r["variant"], m, True, "; ".join(r["stages_run"]), agg["mean"], agg["ci_low"], agg["ci_high"],
                        ret["mean"], r["stored_bytes"]["mean"], r["compression_rate_layers"]["mean"],
                        b.get("mean_difference", ""), b.get("ci_low", ""), b.get("ci_high", ""),
                        pp.get("p_value", ""), pp.get("p_holm", ""), pw.get("p_value", ""), pw.get("p_holm", ""),
                        b.get("p_value", ""), pw.get("effect_size", ""), b.get("effect_size", ""),
                        c.get("over_seeds_permutation", {}).get("p_value", "")])
    return buf.getvalue()


def generate_report(spec: StudySpec, results: Mapping[str, Any], run_dir: Path) -> None:
    """``results.json``, ``results.csv``, ``results.md`` and one bar chart per metric (retention, 95 % CI)."""
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.csv", results_csv(results))
    atomic_write_text(run_dir / "results.md", results_markdown(results))
    rows = [{"variant": r["variant"], "metrics": r["retention"]} for r in results["rows"] if r["applicable"]]
    for i, m in enumerate(results["metrics"]):
        plot_comparison(rows, m, run_dir / f"retention_{i}_{slug(m.split(' ')[-1])}.png",
                        title=f"{spec.kind}: {m}", reference=spec.reference.name,
                        ylabel="retention (mean and 95 % CI over seeds)")


def run_ordering(config: RCCConfig, run_dir: str | Path, seeds: int | Sequence[int] = 3,
                 variants: Sequence[Variant] = (), split: str = "test", resume: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Every order of ``config``'s stages, plus ``variants``, at its target rate over ``seeds`` (``rcc order``)."""
    return run_study(make_spec("order", config, seeds, variants, split), run_dir, resume, progress)
