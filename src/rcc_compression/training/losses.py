"""Distillation and task losses: pure functions, and one module that weighs them for a model family.

Terms (each a scalar tensor):

- ``kd``: KL divergence between temperature-softened teacher and student distributions, times
  ``T**2`` so gradient magnitudes do not shrink with the temperature (Hinton et al., 2015). For
  CLIP the distributions are the rows *and* columns of the image-text similarity matrix
  (image->text and text->image); for BLIP the next-token distributions of the caption decoder.
- ``feature``: per-sample relative squared error between student and teacher features, through a
  learned linear projection when their widths differ (FitNets).
- ``attention``: KL between teacher and student attention distributions (MiniLM), layers paired
  uniformly when depths differ and heads averaged when head counts differ.
- ``task``: the model's own objective: symmetric contrastive cross-entropy (CLIP) or next-token
  cross-entropy (BLIP).

Every loss is a mean of per-sample (or per-token) values, so data-parallel ranks that each take a
share of a batch and average their gradients train exactly as one process on the whole batch;
the CLIP terms, which couple all samples of a batch, gather embeddings across ranks instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.registry import unwrap_model

_ATTN = re.compile(r"^(.*?)\.?attentions\.(\d+)$")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64 for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------- pure losses
def kd_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the last dim, averaged over (unmasked) rows."""
    s = F.log_softmax(_wide(student) / temperature, dim=-1)
    t = F.log_softmax(_wide(teacher).to(s.dtype) / temperature, dim=-1)
    per_row = (t.exp() * (t - s)).sum(-1)
    if mask is not None:
        per_row = per_row[mask.to(torch.bool)]
    return per_row.mean() * temperature**2


def clip_contrastive_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Match the teacher's image->text (rows) and text->image (columns) similarity distributions."""
    return 0.5 * (kd_logits(student_logits, teacher_logits, temperature)
                  + kd_logits(student_logits.t(), teacher_logits.t(), temperature))


def clip_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i matches text i (as ``CLIPModel(return_loss=True)``)."""
    logits = _wide(logits_per_image)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy: position i predicts label i+1 (as BLIP's text decoder)."""
    pred = _wide(logits[:, :-1])
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels[:, 1:].reshape(-1).to(pred.device),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Mean over samples of ``||s_i - t_i||^2 / max(||t_i||^2, floor * d)`` (all dims after the first: ``d``).

    The floor (an RMS of 1e-3 per element) keeps the ratio finite for features that are (nearly)
    zero; real features lie far above it, so there the loss is the plain relative error.
    """
    s = _wide(student).reshape(student.shape[0], -1)
    t = _wide(teacher).to(s.dtype).reshape(teacher.shape[0], -1)
    return ((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(floor * t.shape[1])).mean()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher || student) between attention maps ``(batch, heads, query, key)``, mean over rows.

    Head counts that differ are reconciled by averaging heads (a mean of distributions is one).
    """
    s, t = _wide(student), _wide(teacher).to(_wide(student).dtype)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    return (torch.xlogy(t, t) - t * s.clamp_min(eps).log()).sum(-1).mean()


