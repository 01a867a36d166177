"""Fixtures of the reliability tests; helpers shared by the test modules live in ``reliability_helpers``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_helpers import MLP, compressed_mlp  # noqa: E402

from rcc_compression.compression.storage import save_compressed  # noqa: E402


@pytest.fixture
def ckpt(tmp_path) -> tuple[Path, MLP]:
    """A compressed MLP saved to ``tmp_path/ckpt`` (and the model itself)."""
    model = compressed_mlp()
    path = tmp_path / "ckpt"
    save_compressed(model, path)
    return path, model
