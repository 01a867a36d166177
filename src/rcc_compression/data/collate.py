"""Collation: samples -> one batch of tensors.

* :class:`Collator` turns dataset samples into a batch: uint8 pixels stacked and normalised (or
  augmented, training only), one caption per image (random for training, first for evaluation)
  tokenised with padding and an ``attention_mask``, or the question with the answers as
  ``labels`` for VQA. Samples whose image could not be read carry an ``error``; the collator
  drops them when skipping bad items and otherwise passes the errors on.
* A sample may carry a *draw* (:class:`SampleKey`, set by
  :class:`~rcc_compression.data.loaders.DynamicBatchSampler`): the seed of its random choices
  (which caption, which crop), so batches do not depend on which worker process collates them.
* :func:`pad_collate` batches samples that are already tensors (rows of earlier batches, as recovery
  training reshuffles calibration batches): token sequences of different lengths are right-padded
  to the longest, with the attention mask marking the padding, so captions of any length batch
  together and each sample's outputs stay what they were.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from ..errors import DataError
from .transforms import CLIP_MEAN, CLIP_STD, TrainAugment, normalize

#: keys of a batch that are model keyword arguments (the rest is bookkeeping)
MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels")


class SampleKey(NamedTuple):
    """A dataset index with the seed of that item's random choices in this epoch (see :class:`DynamicBatchSampler`)."""

    index: int
    draw: int


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s random choices in ``epoch`` of a run seeded ``seed`` (63 bits)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def caption_choice(draw: int, count: int) -> int:
    """Which of ``count`` captions an item with this draw uses (the sampler and the collator agree)."""
    return random.Random(draw).randrange(count)


class Collator:
    """Batch samples into tensors; see the module docstring.

    ``caption``: ``"random"`` (one of each image's captions, for training), ``"first"``, or
    ``"none"`` (no text). ``augment`` replaces normalisation by a :class:`TrainAugment`.
    ``answers_as_labels`` tokenises each question's most common answer into ``labels`` (BLIP VQA).
    Random choices follow each sample's ``draw`` (set by :class:`DynamicBatchSampler`), so they do
    not depend on which worker process collates; samples without one use a generator seeded by
    ``seed``.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        max_length: int | None = None,
        caption: str = "first",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        augment: TrainAugment | None = None,
        skip_bad: bool = False,
        answers_as_labels: bool = False,
        seed: int | None = None,
    ) -> None:
        if caption not in ("random", "first", "none"):
            raise ValueError(f"caption must be 'random', 'first' or 'none', got {caption!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caption = caption
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.skip_bad = skip_bad
        self.answers_as_labels = answers_as_labels
        self._rng: Any = random.Random(seed) if seed is not None else random

    @property
    def text_limit(self) -> int:
        """Tokens per text after truncation: ``max_length``, else the tokenizer's, else 77."""
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", 77)
        return 77 if limit is None or limit > 10_000 else int(limit)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.text_limit, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _choose(self, sample: Mapping[str, Any]) -> str:
        caps = sample["captions"]
        if self.caption == "first":
            return caps[0]
        draw = sample.get("draw")
        return caps[caption_choice(draw, len(caps))] if draw is not None else self._rng.choice(caps)

    def _pixels(self, good: list[dict[str, Any]]) -> torch.Tensor:
        pixels = torch.stack([s["pixel_values"] for s in good])
        if self.augment is None:
            return normalize(pixels, self.mean, self.std)
        draws = [s.get("draw") for s in good]
        gen = None
        if all(d is not None for d in draws):
            digest = hashlib.blake2b(",".join(map(str, draws)).encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return self.augment(pixels, generator=gen)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        errors = [s["error"] for s in samples if s.get("error")]
        good = [s for s in samples if not s.get("error")]
        batch: dict[str, Any] = {
            "errors": [] if self.skip_bad else errors,
            "skipped": len(errors) if self.skip_bad else 0,
        }
        if errors and not self.skip_bad:
            return batch
        if not samples:
            batch["empty"] = True  # an empty Poisson sample
        if not good:
            return batch
        batch["pixel_values"] = self._pixels(good)
        batch["index"] = torch.tensor([s["index"] for s in good])
        batch["image_id"] = [s["image_id"] for s in good]
        if good[0].get("label") is not None:
            batch["label"] = torch.tensor([int(s["label"]) for s in good])
        if good[0].get("question") is not None:
            batch["question"] = [s["question"] for s in good]
            batch["question_id"] = [s["question_id"] for s in good]
            batch["answers"] = [s["answers"] for s in good]
            if self.tokenizer is not None:
                batch.update(self._tokenize(batch["question"]))
                if self.answers_as_labels and good[0].get("answers"):
                    top = [Counter(s["answers"]).most_common(1)[0][0] for s in good]
                    ids = self._tokenize(top)
                    batch["labels"] = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
        elif good[0].get("captions"):
            batch["captions"] = [s["captions"] for s in good]
            if self.caption != "none":
                texts = [self._choose(s) for s in good]
                batch["text"] = texts
                if self.tokenizer is not None:
                    batch.update(self._tokenize(texts))
        return batch


def model_inputs(batch: Mapping[str, Any], keys: Sequence[str] = MODEL_KEYS) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``model(**batch)`` in a collated batch."""
    return {k: batch[k] for k in keys if k in batch and isinstance(batch[k], torch.Tensor)}


#: keys holding one token sequence per sample, and the value of their padded positions
#: (``None``: the tokenizer's pad id)
TOKEN_KEYS: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "labels": -100,
                                     "decoder_input_ids": None, "decoder_attention_mask": 0, "token_type_ids": 0}


def pad_collate(samples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Stack samples into a batch, right-padding token sequences of different lengths to the longest.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 (so padding is not
    attended) and ``labels`` with -100 (so it is not scored). Tensors of equal shape are stacked;
    other values are listed. Token ids of different lengths without an attention mask, or other
    tensors that differ in shape, are refused with a :class:`DataError` naming the key.
    """
    if not samples:
        raise DataError("no samples to batch")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if not all(isinstance(v, torch.Tensor) for v in values):
            out[key] = values
            continue
        shapes = sorted({tuple(v.shape) for v in values})
        if len(shapes) == 1:
            out[key] = torch.stack(values)
            continue
        if key not in TOKEN_KEYS or any(v.dim() != 1 for v in values):
            raise DataError(f"cannot batch {key!r}: samples have shapes {shapes[:4]} (only token sequences are "
                            "padded)")
        if key.endswith("input_ids") and key.replace("input_ids", "attention_mask") not in samples[0]:
            raise DataError(f"cannot pad {key!r} of different lengths without an attention mask to hide the padding")
        fill = TOKEN_KEYS[key]
        out[key] = pad_sequence(values, batch_first=True, padding_value=pad_token_id if fill is None else fill)
    return out

