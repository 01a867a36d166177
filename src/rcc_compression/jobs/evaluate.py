"""``rcc evaluate``: run the evaluation suite on a model into a run directory (results, table, run record)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.suite import evaluate_model, results_table
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.runs import RunRecord


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
