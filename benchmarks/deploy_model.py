"""The compressed model the deployment benchmarks serve and export: rcc-clip-world at 4x.

4x means the stored bytes of the encoder's Linear layers fall to a quarter (dare then nullu, one
round, the split between sparse and low-rank bytes planned by the library; no gate, no recovery:
these benchmarks measure serving and export, not quality). Built once into a directory and reused.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = {"compression": {"cascade": {"stages": ["dare", "nullu"], "rounds": 1, "validation_threshold": 0.0},
                          "dare": {"fine_tune_epochs": 0}}}


def compressed_checkpoint(path: str | Path, rate: float = 0.75, model: str = "rcc-clip-world") -> Path:
    """A compressed checkpoint of ``model`` at ``rate`` in ``path`` (made if it is not there yet)."""
    from rcc_compression import compress_model
    from rcc_compression.compression.storage import MANIFEST, save_compressed

    path = Path(path)
    if not (path / MANIFEST).is_file():
        wrapper = compress_model(model, rate, config=CONFIG, seed=0)
        save_compressed(wrapper, path, overwrite=True,
                        extra={"benchmark": {"rate": rate, "achieved": wrapper.compression_stats["achieved_rate"]}})
    return path
