"""rcc-compression: recursive cascade compression of vision-language models.

The public API (design document section 11)::

    from rcc_compression import compress_model, CompressionPipeline, evaluate_model
    compressed = compress_model(model="rcc-clip-world", compression_rate=0.9, method="cascade")

Names are imported lazily so that ``import rcc_compression`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress_model": "rcc_compression.compression.api",
    "evaluate_model": "rcc_compression.evaluation.suite",
    "CompressionPipeline": "rcc_compression.compression.cascade",
    "CascadePipeline": "rcc_compression.compression.cascade",
    "save_compressed": "rcc_compression.compression.storage",
    "load_compressed": "rcc_compression.compression.storage",
    "export_dense": "rcc_compression.compression.storage",
    "get_model": "rcc_compression.models.registry",
    "load_config": "rcc_compression.config",
    "seed_everything": "rcc_compression.utils.seeding",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rcc_compression' has no attribute {name!r}")
