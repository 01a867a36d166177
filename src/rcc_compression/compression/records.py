"""Typed, versioned records of a cascade's steps, as ``progress.json``, the manifest and ``results.json`` hold them.

A run's ``records`` list holds one :class:`StepRecord` per cascade step (a stage applied once, gated or
skipped) and, among them, a few other entries: ``validate_stage`` re-checks (``validation_only``),
``rollback_to_stage`` marks (``rollback``) and, in a recovered checkpoint's manifest, the ``train``
record. Code that reads a run's records asks :func:`step_records` for the steps, validated, and reads
``record.achieved.stored_bytes`` instead of strings. Records are written as plain JSON objects
(:meth:`StepRecord.as_json`) with ``record_version``; a record without one predates the field and has
the same form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import CheckpointError

#: the form of the step records this version writes; a record of a later version is refused on reading
RECORD_VERSION = 1


class Achieved(BaseModel):
    """What the compressed layers store after a step (``compression_summary`` of the cascade)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(description="compressed layers")
    dense_dtype: str = Field(description="dtype(s) of the dense layers the rate is measured against")
    dense_bytes: int = Field(description="bytes of the dense layers in that dtype")
    stored_bytes: int = Field(description="bytes the compressed layers store (what the saved checkpoint holds)")
    compression_rate: float = Field(description="1 - stored / dense bytes of the compressed layers")
    dense_bytes_fp32: int = Field(description="bytes of the dense layers in float32")
    compression_rate_vs_fp32: float = Field(description="1 - stored / float32 dense bytes")
    sparsity: float | None = Field(description="share of zero entries of S over the layers that have one")
    layers_with_sparse_part: int
    layers_with_low_rank_part: int
    mean_rank: float


class StepRecord(BaseModel):
    """One cascade step: which stage in which round, its targets, what it achieved and what the gate said."""

    model_config = ConfigDict(extra="forbid")

    record_version: int = Field(RECORD_VERSION, description="the form of this record")
    step: int = Field(ge=0, description="index of the step in the cascade (rounds x stages)")
    round: int = Field(ge=1, description="the round the step belongs to")
    stage: str
    targets: dict[str, Any] = Field(description="the stage's targets at this step (or its plan)")
    achieved: Achieved
    metric: float | None = Field(description="the gate's metric (None: not measured)")
    retention: float | None = Field(description="compressed / dense of the gate's metric (None: not measured)")
    threshold: float = Field(description="the retention the gate needs")
    passed: bool
    seconds: float
    summary: dict[str, Any] = Field(description="the stage's statistics, without the per-layer ones")
    output_error: float | None = Field(None, description="default gate: mean relative output error on the holdout")
    output_error_ci: list[float] | None = Field(None, description="its 95 % bootstrap interval")
    deferred: bool | None = Field(None, description="part of a per-layer plan: measured, gated with the plan")
    gate: str | None = Field(None, description="why the gate did not judge this step")
    error: str | None = None
    skipped: str | None = Field(None, description="why a recovery step did not run")
    undone: str | None = Field(None, description="why a recovery step was undone")
    rejected_retention: float | None = None
    rolled_back: bool | None = None
    rolled_back_to_step: int | None = None
    plan_choice: dict[str, Any] | None = Field(None, description="the end-to-end choice among plans")

    @field_validator("record_version")
    @classmethod
    def _known(cls, v: int) -> int:
        if v > RECORD_VERSION:
            raise ValueError(f"record_version {v} was written by a newer rcc-compression (this one reads up to "
                             f"{RECORD_VERSION})")
        return v

    def as_json(self) -> dict[str, Any]:
        """The record as the JSON object the files hold (fields never set are left out, ``None`` ones are not)."""
        return {"record_version": self.record_version, **self.model_dump(mode="python", exclude_unset=True)}


def is_step(entry: Mapping[str, Any]) -> bool:
    """Whether an entry of a run's records is a cascade step (not a re-check, a rollback mark or training)."""
    return "step" in entry and "achieved" in entry


def step_records(records: Iterable[Mapping[str, Any]], where: str = "records") -> list[StepRecord]:
    """The cascade steps among a run's records, validated; ``where`` names the file in the error."""
    out = []
    for i, entry in enumerate(records):
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{where}: record {i} is not an object")
        if is_step(entry):
            try:
                out.append(StepRecord.model_validate(dict(entry)))
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise CheckpointError(f"{where}: record {i} (step {entry.get('step')!r}): {loc}: {first['msg']}"
                                      ) from None
    return out


def last_passed(records: Iterable[Mapping[str, Any]]) -> StepRecord | None:
    """The last step that passed the gate (the state a run ends in), or ``None``."""
    return next((r for r in reversed(step_records(records)) if r.passed), None)


__all__ = ["RECORD_VERSION", "Achieved", "StepRecord", "is_step", "last_passed", "step_records"]
