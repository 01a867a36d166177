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
