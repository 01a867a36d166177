"""rcc-compression: recursive cascade compression of vision-language models.

The public API (README's quick start; docs/guides/compress-your-model.md)::

    from rcc_compression import compress_model, CompressionPipeline, evaluate_model
    compressed = compress_model(model="rcc-clip-world", compression_rate=0.9, method="cascade")

Names are imported lazily so that ``import rcc_compression`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute); the pipeline classes are the ones with distillation wired in
_EXPORTS = {
    "compress_model": ("rcc_compression.jobs.api", "compress_model"),
    "evaluate_model": ("rcc_compression.evaluation.suite", "evaluate_model"),
    "CompressionPipeline": ("rcc_compression.jobs.api", "CompressionPipeline"),
    "save_compressed": ("rcc_compression.compression.storage", "save_compressed"),
    "load_compressed": ("rcc_compression.compression.storage", "load_compressed"),
    "export_dense": ("rcc_compression.compression.storage", "export_dense"),
    "get_model": ("rcc_compression.models.registry", "get_model"),
    "load_config": ("rcc_compression.config", "load_config"),
    "seed_everything": ("rcc_compression.utils.seeding", "seed_everything"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rcc_compression' has no attribute {name!r}")
