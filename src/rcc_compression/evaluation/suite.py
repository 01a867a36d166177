"""The evaluation suite: run selected benchmarks on selected datasets, write one JSON and a table.

``evaluate_model(model, benchmarks=[...], datasets=[...])`` (docs/evaluation.md) runs
every benchmark on every dataset it applies to and returns a nested dict::

    {"model": ..., "results": {benchmark: {dataset: {"metrics": {name: {value, ci_low, ci_high, n,
     samples}}, ...}}}, "skipped": [{benchmark, dataset, reason}], "notes": [...], ...}

Dataset specs are paths, ``hf:NAME``, known names under the data root (``imagenet``, ``mscoco``,
...), or ``world`` (the reference world at the default seed, expanded per benchmark: the three
classification tasks for ``zero_shot``, the captions for ``retrieval`` and ``captioning``, the
questions for ``vqa``). Every (benchmark, dataset) pair that fits runs; one that does not is listed
under ``skipped`` with the reason rather than failing the run: a benchmark that does not fit the
model (zero-shot with a BLIP), a dataset whose task does not fit the benchmark (retrieval on
ImageNet), or a dataset that cannot be opened on this machine (a known name that is not under the
data root, a missing path). A skipped pair has no numbers, and no other data (the world) stands in
for a named dataset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis.stats import DEFAULT_LEVEL, DEFAULT_SAMPLES, format_estimate
from ..data.datasets import KNOWN_TASKS, open_dataset, open_world
from ..data.splits import parse_spec
from ..data.transforms import transform_for
from ..data.world import DEFAULT_SEED, ensure_world
from ..errors import DataError
from ..models.registry import get_model
from ..utils.logging import get_logger
from .captioning import evaluate_captioning
from .common import subset
from .efficiency import profile_model
from .retrieval import evaluate_retrieval
from .vqa import evaluate_vqa
from .zero_shot import evaluate_zero_shot

log = get_logger("evaluation")

BENCHMARKS = ("zero_shot", "retrieval", "captioning", "vqa", "efficiency")
#: other names of benchmarks (``image_text_retrieval`` is the name older configs use)
BENCHMARK_ALIASES = {"image_text_retrieval": "retrieval"}
#: metric name -> the benchmarks that measure it (``evaluation.metrics`` in a config)
METRICS = {"accuracy": ("zero_shot", "vqa"), "retrieval": ("retrieval",), "captioning": ("captioning",),
           "efficiency": ("efficiency",)}
#: metric name -> its headline numbers in a dense vs compressed table
HEADLINE_NAMES = {"accuracy": ("top1", "accuracy"), "retrieval": ("i2t_R@1", "t2i_R@1"),
                  "captioning": ("CIDEr", "BLEU-4")}


def benchmark_names() -> str:
    """The benchmark names a user may give, aliases noted (for error messages)."""
    aliases = {v: k for k, v in BENCHMARK_ALIASES.items()}
    return ", ".join(f"{b} (alias {aliases[b]})" if b in aliases else b for b in BENCHMARKS)


def canonical_benchmark(name: str) -> str:
    """``name`` or the benchmark it is an alias of; :class:`DataError` for an unknown name."""
    name = BENCHMARK_ALIASES.get(name, name)
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; allowed: {benchmark_names()}")
    return name


def metric_of(benchmark: str) -> str:
    """The metric name (``evaluation.metrics``) a benchmark measures."""
    return next(m for m, benches in METRICS.items() if benchmark in benches)
_TASK = {"zero_shot": "classification", "retrieval": "captions", "captioning": "captions", "vqa": "vqa"}
_WORLD_PARTS = {"zero_shot": ("shape", "colour", "colour_shape"), "retrieval": ("captions",),
                "captioning": ("captions",), "vqa": ("vqa",)}


#: what each benchmark needs of a model, for the reason a pair is skipped
_NEEDS = {"zero_shot": "a contrastive model (CLIP, SigLIP)", "retrieval": "a contrastive model (CLIP, SigLIP)",
          "captioning": "a captioning model (BLIP captioning, LLaVA)",
          "vqa": "a question-answering model (BLIP VQA, LLaVA)"}


def _model_fits(benchmark: str, wrapper: Any) -> str | None:
    """Why ``benchmark`` cannot run on this model, or ``None`` when it can (the wrapper's ``tasks`` say)."""
    if benchmark not in _NEEDS or benchmark in getattr(wrapper, "tasks", ()):
        return None
    kind = "blip_vqa" if getattr(wrapper, "is_vqa", False) else getattr(wrapper, "model_type", "")
    return f"{benchmark} needs {_NEEDS[benchmark]}; this is {kind or type(wrapper).__name__}"


def expand_datasets(benchmark: str, datasets: Sequence[Any]) -> list[Any]:
    """Dataset specs for one benchmark: ``world`` becomes the world parts the benchmark uses.

    ``world@val`` expands at that split; dataset objects pass through.
    """
    out: list[Any] = []
    for spec in datasets:
        if not isinstance(spec, (str, os.PathLike)):
            out.append(spec)
            continue
        text = str(spec)
        base, split = parse_spec(text, "")
        at = f"@{split}" if split else ""
        is_world_dir = Path(os.path.expanduser(base)).joinpath("world.json").is_file()
        if base == "world" or is_world_dir:
            sep = ":" if base == "world" else "#"
            out += [f"{base}{sep}{part}{at}" for part in _WORLD_PARTS.get(benchmark, ())]
        else:
            out.append(text)
    return out


def dataset_name(spec: Any) -> str:
    """How results name a dataset: its spec string, or an opened dataset's spec (or source)."""
    return spec if isinstance(spec, str) else str(getattr(spec, "spec", None) or spec.source)


def _open(spec: Any, benchmark: str, split: str, wrapper: Any, skip_bad: bool, root: str | None,
          world_seed: int | None) -> Any:
    if not isinstance(spec, str):
        return spec  # an opened dataset
    spec, split = parse_spec(spec, split)
    transform = transform_for(wrapper)
    if spec.startswith("world:"):
        seed = DEFAULT_SEED if world_seed is None else world_seed
        ds = open_world(ensure_world(seed, splits=(split,)), spec.split(":", 1)[1], split, transform, skip_bad)
    elif "#" in spec and Path(spec.split("#", 1)[0]).joinpath("world.json").is_file():
        path, part = spec.split("#", 1)
        ds = open_world(path, part, split, transform, skip_bad)
    else:
        ds = open_dataset(spec, split=split, task=_TASK[benchmark], transform=transform, skip_bad=skip_bad, root=root)
    ds.split = split
    return ds


def benchmark_datasets(model: Any, benchmarks: Sequence[str], datasets: Sequence[Any], split: str = "test",
                       skip_bad: bool = False, root: str | None = None, world_seed: int | None = None
                       ) -> list[tuple[str, str, Any]]:
    """``(benchmark, name, dataset)`` for every pair :func:`evaluate_model` would run (the ones that fit).

    What a job checks for leaks before it evaluates.
    """
    out = []
    for bench in benchmarks:
        if bench == "efficiency" or bench not in BENCHMARKS or _model_fits(bench, model):
            continue
        for spec in expand_datasets(bench, list(datasets) or ["world"]):
            if isinstance(spec, str) and _known_task_fits(bench, spec):
                continue
            try:
                ds = _open(spec, bench, split, model, skip_bad, root, world_seed)
            except DataError:  # not this benchmark's kind of data: evaluate_model says so as it skips it
                continue
            if not _dataset_fits(bench, ds):
                out.append((bench, dataset_name(spec), ds))
    return out


def _dataset_fits(benchmark: str, ds: Any) -> str | None:
    want = _TASK[benchmark]
    if ds.task != want:
        return f"{benchmark} needs a {want} dataset; {ds.source} is {ds.task} ({ds.format_name})"
    return None


def _known_task_fits(benchmark: str, spec: str) -> str | None:
    """Why a known dataset name cannot serve ``benchmark`` (known before opening it), or ``None``."""
    task, want = KNOWN_TASKS.get(spec.lower()), _TASK[benchmark]
    if task is not None and task != want and not Path(spec).exists():
        return f"{benchmark} needs a {want} dataset; {spec} is {task}"
    return None


def _efficiency(wrapper: Any, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    batch = wrapper.synthetic_batch(8, generator=gen)
    return {"profile": profile_model(wrapper, batch, batch_sizes=(1, 8), warmup=2, iters=10)}


def evaluate_model(
    model: Any,
    benchmarks: Sequence[str] = ("zero_shot", "retrieval"),
    datasets: Sequence[str] = ("world",),
    *,
    split: str = "test",
    batch_size: int = 64,
    bootstrap_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    templates: str | Sequence[str] | None = None,
    max_items: int | None = None,
    num_beams: int = 3,
    max_length: int = 30,
    skip_bad: bool = False,
    root: str | None = None,
    world_seed: int | None = None,
    progress: bool = False,
    per_item: bool = False,
) -> dict[str, Any]:
    """Run ``benchmarks`` on ``datasets`` for ``model`` (a wrapper, ``nn.Module``, name or path).

    Every pair that fits runs; the others are listed under ``skipped`` with the reason (see the
    module docstring), so the call ``evaluate_model(model, ["zero_shot",
    "retrieval"], ["imagenet", "mscoco"])`` evaluates what is on this machine and says what is not.
    ``bootstrap_samples`` resamples per metric (0: point estimates only); ``max_items`` evaluates a
    seeded random subset of each dataset; ``templates`` overrides each dataset's prompt set;
    ``world_seed`` picks the reference world (default: the seed the bundled models were trained on);
    ``per_item`` adds each zero-shot and retrieval result's per-item hits (``per_item``).
    """
    benchmarks = [canonical_benchmark(b) for b in benchmarks]
    wrapper = get_model(model) if not hasattr(model, "model_type") else model
    datasets = list(datasets) or ["world"]
    was_training = wrapper.training
    wrapper.eval()
    started = time.perf_counter()
    out: dict[str, Any] = {
        "model": getattr(wrapper, "name", "") or type(wrapper).__name__,
        "model_type": "blip_vqa" if getattr(wrapper, "is_vqa", False) else getattr(wrapper, "model_type", ""),
        "tasks": sorted(getattr(wrapper, "tasks", ())),
        "split": split, "seed": seed, "bootstrap_samples": bootstrap_samples, "ci_level": DEFAULT_LEVEL,
        "datasets": [dataset_name(d) for d in datasets], "results": {}, "skipped": [], "notes": [],
    }
    try:
        for bench in benchmarks:
            reason = _model_fits(bench, wrapper)
            if reason:
                out["skipped"].append({"benchmark": bench, "dataset": "*", "reason": reason})
                continue
            if bench == "efficiency":
                t0 = time.perf_counter()
                try:
                    res = _efficiency(wrapper, seed)
                except DataError as exc:
                    out["skipped"].append({"benchmark": bench, "dataset": "-", "reason": str(exc)})
                    continue
                res["seconds"] = round(time.perf_counter() - t0, 3)
                out["results"].setdefault(bench, {})["synthetic"] = res
                continue
            for spec in expand_datasets(bench, datasets):
                t0 = time.perf_counter()
                reason = _known_task_fits(bench, spec) if isinstance(spec, str) else None
                if reason:
                    out["skipped"].append({"benchmark": bench, "dataset": spec, "reason": reason})
                    continue
                try:
                    ds = _open(spec, bench, split, wrapper, skip_bad, root, world_seed)
                except DataError as exc:
                    name = dataset_name(spec)
                    out["skipped"].append({"benchmark": bench, "dataset": name, "reason": f"cannot open: {exc}"})
                    log.warning("%s on %s skipped: cannot open: %s", bench, name, exc)
                    continue
                reason = _dataset_fits(bench, ds)
                if reason:
                    out["skipped"].append({"benchmark": bench, "dataset": dataset_name(spec), "reason": reason})
                    continue
                ds = subset(ds, max_items, seed)
                common = {"samples": bootstrap_samples, "seed": seed, "progress": progress}
                if bench == "zero_shot":
                    res = evaluate_zero_shot(wrapper, ds, templates, batch_size, per_item=per_item, **common)
                elif bench == "retrieval":
                    res = evaluate_retrieval(wrapper, ds, batch_size, per_item=per_item, **common)
                elif bench == "captioning":
                    res = evaluate_captioning(wrapper, ds, batch_size, num_beams, max_length, **common)
                else:
                    res = evaluate_vqa(wrapper, ds, batch_size, **common)
                res["source"] = ds.source
                if sum(ds.skipped.values()):
                    res["skipped_items"] = {k: v for k, v in ds.skipped.items() if v}
                res["seconds"] = round(time.perf_counter() - t0, 3)
                out["results"].setdefault(bench, {})[dataset_name(spec)] = res
                log.info("%s on %s: %s", bench, dataset_name(spec), _headline(bench, res))
    finally:
        wrapper.train(was_training)
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def flat_metrics(results: dict[str, Any], with_ci: bool = False) -> dict[str, Any]:
    """Every metric as ``benchmark/dataset/metric[/subset]`` -> value (or the estimate dict).

    Bookkeeping numbers (item counts, seconds, seeds) are left out, so this is what a dense vs
    compressed table should compare.
    """
    out: dict[str, Any] = {}
    for bench, per_ds in results.get("results", {}).items():
        for ds, res in per_ds.items():
            for key, metrics in res.items():
                if not key.startswith("metrics") or not isinstance(metrics, dict):
                    continue
                suffix = "" if key == "metrics" else "/" + key.split("_", 1)[1]
                for name, m in metrics.items():
                    if isinstance(m, dict) and "value" in m:
                        out[f"{bench}/{ds}/{name}{suffix}"] = m if with_ci else m["value"]
    return out


_HEADLINE = {"zero_shot": "top1", "retrieval": "i2t_R@1", "captioning": "CIDEr", "vqa": "accuracy"}


def _headline(bench: str, res: dict[str, Any]) -> str:
    key = _HEADLINE.get(bench)
    m = res.get("metrics", {}).get(key) if key else None
    return f"{key} {format_estimate(m)}" if m else "done"


def results_table(results: dict[str, Any]) -> str:
    """A markdown table of every metric with its confidence interval (one row per metric)."""
    level = int(round(100 * results.get("ci_level", DEFAULT_LEVEL)))
    lines = [f"# Evaluation: {results.get('model', '')}", "",
             f"split `{results.get('split', '')}`, {results.get('bootstrap_samples', 0)} bootstrap resamples, "
             f"{level} % confidence intervals", "",
             f"| benchmark | dataset | metric | value | {level} % CI | n |", "|---|---|---|---:|---|---:|"]
    for bench, per_ds in results.get("results", {}).items():
        for ds, res in per_ds.items():
            if bench == "efficiency":
                prof = res.get("profile", {})
                params = prof.get("parameters", {})
                for key in ("dense_equivalent", "stored"):
                    if key in params:
                        lines.append(f"| {bench} | {ds} | parameters ({key}) | {params[key]:,} | - | - |")
                for bs, entry in prof.get("per_batch_size", {}).items():
                    lat = entry.get("latency", {})
                    if "median_ms" in lat:
                        lines.append(f"| {bench} | {ds} | latency ms (batch {bs}, median) | {lat['median_ms']:.2f} | "
                                     f"{lat.get('min_ms', 0):.2f}-{lat.get('p90_ms', 0):.2f} (min-p90) | "
                                     f"{lat.get('iters', '')} |")
                continue
            groups = [("", res.get("metrics", {}))]
            groups += [(f" ({k.split('_', 1)[1]})", v) for k, v in res.items() if k.startswith("metrics_")]
            for suffix, metrics in groups:
                for name, m in metrics.items():
                    if isinstance(m, dict) and "value" in m:
                        ci = format_estimate(m).partition(" ")[2] or "- (no bootstrap)"
                        lines.append(f"| {bench} | {ds} | {name}{suffix} | {m['value']:.4f} | {ci} | {m['n']} |")
                    elif isinstance(m, (int, float)):
                        lines.append(f"| {bench} | {ds} | {name}{suffix} | {m:.4f} | - | - |")
    if results.get("skipped"):
        lines += ["", "Skipped:", ""]
        lines += [f"- {s['benchmark']} on {s['dataset']}: {s['reason']}" for s in results["skipped"]]
    bad = [(b, d, r["skipped_items"]) for b, per_ds in results.get("results", {}).items()
           for d, r in per_ds.items() if r.get("skipped_items")]
    if bad:
        lines += ["", "Unreadable items skipped (--skip-bad):", ""]
        lines += [f"- {b} on {d}: " + ", ".join(f"{n} {k}" for k, n in counts.items()) for b, d, counts in bad]
    notes = sorted(
        {n for per_ds in results.get("results", {}).values() for r in per_ds.values() for n in r.get("notes", [])}
    )
    if notes or results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in [*results.get("notes", []), *notes]]
    return "\n".join(lines) + "\n"
