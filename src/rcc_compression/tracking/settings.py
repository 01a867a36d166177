"""The ``tracking`` config section: which backends a run logs to, and what it sends them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..utils.schema import StrictModel

BACKENDS = ("console", "file", "tensorboard", "wandb")


class TrackingConfig(StrictModel):
    """The ``tracking`` section: where a run's metrics, config and model go."""

    backends: list[Literal["console", "file", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["console", "file"], description="any of console, file, tensorboard, wandb")
    project: str = Field("rcc-compression", min_length=1, description="W&B project (TensorBoard: run label)")
    run_name: str | None = Field(None, description="None: the run directory's name")
    tags: list[str] = Field(default_factory=list, description="tags given to the run (W&B)")
    log_model: bool = Field(True, description="log the compressed model directory as an artifact")
    figures: bool = Field(True, description="record figure data and write the run's plots (PNG and SVG)")

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({b for b in v if v.count(b) > 1})
        if dup:
            raise ValueError(f"backend {dup[0]!r} listed twice")
        return v
