"""The one place stages are listed: name -> (config model, stage class), and the section they make.

Adding a method is one module (a ``StageConfig`` subclass and a ``Stage`` subclass) plus one line
here; the config schema (:data:`CompressionSection`, the ``compression:`` section of a config
file), the cascade and the CLI pick it up from this dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator

from ..errors import CompressionError, ConfigError
from ..utils.schema import StrictModel, error_line
from .alphaedit import AlphaEditConfig, AlphaEditStage
from .dare import DareConfig, DareStage
from .nullu import NulluConfig, NulluStage
from .quant import QuantConfig, QuantStage
from .stage import Stage, StageConfig
from .towers import TowerBudgetConfig

STAGES: dict[str, tuple[type[StageConfig], type[Stage]]] = {
    "dare": (DareConfig, DareStage),
    "nullu": (NulluConfig, NulluStage),
    "alphaedit": (AlphaEditConfig, AlphaEditStage),
    "quant": (QuantConfig, QuantStage),
}


class CascadeConfig(StrictModel):
    """Keys of the cascade (defaults: docs/guides/stages.md, "The cascade")."""

    stages: list[str] = Field(
        default_factory=lambda: ["dare", "nullu", "alphaedit"],
        description="stage names in execution order")
    checkpoint_frequency: int = Field(1, ge=0, description="passing steps between checkpoints; 0: none")
    validation_threshold: float = Field(
        0.95, ge=0.0, le=1.0,
        description="retention (compressed / dense) the gate demands after every step")
    recovery_skip_error: float | None = Field(
        0.005, ge=0.0, description="a recovery step (alphaedit) is skipped, and the run says so, when the model "
        "before it is within this relative squared output error of the dense model on the holdout (upper end of "
        "the 95 % interval): it passes with margin and distillation has nothing to win; None or 0: never skipped")
    rounds: int | None = Field(None, ge=1, description="None: dare.iterations when dare runs, else 1")
    schedule: Literal["linear", "cubic"] | None = Field(None, description="None: dare.pruning_schedule")
    target_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="plan dare/nullu targets to reach this 1 - stored/dense bytes")
    rate_scope: Literal["layers", "model"] = Field(
        "layers",
        description="target_rate counts the bytes of the compressed layers, or of the whole model")
    lowrank_share: float | None = Field(
        None, gt=0.0, lt=1.0, description="with target_rate and both dare and nullu: the share of the variable bytes "
        "given to the low-rank factors; None: the planner tries several splits (and each stage alone)")
    planner: Literal["layers", "split"] = Field(
        "layers", description="for a target rate: layers = per-layer bits x rank x sparsity (adds quant); "
                              "split = one pruning rate and one low-rank budget for all layers")
    plan_inputs: Literal["sequential", "dense", "weights"] = Field(
        "sequential", description="the per-layer planner scores each layer's candidates on the inputs the already "
        "planned layers produce (sequential, as GPTQ), on the dense model's (dense: one pass, less time) or on the "
        "weights alone (weights: no calibration pass in planning; the stages still round and fit on calibration data)")
    offload: Literal["disk", "memory"] = Field(
        "disk", description="where the dense teacher's weights and rollback copies live while the cascade runs: "
                            "disk = files in a private temporary directory, read back when used (peak memory about "
                            "the model and its compressed copy); memory = resident (faster, about twice the memory)")
    offload_dir: str | None = Field(
        None, description="the directory the offload directory is made in; None: the system temporary directory")
    pipeline: Literal["auto", "whole", "sequential"] = Field(
        "auto", description="whole: the cascade on the model held in memory (about 2.8x its bytes at the peak); "
        "sequential: a transformer block at a time, read from the checkpoint and written when done (peak memory "
        "flat in depth); auto: sequential when the model's bytes exceed sequential_memory_share of the memory "
        "available, and the run says so")
    sequential_memory_share: float = Field(
        0.35, gt=0.0, le=1.0, description="pipeline auto: the share of the available memory a model may take and "
        "still be compressed whole (the whole cascade peaks near 2.8x the model)")
    activation_buffer_mb: int = Field(
        256, ge=0, description="sequential pipeline: calibration activations between blocks held in memory up to "
        "this many MiB, in files past it (always files with a run directory: a killed run resumes from them)")

    @field_validator("stages")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage {bad[0]!r}; allowed: {', '.join(STAGES)}")
        if not v:
            raise ValueError("at least one stage is needed")
        return v


def _compression_section() -> type[StrictModel]:
    fields: dict[str, Any] = {
        name: (cfg_cls, Field(default_factory=cfg_cls)) for name, (cfg_cls, _) in STAGES.items()
    }
    fields["cascade"] = (CascadeConfig, Field(default_factory=CascadeConfig))
    fields["towers"] = (TowerBudgetConfig, Field(default_factory=TowerBudgetConfig))
    return create_model("CompressionSection", __base__=StrictModel, **fields)


#: the ``compression:`` section: one key per registered stage plus ``cascade`` and ``towers``
CompressionSection = _compression_section()


def validate_stage_config(name: str, data: Mapping[str, Any], source: str = "<dict>") -> StageConfig:
    """Validate one stage's keys (as under ``compression.<name>``) with the config file's one-line errors."""
    cfg_cls = STAGES[name][0]
    try:
        return cfg_cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(error_line(exc.errors()[0], {}, source, cfg_cls, ("compression", name))) from None


def build_stage(name: str, config: StageConfig | dict[str, Any] | None = None) -> Stage:
    """Instantiate a registered stage from its typed config (or a dict validated against it)."""
    if name not in STAGES:
        raise CompressionError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    cfg_cls, stage_cls = STAGES[name]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = validate_stage_config(name, config)
    return stage_cls(config)
