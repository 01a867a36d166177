"""The stage interface, layer selection, and the context a stage works in.

A stage (``dare``, ``nullu``, ``alphaedit``, ...) is built from its typed config and acts on the
:class:`~rcc_compression.compression.layers.CompressedLinear` layers its ``targets``/``ignore``
regexes select. It reads what it needs (dense weights, calibration statistics, teacher outputs)
from a :class:`CompressionContext`, which computes each of them once, on first use.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import Field
from torch import nn

from ..errors import CompressionError
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from ..utils.schema import StrictModel
from .calibration import LayerStats, collect_layer_stats, run_outputs
from .layers import CompressedLinear
from .matching import select

log = get_logger("compression")



class StageConfig(StrictModel):
    """Keys every stage has: which Linear layers it acts on (``re.search`` on module names)."""

    targets: list[str] | None = Field(None, description="regexes of layers to compress; None: the model's default")
    ignore: list[str] | None = Field(None, description="regexes of layers to leave alone; None: the model's default")


def select_layers(
    model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None
) -> list[str]:
    """Names of the Linear (or already compressed) layers of ``model`` the patterns select.

    ``None`` patterns are the model family's defaults; a given pattern that matches no Linear
    layer raises, naming the nearest module names (:func:`~.matching.check_patterns`).
    """
    return select(model, targets, ignore)


def schedule_fraction(progress: float, kind: str) -> float:
    """Share of the final target reached at ``progress`` in (0, 1]: ``linear`` or ``cubic`` (Zhu & Gupta)."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return progress
    if kind == "cubic":
        return 1.0 - (1.0 - progress) ** 3
    raise ValueError(f"unknown schedule {kind!r}; allowed: linear, cubic")


class Distiller(Protocol):
    """Distillation as the engine calls it: fit ``params`` of ``model`` towards the teacher's outputs.

    ``batches`` are the calibration batches and ``teacher_outputs`` the dense model's outputs on
    them; batch order is drawn from ``generator``; returns loss figures for the statistics. The
    engine does not train: whoever runs it supplies this (``rcc_compression.CompressionPipeline``
    and ``compress_model`` pass :func:`rcc_compression.training.recovery.finetune_on_batches`
    with the run's ``training`` section).
    """

    def __call__(self, model: nn.Module, params: Sequence[nn.Parameter], batches: Sequence[Mapping[str, Any]],
                 teacher_outputs: Sequence[Mapping[str, torch.Tensor]], epochs: int, lr: float,
                 generator: torch.Generator, device: torch.device | str) -> dict[str, float]: ...