def pair_layers(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i -> teacher layer ``ceil((i+1) n_t / n_s) - 1`` (uniform, last to last)."""
    return [(i, -(-(i + 1) * n_teacher // n_student) - 1) for i in range(n_student)]


def attention_maps(outputs: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Attention tensors of flattened outputs grouped by tower prefix, in layer order."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in outputs.items():
        m = _ATTN.match(key)
        if m and value.dim() == 4:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = value
    return {k: [v[i] for i in sorted(v)] for k, v in groups.items()}


def attention_transfer(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean :func:`attention_kl` over every paired layer of every tower both outputs share."""
    s_maps, t_maps = attention_maps(student), attention_maps(teacher)
    terms = [attention_kl(s[i], t_maps[tower][j])
             for tower, s in s_maps.items() if tower in t_maps
             for i, j in pair_layers(len(s), len(t_maps[tower]))]
    if not terms:
        raise ValueError("attention transfer needs attentions from both models (run them with output_attentions=True "
                         "and eager attention)")
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------- the module
@dataclass(frozen=True)
class LossWeights:
    """How much each term counts; a term with weight 0 is not computed."""

    kd: float = 1.0
    feature: float = 1.0
    attention: float = 0.0
    task: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> LossWeights:
        """From a :class:`~rcc_compression.config.TrainingSection`."""
        return cls(cfg.kd_weight, cfg.feature_weight, cfg.attention_weight, cfg.task_weight)


#: features matched by default, per family (keys of flattened outputs)
FEATURE_KEYS = {
    "clip": ("image_embeds", "text_embeds", "vision_model_output.last_hidden_state",
             "text_model_output.last_hidden_state"),
    "blip": ("image_embeds",),
}


def model_family(model: nn.Module) -> str:
    """``clip``, ``blip`` (a captioning decoder) or ``generic`` for any other module (wrappers and DDP unwrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    model = unwrap_model(model)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype == "clip":
        return "clip"
    if mtype == "blip" and type(model).__name__ == "BlipForConditionalGeneration":
        return "blip"
    return "generic"


def _key(name: str) -> str:
    return name.replace(".", "__")


class FeatureMatchingLoss(nn.Module):
    """Mean :func:`feature_loss` over named features, through learned projections where widths differ (FitNets).

    ``keys``: the flattened-output names to match (``None``: every output both sides share with
    the same shape, attentions aside); ``projections``: name -> (student width, teacher width),
    a bias-free linear map trained with the student.
    """

    def __init__(self, keys: Sequence[str] | None = None,
                 projections: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.keys = tuple(keys) if keys is not None else None
        self.proj = nn.ModuleDict({_key(k): nn.Linear(s, t, bias=False) for k, (s, t) in (projections or {}).items()})

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        keys = self.keys if self.keys is not None else [
            k for k, t in teacher.items()
            if k in student and not _ATTN.match(k) and k != "logit_scale"
            and (student[k].shape == t.shape or _key(k) in self.proj)
        ]
        terms = []
        for k in keys:
            if k not in student or k not in teacher:
                continue
            s = student[k]
            if _key(k) in self.proj:
                s = self.proj[_key(k)](s.to(self.proj[_key(k)].weight.dtype))
            elif s.shape[-1] != teacher[k].shape[-1]:
                raise ValueError(f"feature {k!r}: student width {s.shape[-1]} != teacher width {teacher[k].shape[-1]}; "
                                 f"give a projection for it")
            terms.append(feature_loss(s, teacher[k]))
        if not terms:
            raise ValueError("no feature shared by student and teacher outputs")
        return torch.stack(terms).mean()


class DistillationLoss(nn.Module):
    """Weighted sum of the KD, feature, attention and task terms for one model family.

    ``forward(student, teacher, batch)`` takes flattened outputs (``calibration.flatten_outputs``)
    of the student and the frozen teacher and returns ``(total, {term: value})``. The feature
    term is a :class:`FeatureMatchingLoss` over ``feature_keys`` (default: per family) whose
    ``projections`` are this module's only parameters. ``gather`` (CLIP) is a function that
    concatenates a tensor across data-parallel ranks, keeping the gradient of the local part.
    Other families fall back to the relative error of every output they share.
    """

    def __init__(self, family: str = "generic", weights: LossWeights | None = None, temperature: float = 1.0,
                 feature_keys: Sequence[str] | None = None, projections: Mapping[str, tuple[int, int]] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if family not in ("clip", "blip", "generic"):
            raise ValueError(f"unknown model family {family!r}; allowed: clip, blip, generic")
        self.family = family
        self.weights = weights or LossWeights()
        self.temperature = temperature
        self.features = FeatureMatchingLoss(feature_keys if feature_keys is not None else FEATURE_KEYS.get(family),
                                            projections)
        self.gather = gather
        self.label_smoothing = label_smoothing

    def _clip_logits(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.gather is None or "logit_scale" not in out:
            return out["logits_per_image"]
        img, txt = self.gather(out["image_embeds"]), self.gather(out["text_embeds"])
        return out["logit_scale"].reshape(()) * img @ txt.t()

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                batch: Mapping[str, Any] | None = None, task_loss: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch or {}
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if self.family == "clip":
            if w.kd or w.task:
                s_logits = self._clip_logits(student)
                if w.kd:
                    terms["kd"] = clip_contrastive_kd(s_logits, self._clip_logits(teacher), self.temperature)
                if w.task:
                    terms["task"] = clip_contrastive_loss(s_logits)
        elif self.family == "blip":
            mask = batch.get("attention_mask")
            if w.kd:
                valid = mask[:, 1:].to(student["logits"].device) if mask is not None else None
                terms["kd"] = kd_logits(student["logits"][:, :-1], teacher["logits"][:, :-1], self.temperature, valid)
            if w.task:
                labels = batch.get("labels", batch["input_ids"])
                if mask is not None and "labels" not in batch:
                    labels = labels.masked_fill(mask == 0, -100)
                terms["task"] = lm_loss(student["logits"], labels, label_smoothing=self.label_smoothing)
        else:
            if w.kd:
                terms["kd"] = _shared_relative_error(student, teacher)
            if w.task:
                if task_loss is None:
                    raise ValueError("task loss asked for, but the model returned no loss for this batch")
                terms["task"] = task_loss
        if w.feature and self.family != "generic":
            terms["feature"] = self.features(student, teacher)
        if w.attention:
            terms["attention"] = attention_transfer(student, teacher)
        if not terms:
            raise ValueError("every loss weight is zero: nothing to train")
        total = sum(getattr(w, k) * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def _shared_relative_error(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    terms = [feature_loss(student[k], t) for k, t in teacher.items()
             if k in student and student[k].shape == t.shape and not _ATTN.match(k) and k != "logit_scale"]
    if not terms:
        raise ValueError("no comparable floating outputs between the student and the teacher")
    return torch.stack(terms).mean()
