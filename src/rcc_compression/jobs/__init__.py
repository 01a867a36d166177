"""Run orchestration, the top of the library: each job wires the layers below it into one run.

``api`` (``compress_model`` and ``CompressionPipeline``: the engine with distillation wired in),
``compress`` (``rcc compress``), ``train`` (``rcc train``: recovery of a compressed run),
``reference`` (training the bundled reference models), ``evaluate`` (``rcc evaluate``), ``data``
(what a job reads: its splits, the leak check, ``data.json``) and ``common`` (device, calibration
batches, evaluation datasets, run directory, checkpoint key). Only the CLI and the
serving/search layers import from here; see ``[tool.importlinter]`` in ``pyproject.toml``.
"""