@dataclass
class CompressionContext:
    """What stages share during one compression: dense weights, data, cached statistics.

    ``batches`` are dicts of keyword arguments for ``model(**batch)``; ``holdout`` is kept apart
    for the validation gate. Statistics are collected on the dense model the first time a stage
    asks for them and cached for later rounds.
    """

    model: nn.Module
    dense: dict[str, torch.Tensor]
    dense_model: nn.Module | None = None
    batches: list[dict[str, Any]] = field(default_factory=list)
    holdout: list[dict[str, Any]] = field(default_factory=list)
    preserve: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, torch.Tensor] | None = None
    seed: int = 0
    step: int = 0
    #: the cascade round (1-based) the current step belongs to
    round: int = 1
    progress: float = 1.0
    schedule: str = "linear"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress_callback: Callable[[str, int, int], None] | None = None
    #: distillation between rounds (``dare``) and of the scales (``alphaedit`` scaling); ``None``: none available
    distill: Distiller | None = None
    tokenizer: Any = None
    image_loader: Callable[[list[Any]], torch.Tensor] | None = None
    #: per-stage targets of the current round from the cascade's joint byte schedule (:mod:`.schedule`);
    #: a stage listed here uses them instead of its own schedule
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    #: per layer, the most bytes a step of this round may leave stored: what the layer stored when
    #: the round began (dense in the first), so no step ever stores more than the previous round
    byte_caps: dict[str, int] = field(default_factory=dict)
    #: per layer, bytes kept free for channel scales a later ``alphaedit`` step will add
    scale_reserve: dict[str, int] = field(default_factory=dict)
    #: results of deterministic steps keyed by a digest of their exact inputs, while the cascade keeps them (until
    #: its end-to-end choice has run stages again from the dense start: a layer rounded the same way on the same
    #: inputs is rounded once); ``None``: nothing is kept
    memo: dict[Any, Any] | None = None
    _stats: dict[str, LayerStats] = field(default_factory=dict)
    _stats_gram: bool = False
    _preserve_stats: dict[str, LayerStats] | None = None
    _teacher: list[dict[str, torch.Tensor]] | None = None
    _teacher_holdout: list[dict[str, torch.Tensor]] | None = None

    def layers(self, names: Iterable[str] | None = None) -> dict[str, CompressedLinear]:
        """The compressed layers of the model (optionally only ``names``)."""
        wanted = set(names) if names is not None else None
        return {  # in the working form: stages change float parameters
            n: m.materialize() for n, m in self.model.named_modules()
            if isinstance(m, CompressedLinear) and (wanted is None or n in wanted)
        }

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, step, salt): the same stage step always draws the same numbers."""
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + self.step * 10_007 + salt) % (2**63))
        return g

    def _need_dense_model(self) -> nn.Module:
        if self.dense_model is None:
            raise CompressionError("this stage needs the dense model for calibration statistics")
        return self.dense_model

    def stats(self, gram: bool = False, names: Sequence[str] | None = None) -> dict[str, LayerStats]:
        """Per-layer input statistics of the dense model on the calibration batches (kept for later calls).

        ``names``: statistics of only these layers, for this call alone (unless everything asked for
        is kept already). A stage that needs the ``n x n`` second moments once, a few layers at a
        time, so never holds those of the whole model (for ViT-B/32 about 1.3 times the bytes of
        its weights).
        """
        if not self.batches:
            raise CompressionError(
                "this stage needs calibration data (wanda, activation_aware, asvd, alphaedit): pass "
                "calibration_data=... or set calibration.source"
            )
        if names is not None and not (self._stats and (self._stats_gram or not gram)):
            return collect_layer_stats(self._need_dense_model(), list(names), self.batches, gram=gram,
                                       device=self.device)
        if not self._stats or (gram and not self._stats_gram):
            names = list(self.dense)
            self._stats = collect_layer_stats(self._need_dense_model(), names, self.batches, gram=gram,
                                              device=self.device)
            self._stats_gram = gram
        return self._stats

    def preserve_stats(self) -> dict[str, LayerStats] | None:
        """Per-layer input statistics on the preserve set (``None`` when there is none)."""
        if not self.preserve:
            return None
        if self._preserve_stats is None:
            self._preserve_stats = collect_layer_stats(
                self._need_dense_model(), list(self.dense), self.preserve, gram=True, device=self.device
            )
        return self._preserve_stats

    def teacher_outputs(self) -> list[dict[str, torch.Tensor]]:
        """Dense-model outputs on the calibration batches (computed once)."""
        if self._teacher is None:
            self._teacher = run_outputs(self._need_dense_model(), self.batches, self.device)
        return self._teacher

    def teacher_holdout(self) -> list[dict[str, torch.Tensor]]:
        """Dense-model outputs on the held-out batches (computed once)."""
        if self._teacher_holdout is None:
            self._teacher_holdout = run_outputs(self._need_dense_model(), self.holdout, self.device)
        return self._teacher_holdout

    def target_weight(self, name: str, layer: CompressedLinear) -> torch.Tensor:
        """The dense weight in the layer's inner (unscaled) space, minus its base: what S + B A should equal."""
        w = self.dense[name].to(layer.device, torch.float32)
        if layer.a_out is not None:
            w = w / _safe(layer.a_out.detach().float())[:, None]
        if layer.a_in is not None:
            w = w / _safe(layer.a_in.detach().float())[None, :]
        if layer.base is not None:
            w = w - layer.base.float()
        return w

    def byte_cap(self, name: str, for_scales: bool = False) -> int | None:
        """The most bytes a step may leave stored in layer ``name`` (``None``: no cap).

        Parts other than scales stay below the cap by the room reserved for scales (``for_scales``
        gives the whole cap, for the step that adds them).
        """
        cap = self.byte_caps.get(name)
        if cap is None or for_scales:
            return cap
        return cap - self.scale_reserve.get(name, 0)

    def tick(self, what: str, done: int, total: int) -> None:
        """A layer is done: give its temporaries' memory back to the system, report progress to a listener."""
        release_memory()
        if self.progress_callback is not None:
            self.progress_callback(what, done, total)


