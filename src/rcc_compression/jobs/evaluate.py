"""``rcc evaluate``: run the evaluation suite on a model into a run directory (results, table, run record).

A compressed checkpoint or run directory is loaded as such, and its lineage (the runs that
compressed and trained it) is checked against the test sets first: see :mod:`.data`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..compression.export import checkpoint_dir, load_deployable
from ..config import RCCConfig, dump_config
from ..data.datasets import KNOWN_DATASETS, data_root
from ..data.splits import parse_spec
from ..errors import DataError
from ..evaluation.suite import benchmark_datasets, evaluate_model, results_table
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.runs import RunRecord
from .data import check_against_lineage
from .tracking import log_evaluation, start_tracker


def check_datasets_exist(datasets: Sequence[Any], root: str | None = None) -> None:
    """Raise :class:`DataError` naming every dataset spec that points nowhere (a path that does not exist, a
    known name without its directory), before a run directory is made. ``world`` and ``hf:`` specs pass."""
    missing = []
    for spec in datasets:
        if not isinstance(spec, (str, os.PathLike)):
            continue
        base, _ = parse_spec(str(spec), "test")
        if base == "world" or base.startswith(("world:", "hf:")):
            continue
        path = Path(os.path.expanduser(base.split("#", 1)[0]))
        if base.lower() in KNOWN_DATASETS and not path.exists():
            where = data_root(root)
            if where is None or not (where / KNOWN_DATASETS[base.lower()]).exists():
                missing.append(f"{base} (a known name: set dataset.root or $RCC_DATA_ROOT to the directory that "
                               f"holds {KNOWN_DATASETS[base.lower()]}/)")
        elif not path.exists():
            missing.append(f"{base}: no such file or directory")
    if missing:
        raise DataError(f"dataset not found: {'; '.join(missing)}")


def run_suite(
    model: Any,
    out_dir: str | os.PathLike[str],
    benchmarks: Sequence[str] = ("zero_shot", "retrieval"),
    datasets: Sequence[str] = ("world",),
    seed: int = 0,
    config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate and write ``results.json``, ``results.md`` and the run record into ``out_dir``."""
    record_cfg = {
        "benchmarks": list(benchmarks),
        "datasets": list(datasets),
        "seed": seed,
        "model": model if isinstance(model, str) else getattr(model, "name", type(model).__name__),
        **{k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))},
    }
    with RunRecord(out_dir, config or record_cfg, seed) as run:
        results = evaluate_model(model, benchmarks, datasets, seed=seed, **kwargs)
        atomic_write_json(Path(out_dir) / "results.json", results)
        atomic_write_text(Path(out_dir) / "results.md", results_table(results))
        run.update(results_file="results.json", table_file="results.md", seconds=results["seconds"])
    return results


def evaluate_job(cfg: RCCConfig, run_dir: Path, benchmarks: list[str], datasets: list[str], split: str = "test",
                 key: bytes | None = None, **kwargs: Any) -> dict[str, Any]:
    """``rcc evaluate``: the model (a name, a directory, or a compressed checkpoint or run), on ``datasets``.

    A compressed model's lineage (the runs it was compressed and trained in, by their ``data.json``)
    is checked first: a test image any of them calibrated or trained on is refused. The results go
    to the trackers ``cfg.tracking`` names, as a compress run's do.
    """
    with start_tracker(cfg, run_dir, dump_config(cfg)) as tracker:
        tracker.log_event("phase", phase="evaluation")
        results = _evaluate(cfg, run_dir, benchmarks, datasets, split, key, **kwargs)
        log_evaluation(tracker, results)
    return results


def _evaluate(cfg: RCCConfig, run_dir: Path, benchmarks: list[str], datasets: list[str], split: str,
              key: bytes | None, **kwargs: Any) -> dict[str, Any]:
    name = cfg.model.name
    model: Any = load_deployable(name, key=key).wrapper if checkpoint_dir(name) is not None else name
    checked: list[str] = []
    if checkpoint_dir(name) is not None:
        tests = benchmark_datasets(model, benchmarks, datasets, split, skip_bad=kwargs.get("skip_bad", False),
                                   root=kwargs.get("root"), world_seed=kwargs.get("world_seed"))
        checked = check_against_lineage(name, list({id(ds): ds for _, _, ds in tests}.values()))
    results = run_suite(model, run_dir, benchmarks=benchmarks, datasets=datasets, seed=cfg.experiment.seed,
                        config=dump_config(cfg), split=split, **kwargs)
    results["lineage_checked"] = checked
    atomic_write_json(run_dir / "results.json", results)
    return results
