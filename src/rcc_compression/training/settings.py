"""The trainer's settings: the ``training:`` section of a config file.

Recovery fine-tuning, stage distillation and the reference recipes all run on
:class:`~rcc_compression.training.trainer.CompressionTrainer`, which takes this model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..utils.schema import StrictModel


class PrivacySection(StrictModel):
    """Differentially private training (DP-SGD): per-sample clipping, Gaussian noise, an accountant."""

    epsilon: float = Field(gt=0, description="privacy budget: the run never spends more than this epsilon")
    delta: float = Field(gt=0, lt=1, description="privacy budget: delta (well below 1 / training items)")
    max_grad_norm: float = Field(1.0, gt=0, description="each sample's gradient is clipped to this L2 norm")
    noise_multiplier: float | None = Field(
        None, gt=0, description="noise std / max_grad_norm; None: the smallest that keeps the planned steps "
                                "within (epsilon, delta)")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="privacy accountant: rdp (Renyi DP) or prv "
                                              "(privacy random variables, tighter)")


class TrainingSection(StrictModel):
    """Recovery fine-tuning and distillation hyper-parameters."""

    batch_size: int = Field(256, ge=1, description="global batch size (split across torchrun processes)")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    num_epochs: int = Field(20, ge=0, description="passes over the training data (max_steps overrides)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled in AdamW)")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="learning-rate schedule after the warm-up")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (None: no clipping)")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimiser step")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the logit distillation")
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW moment decay rates")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr of the cosine and linear schedules")
    kd_weight: float = Field(1.0, ge=0, description="logit KD (CLIP: both directions of the similarity matrix)")
    feature_weight: float = Field(1.0, ge=0, description="feature matching (embeddings, last hidden states)")
    attention_weight: float = Field(0.0, ge=0, description="attention transfer (needs eager attention)")
    task_weight: float = Field(0.0, ge=0, description="the model's own loss (CLIP contrastive, BLIP captioning)")
    trainable: Literal["compressed", "all"] = Field(
        "compressed",
        description="compressed: the compressed layers' parameters; all: every parameter")
    dropout: bool = Field(False, description="train with dropout (whole model in training mode)")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass (less memory, more time)")
    teacher_cache: str | None = Field(None, description="directory for cached teacher outputs")
    checkpoint_every_steps: int = Field(0, ge=0, description="0: checkpoint at epoch ends only")
    early_stopping_patience: int | None = Field(
        None, ge=1,
        description="stop after this many validations without improvement (None: never)")
    max_steps: int | None = Field(None, ge=1, description="optimiser steps to train (overrides num_epochs)")
    eval_every_steps: int = Field(0, ge=0, description="validate every this many steps; 0: at epoch ends")
    monitor: str = Field("val_loss", description="validation metric that picks the best model (losses: lower "
                         "is better; others: higher)")
    val_benchmarks: list[Literal["zero_shot", "retrieval", "captioning", "vqa"]] = Field(
        default_factory=list, description="task benchmarks evaluated on the val split at every validation")
    val_max_items: int | None = Field(None, ge=1, description="validate on a seeded subset of this many items")
    privacy: PrivacySection | None = Field(
        None, description="differentially private training (DP-SGD through Opacus); None: ordinary training")

    @model_validator(mode="after")
    def _some_loss(self) -> TrainingSection:
        if not (self.kd_weight or self.feature_weight or self.attention_weight or self.task_weight):
            raise ValueError("every loss weight (kd_weight, feature_weight, attention_weight, task_weight) is 0: "
                             "at least one must be > 0")
        if self.privacy is not None:
            if self.grad_accumulation != 1:
                raise ValueError("privacy: training.grad_accumulation must be 1 (each Poisson-sampled batch is "
                                 "one DP-SGD step)")
            if self.precision != "fp32":
                raise ValueError("privacy: training.precision must be fp32 (per-sample gradients are clipped "
                                 "in full precision)")
            if self.trainable != "compressed":
                raise ValueError("privacy: training.trainable must be 'compressed' (per-sample gradients are "
                                 "computed for the compressed layers)")
        return self