def _safe(scale: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)


class Stage(ABC):
    """One compression method acting on the compressed layers of a model.

    ``compress`` applies the method at ``ctx.progress`` of its final target (rounds of the cascade
    tighten it along the schedule), ``validate`` checks the result, ``get_statistics`` returns
    what the last call did, and ``save_checkpoint``/``load_checkpoint`` persist the stage's own
    record (the model's tensors are saved by :mod:`~rcc_compression.compression.storage`).
    """

    name: ClassVar[str] = "stage"
    config_class: ClassVar[type[StageConfig]] = StageConfig
    #: a recovery stage only tries to win back quality: the cascade undoes a step of it that lowers the gate metric
    recovery: ClassVar[bool] = False

    def __init__(self, config: StageConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = self.config_class()
        elif isinstance(config, dict):
            config = self.config_class.model_validate(config)
        self.config = config
        self.statistics: dict[str, Any] = {}

    # -------------------------------------------------------------- what the rate planner may set
    #: the plan dimensions this stage can carry out per layer: ``sparsity`` (a pruning rate), ``bits``
    #: (a storage format of S and of the factors) or ``rank`` (factors fitted to what S leaves); see
    #: :meth:`plan_dimensions` and CONTRIBUTING.md ("A stage in a planned run")
    planned: ClassVar[tuple[str, ...]] = ()

    def plan_dimensions(self) -> tuple[str, ...]:
        """The dimensions of a per-layer plan this stage carries out as configured (empty: none).

        A stage in a run with a target rate either offers dimensions, or is a recovery stage (it
        runs after the plan, as configured); any other stage makes the planned run an error
        (:meth:`unplannable_reason` says why), never a dropped stage.
        """
        return self.planned

    def unplannable_reason(self) -> str:
        """Why this stage, as configured, cannot take a per-layer plan (for the error message)."""
        return "it has no plan dimension (bits, rank or sparsity) and is not a recovery stage"

    def apply_plan(self, layers: Mapping[str, Mapping[str, Any]], calibrated: bool) -> bool:
        """Write this stage's part of a per-layer plan into its config; returns whether it has work left.

        ``layers`` maps each planned layer to its choice (``pruning_rate``, ``bits``, ``group_size``,
        ``symmetric``, ``rank``, ``factor_bits``, ``keep_s``); ``calibrated``: the plan was measured
        on calibration data.
        """
        raise CompressionError(f"stage {self.name!r} offers plan dimensions but does not apply a plan")

    def reserved_bytes(self, out_features: int, in_features: int, element_size: int) -> int:
        """Bytes this stage adds to one of its layers after a plan (e.g. channel scales); the planner
        keeps them out of the budget it hands out."""
        return 0

    def default_rounds(self) -> int | None:
        """The cascade's number of rounds when ``cascade.rounds`` is not set (``None``: no opinion)."""
        return None

    def default_schedule(self) -> str | None:
        """The cascade's schedule when ``cascade.schedule`` is not set (``None``: no opinion)."""
        return None

    def layer_names(self, model: nn.Module) -> list[str]:
        """The layers this stage acts on."""
        names = select_layers(model, self.config.targets, self.config.ignore)
        if not names:
            raise CompressionError(
                f"stage {self.name!r}: no Linear layer of {type(model).__name__} matches targets "
                f"{self.config.targets or 'default'} (ignore {self.config.ignore or 'default'})"
            )
        return names

    def target_description(self, progress: float, schedule: str) -> dict[str, Any]:
        """The targets this stage aims at when ``progress`` of the schedule is reached (for records)."""
        return {}

    @abstractmethod
    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Apply the stage in place to ``model`` (whose target layers are CompressedLinear)."""

    def validate(self, model: nn.Module, validator: Callable[[nn.Module], float] | None = None,
                 threshold: float = 0.0) -> dict[str, Any]:
        """Check the compressed layers are finite and, with a validator, that its score meets ``threshold``."""
        finite = all(
            torch.isfinite(p).all().item() for m in model.modules() if isinstance(m, CompressedLinear)
            for p in m.parameters()
        )
        score = validator(model) if (validator is not None and finite) else None
        passed = finite and (score is None or score >= threshold)
        return {"finite": finite, "score": score, "threshold": threshold, "passed": passed}

    def get_statistics(self) -> dict[str, Any]:
        """What the last ``compress`` call did (per layer and in total)."""
        return dict(self.statistics)

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the stage's config and statistics as JSON (atomically)."""
        atomic_write_json(path, {"stage": self.name, "config": self.config.model_dump(mode="json"),
                                 "statistics": self.statistics})

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the stage's config and statistics written by :meth:`save_checkpoint`."""
        data = json.loads(Path(path).read_text())
        if data.get("stage") != self.name:
            raise CompressionError(f"{path}: checkpoint of stage {data.get('stage')!r}, not {self.name!r}")
        self.config = self.config_class.model_validate(data["config"])
        self.statistics = data.get("statistics", {})


def scale_reserve(layers: Mapping[str, CompressedLinear], chosen: Iterable[tuple[Stage, Iterable[str]]]
                  ) -> dict[str, int]:
    """Bytes each layer must keep free for what its stages add after a plan (:meth:`Stage.reserved_bytes`,
    e.g. channel scales), over the ``(stage, layer names)`` pairs of a round; factored layers add none."""
    reserve: dict[str, int] = {}
    for st, names in chosen:
        for n in names:
            m = layers.get(n)
            if m is not None and m.a_in is None and m.a_out is None:
                extra = st.reserved_bytes(m.out_features, m.in_features, m.element_size)
                if extra:
                    reserve[n] = reserve.get(n, 0) + extra
    return reserve


def kd_finetune(
    model: nn.Module, ctx: CompressionContext, params: Sequence[nn.Parameter], epochs: int, lr: float, salt: int = 0
) -> dict[str, float]:
    """Distillation: fit ``params`` so the model's outputs match the dense teacher's, by ``ctx.distill``.

    With the training layer's distiller the loss is, for CLIP, contrastive KD on the image-text
    logits plus feature matching of the embeddings and last hidden states; for BLIP, KD on the
    caption decoder's logits plus image features; for any other module, the relative error of its
    outputs, weighted, scheduled and optimised as the run's ``training`` section says (``epochs``
    and ``lr`` come from the stage). Only ``params`` move; compressed layers run in training mode
    so pruned entries keep zero gradient. Batch order is drawn from ``ctx.generator`` so a resumed
    run repeats it exactly. Asking for epochs with no distiller is an error, never a silent skip.
    """
    if epochs <= 0 or not params or not ctx.batches:
        return {}
    if ctx.distill is None:
        raise CompressionError(
            f"this stage asks for {epochs} epoch(s) of distillation but the pipeline has no distiller: use "
            "rcc_compression.CompressionPipeline (or compress_model), pass distill=... to the engine's "
            "CascadePipeline, or set the stage's epochs to 0"
        )
    return ctx.distill(model, params, ctx.batches, ctx.teacher_outputs(), epochs, lr, ctx.generator(salt), ctx.device)
