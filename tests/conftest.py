"""Shared fixtures: tiny CLIP/BLIP built in code, no network, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is faster than two, and immune to a busy neighbour core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_clip():
    """A fresh tiny CLIP wrapper (random weights, seeded)."""
    from rcc_compression.models import get_model

    return get_model("tiny-clip")


@pytest.fixture
def tiny_blip():
    """A fresh tiny BLIP captioning wrapper (random weights, seeded)."""
    from rcc_compression.models import get_model

    return get_model("tiny-blip")


@pytest.fixture
def tiny_blip_vqa():
    """A fresh tiny BLIP VQA wrapper (random weights, seeded)."""
    from rcc_compression.models import get_model

    return get_model("tiny-blip-vqa")


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating its folders (config files and the like in tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


#: the keys the shared compressed run sets to values other than their defaults (read back by its tests)
SMALL_RUN_SETS = {
    "model.name": "tiny-clip",
    "experiment.name": "small-shared",
    "experiment.seed": 3,
    "calibration.source": "synthetic",
    "calibration.num_batches": 3,
    "calibration.batch_size": 4,
    "calibration.holdout_batches": 1,
    "compression.cascade.stages": ["dare", "nullu"],
    "compression.cascade.validation_threshold": 0.0,
    "compression.dare.pruning_rate": 0.6,
    "compression.dare.iterations": 2,
    "compression.dare.fine_tune_epochs": 0,
    "compression.dare.scorer": "wanda",
    "compression.nullu.rank_reduction": 0.25,
    "compression.nullu.energy_threshold": None,
    "evaluation.benchmarks": ["zero_shot"],
    "evaluation.datasets": ["world:shape"],
    "evaluation.bootstrap_samples": 0,
    "tracking.backends": ["file"],
    "tracking.figures": False,
}


@pytest.fixture(scope="session")
def small_compressed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One ``rcc compress`` run of the tiny CLIP (dare then nullu, evaluated), made once per session for the
    tests that only read a run directory; returns the run directory and the keys it set. Do not modify it."""
    import json

    from rcc_compression.cli import main

    run = tmp_path_factory.mktemp("shared-run") / "run"
    sets = [arg for k, v in SMALL_RUN_SETS.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["compress", *sets, "--output", str(run), "-q"]) == 0
    return run, dict(SMALL_RUN_SETS)
