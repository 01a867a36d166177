"""Two small compress runs of the tiny CLIP, made once per session through the CLI, for tracking, plots, reports.

``small_run`` logs to the file, TensorBoard and (offline) W&B backends and writes its figures;
``second_run`` compresses harder, logs to the file backend only and writes no figures. Both
evaluate zero-shot on a tiny class-folder dataset with bootstrap CIs, so their results carry
every kind of number a report shows.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcc_compression.cli import main

TINY = ["--model", "tiny-clip", "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=3",
        "--set", "calibration.batch_size=4", "--set", "compression.dare.iterations=2",
        "--set", "compression.dare.fine_tune_epochs=1", "--set", "compression.alphaedit.num_epochs=1",
        "--set", "compression.cascade.validation_threshold=0.0", "--set", "evaluation.benchmarks=[zero_shot]",
        "--set", "evaluation.bootstrap_samples=200", "-q"]


def _class_folders(root: Path) -> Path:
    """``root/test/<class>/<k>.png``: three classes of four random 32x32 images."""
    rng = np.random.default_rng(0)
    for c in ("red circle", "blue square", "green star"):
        for k in range(4):
            path = root / "test" / c.replace(" ", "_") / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="session")
def wandb_env(tmp_path_factory: pytest.TempPathFactory):
    """W&B offline (no API key), its config and cache directories kept out of the home directory."""
    base = tmp_path_factory.mktemp("wandb-home")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                             "WANDB_DATA_DIR", "WANDB_SILENT")}
    os.environ.pop("WANDB_MODE", None)
    os.environ.pop("WANDB_API_KEY", None)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[key] = str(base / key.lower())
    os.environ["WANDB_SILENT"] = "true"
    yield base
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _class_folders(tmp_path_factory.mktemp("classes"))


class WandbCalls:
    """What a job hands W&B's public API: ``wandb.init``'s arguments, every ``run.log`` row, the artifacts, and
    the run's summary, config, name and tags as ``run.finish()`` finds them (W&B's offline log file is a
    binary format with no public reader, so the calls are what a test can check)."""

    def __init__(self) -> None:
        self.init: dict = {}
        self.history: list[dict] = []
        self.artifacts: list[dict] = []
        self.finished: dict = {}

    def series(self, series: str) -> dict[int, dict[str, float]]:
        """``{step: {name: value}}`` of one series, as the W&B UI plots it against ``<series>/step``."""
        out: dict[int, dict[str, float]] = {}
        prefix = f"{series}/"
        for row in self.history:
            if f"{series}/step" in row:
                vals = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and k != f"{series}/step"}
                out.setdefault(int(row[f"{series}/step"]), {}).update(vals)
        return dict(sorted(out.items()))

    @contextlib.contextmanager
    def recording(self):
        import wandb

        real_init = wandb.init

        def init(*args, **kwargs):
            self.init = dict(kwargs)
            run = real_init(*args, **kwargs)
            log, log_artifact, finish = run.log, run.log_artifact, run.finish

            def logged(row, *a, **kw):
                self.history.append(dict(row))
                return log(row, *a, **kw)

            def artifact(art, *a, **kw):
                self.artifacts.append({"name": art.name, "type": art.type, "metadata": dict(art.metadata),
                                       "files": sorted(art.manifest.entries)})
                return log_artifact(art, *a, **kw)

            def finished(*a, **kw):
                self.finished = {"summary": {k: run.summary[k] for k in run.summary.keys()},
                                 "config": dict(run.config), "name": run.name, "tags": list(run.tags),
                                 "exit_code": kw.get("exit_code"), "dir": run.dir}
                return finish(*a, **kw)

            run.log, run.log_artifact, run.finish = logged, artifact, finished
            return run

        wandb.init = init
        try:
            yield self
        finally:
            wandb.init = real_init


@pytest.fixture(scope="session")
def wandb_calls() -> WandbCalls:
    return WandbCalls()


@pytest.fixture(scope="session")
def small_run(runs_root: Path, image_folder: Path, wandb_env: Path, wandb_calls: WandbCalls) -> Path:
    run = runs_root / "small"
    with wandb_calls.recording():
        code = main(["compress", *TINY, "--set", f"evaluation.datasets=[{image_folder}]",
                     "--set", "tracking.backends=[file,tensorboard,wandb]", "--set", "tracking.tags=[test]",
                     "--output", str(run)])
    assert code == 0
    return run


@pytest.fixture(scope="session")
def second_run(runs_root: Path, image_folder: Path, small_run: Path) -> Path:
    run = runs_root / "harder"
    code = main(["compress", *TINY, "--set", f"evaluation.datasets=[{image_folder}]",
                 "--set", "compression.dare.pruning_rate=0.95", "--set", "tracking.backends=[file]",
                 "--set", "tracking.figures=false", "--output", str(run)])
    assert code == 0
    return run


@pytest.fixture
def search_dir(tmp_path: Path) -> Path:
    """A search's output as ``rcc search`` writes it: four feasible trials, two of them on the front."""
    root = tmp_path / "searches" / "study"
    root.mkdir(parents=True)
    trials = [{"number": i, "state": "COMPLETE", "feasible": True, "base_config": i == 0,
               "metrics": {"retention": r, "stored_bytes": b}}
              for i, (r, b) in enumerate([(0.99, 900.0), (0.97, 500.0), (0.90, 600.0), (0.95, 400.0)])]
    trials.append({"number": 4, "state": "FAIL", "feasible": False, "metrics": {}})
    front = [{"number": i, "retention": trials[i]["metrics"]["retention"],
              "stored_bytes": trials[i]["metrics"]["stored_bytes"], "params": {}} for i in (0, 1, 3)]
    report = {"study": "s", "objectives": ["retention"], "directions": ["maximize"], "best": trials[0],
              "base": trials[0], "pareto": {"objectives": ["retention", "stored_bytes"],
                                            "directions": ["maximize", "minimize"], "trials": front}}
    (root / "trials.json").write_text(json.dumps(trials))
    (root / "search_results.json").write_text(json.dumps(report))
    return root
