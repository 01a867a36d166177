"""``rcc compress`` on the sequential pipeline: a model bigger than memory, compressed a block at a time.

Taken when ``compression.cascade.pipeline`` is ``sequential``, or ``auto`` and the model's bytes
exceed ``sequential_memory_share`` of the memory available (:func:`.sequential.choose_pipeline`).
The model directory is read a block at a time, the compressed checkpoint written block by block to
``run_dir/compressed`` (``--resume`` continues after the last block written), and the results hold
every block's time, peak resident set and bytes. The dense model is never held whole, so its quality
is not measured here (the compressed model's is, loaded from its checkpoint, when the run evaluates),
and the dense-vs-compressed timing is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..compression.matching import check_section_patterns
from ..compression.sequential import SequentialPipeline
from ..compression.storage import load_compressed
from ..config import RCCConfig, dump_config
from ..evaluation.efficiency import measured_storage
from ..models.base import ModelWrapper
from ..utils.io import atomic_write_json, atomic_write_text, directory_lock
from ..utils.logging import get_logger
from ..utils.seeding import seed_everything
from .api import distiller
from .common import resolve_device
from .compress import compress_data, quality_metrics, results_table_markdown
from .sequential import PipelineChoice, sequential_source

log = get_logger("jobs")


def run_compress_sequential(cfg: RCCConfig, run_dir: Path, chosen: PipelineChoice, resume: bool = False,
                            progress: Callable[[str, int, int], None] | None = None, evaluate: bool = True,
                            encrypt_key: bytes | None = None) -> dict[str, Any]:
    """Compress ``cfg.model`` a block at a time into ``run_dir``; returns the results dict (as ``run_compress``'s,
    with ``pipeline``: the choice and the per-block records)."""
    with directory_lock(run_dir):
        seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
        device = resolve_device(cfg.experiment.device)
        source, wrapper, name = sequential_source(cfg.model.name, cfg)
        section = cfg.compression.model_copy(deep=True)
        check_section_patterns(source.model, section)
        fit, holdout, _ = compress_data(wrapper, cfg, run_dir, evaluate)
        rate, scope = section.cascade.target_rate, section.cascade.rate_scope
        pipe = SequentialPipeline(section, calibration_data=fit, holdout_data=holdout, rate=rate, scope=scope,
                                  run_dir=run_dir, output_dir=run_dir / "compressed", seed=cfg.experiment.seed,
                                  device=device, distill=distiller(cfg.training), progress_callback=progress,
                                  run_config=dump_config(cfg) | {"compression": section.model_dump(mode="json")},
                                  encrypt_key=encrypt_key)
        result = pipe.run(source, wrapper if isinstance(wrapper, ModelWrapper) else None, resume=resume)
        out_dir = run_dir / "compressed"
        manifest = result.manifest or {}
        comp_quality, comp_ci = ({}, {})
        if evaluate:
            comp_quality, comp_ci = quality_metrics(load_compressed(out_dir, key=encrypt_key), cfg)
        results = {
            "model": name,
            "stages": section.cascade.stages,
            "stopped_early": False,
            "outcome": sequential_outcome(manifest, rate, scope, result.gate),
            "records": result.blocks,
            "pipeline": {"name": chosen.name, "why": chosen.why, "blocks": result.blocks, "notes": result.notes},
            "quality": {"dense": {}, "compressed": comp_quality},
            "quality_ci": {"dense": {}, "compressed": comp_ci},
            "quality_note": "dense quality not measured: the sequential pipeline never holds the dense model whole",
            "efficiency": {"dense": {}, "compressed": {}},
            "plan": result.plan,
            "stored_bytes_measured": measured_storage(out_dir),
            "stored_bytes_reported": manifest.get("stored_bytes"),
            "gate": {"retention": result.gate.get("retention"), "threshold": result.gate.get("threshold"),
                     "measured": result.gate.get("gate", "yes")},
        }
        atomic_write_json(run_dir / "results.json", results)
        atomic_write_text(run_dir / "results.md", results_table_markdown(results))
        return results


def sequential_outcome(manifest: dict[str, Any], target: float | None, scope: str, gate: dict[str, Any]
                       ) -> dict[str, Any]:
    """Target, reached and status of a sequential run, from the manifest's stored bytes and the final gate."""
    stored = manifest.get("stored_bytes") or {"layers": 0, "layers_dense": 0, "rest": 0}
    layers = 1.0 - stored["layers"] / stored["layers_dense"] if stored["layers_dense"] else 0.0
    total_dense = stored["layers_dense"] + stored["rest"]
    model = 1.0 - (stored["layers"] + stored["rest"]) / total_dense if total_dense else 0.0
    measure = "compression rate (model)" if scope == "model" else "compression rate (layers)"
    reached = model if scope == "model" else layers
    if target is None:
        status, why, source = "met", "the configured stages ran on every block", "the stages' own settings"
    else:
        source = "cascade.target_rate"
        status = "met" if abs(reached - target) <= 0.01 or reached > target else "missed"
        why = "every block compressed to its budget from the global allocation"
    if not gate.get("passed", True):
        status = "missed"
        why += (f"; the output agreement {gate['retention']:.4f} is below the gate's {gate['threshold']:.4f} (the "
                "sequential pipeline cannot roll finished blocks back: lower the rate or use pipeline: whole)")
    return {"measure": measure, "target": target, "target_source": source, "reached": float(reached),
            "compression_rate_layers": float(layers), "status": status, "why": why, "steps_run": None,
            "steps_total": None, "stopped_early": False}


__all__ = ["run_compress_sequential", "sequential_outcome"]
