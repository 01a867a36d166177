"""The trainer's settings: the ``training:`` section of a config file.

Recovery fine-tuning, stage distillation and the reference recipes all run on
:class:`~rcc_compression.training.trainer.CompressionTrainer`, which takes this model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..utils.schema import StrictModel


class TrainingSection(StrictModel):
    """Recovery fine-tuning and distillation hyper-parameters."""

    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    num_epochs: int = Field(20, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accumulation: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    temperature: float = Field(2.0, gt=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW moment decay rates")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr of the cosine and linear schedules")
    kd_weight: float = Field(1.0, ge=0, description="logit KD (CLIP: both directions of the similarity matrix)")
    feature_weight: float = Field(1.0, ge=0, description="feature matching (embeddings, last hidden states)")
    attention_weight: float = Field(0.0, ge=0, description="attention transfer (needs eager attention)")
    task_weight: float = Field(0.0, ge=0, description="the model's own loss (CLIP contrastive, BLIP captioning)")
    trainable: Literal["compressed", "all"] = "compressed"
    dropout: bool = Field(False, description="train with dropout (whole model in training mode)")
    gradient_checkpointing: bool = False
    teacher_cache: str | None = Field(None, description="directory for cached teacher outputs")
    checkpoint_every_steps: int = Field(0, ge=0, description="0: checkpoint at epoch ends only")
    early_stopping_patience: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_loss(self) -> TrainingSection:
        if not (self.kd_weight or self.feature_weight or self.attention_weight or self.task_weight):
            raise ValueError("every loss weight (kd_weight, feature_weight, attention_weight, task_weight) is 0: "
                             "at least one must be > 0")
        return self
