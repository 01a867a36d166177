"""A tiny world and a tiny-CLIP experiment config for the study and analysis runners."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rcc_compression.data.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, WorldSpec(seed=0, splits=("test", "val"), test=12, val=8, cls_test_per_class=1,
                                   cls_val_per_class=1, vqa_test=4, vqa_val=4))
    return root


def tiny_config(root: Path, world: Path, stages: list[str], rate: float = 0.5) -> Path:
    cfg = {
        "experiment": {"name": "tiny", "seed": 0},
        "model": {"name": "tiny-clip"},
        "calibration": {"source": "synthetic", "num_batches": 3, "batch_size": 4, "holdout_batches": 1},
        "compression": {
            "dare": {"iterations": 1, "fine_tune_epochs": 0},
            "nullu": {"energy_threshold": None},
            "alphaedit": {"num_epochs": 1},
            "cascade": {"stages": stages, "validation_threshold": 0.0, "target_rate": rate, "planner": "split"},
        },
        "evaluation": {"benchmarks": ["zero_shot", "retrieval"], "datasets": [str(world)], "batch_size": 32},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
