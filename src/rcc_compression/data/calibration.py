"""Calibration batches for compression: keyword arguments for ``wrapper.model(**batch)``.

Sources: ``synthetic`` (random inputs shaped for the model), ``world`` (reference-world scenes
generated in memory from the seed; no files), or a dataset path/spec any loader here understands.
CLIP, SigLIP and BLIP captioning batches hold ``pixel_values``, ``input_ids`` and ``attention_mask``; BLIP
VQA batches also ``labels`` (the answer tokens). LLaVA batches are an image, the model's prompt (its
caption instruction, or a question) and the target text (the caption, or the answer), with
``labels`` scoring the target only; the world's calibration for LLaVA alternates captions and
questions, so both tasks' inputs are seen.

A model whose calibration must be image-text pairs (``paired_calibration``: SigLIP, LLaVA) refuses
``synthetic`` calibration (random images and token ids: statistics of noise, not of the pairs the
model is used on) unless ``allow_unpaired`` asks for it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import DataError
from ..utils.logging import get_logger
from .collate import Collator, model_inputs
from .datasets import ArrayDataset, MultimodalDataset, Record
from .loaders import build_loader
from .splits import open_split
from .transforms import transform_for
from .world import SEEN_PAIRS, questions_for, scene_rng, world_scenes

log = get_logger("data")


def _kind(wrapper: Any) -> str:
    mtype = getattr(wrapper, "model_type", "")
    if mtype == "blip" and getattr(wrapper, "is_vqa", False):
        return "blip_vqa"
    if mtype in ("clip", "blip", "llava"):
        return mtype
    if mtype == "siglip":
        return "clip"  # the same pairs: an image and a caption
    raise DataError(f"calibration data needs a CLIP, SigLIP, BLIP or LLaVA wrapper, got {type(wrapper).__name__}")


def check_paired(wrapper: Any, source: str, allow_unpaired: bool = False) -> None:
    """Refuse noise calibration for a model that calibrates on image-text pairs, unless asked for."""
    if source == "synthetic" and getattr(wrapper, "paired_calibration", False) and not allow_unpaired:
        raise DataError(
            f"a {getattr(wrapper, 'model_type', '')} model calibrates on image-text pairs: calibration source "
            "'synthetic' (random images and token ids) is refused; use 'world' or your own image-text data "
            "(calibration.source), or set calibration.allow_unpaired: true to calibrate on noise anyway")


def check_paired_batches(wrapper: Any, batches: Sequence[Mapping[str, Any]], allow_unpaired: bool = False) -> None:
    """Refuse calibration batches without images or without text for a model that calibrates on pairs."""
    if allow_unpaired or not getattr(wrapper, "paired_calibration", False):
        return
    for i, batch in enumerate(batches):
        missing = [k for k in ("pixel_values", "input_ids") if k not in batch]
        if missing:
            raise DataError(
                f"calibration batch {i} has no {' and no '.join(missing)}: a {getattr(wrapper, 'model_type', '')} "
                "model calibrates on image-text pairs (text-only or image-only batches measure statistics it "
                "never sees in use); give pairs, or set calibration.allow_unpaired: true to use them anyway")


def _world_dataset(wrapper: Any, count: int, seed: int, kind: str) -> ArrayDataset:
    images, records = [], []
    for item in world_scenes(seed, "train", count):
        images.append(item.image)
        rec = Record(image=len(records), image_id=str(item.index), captions=item.captions)
        if kind == "blip_vqa" or (kind == "llava" and item.index % 2):
            q, answers, _ = random.Random(seed * 1_000_003 + item.index).choice(
                questions_for(item.scene, scene_rng(seed, "vqa", "train", item.index), SEEN_PAIRS))
            rec = Record(image=len(records), image_id=str(item.index), question=q, answers=answers,
                         captions=item.captions if kind == "llava" else [])
        records.append(rec)
    return ArrayDataset(images, records, transform=transform_for(wrapper), source=f"world(seed={seed})",
                        task="vqa" if kind == "blip_vqa" else "captions")


def captions_for_classes(ds: MultimodalDataset) -> MultimodalDataset:
    """Give class-folder records a caption ``a photo of a {class}.`` so CLIP/BLIP get text."""
    names = ds.classnames or []
    for rec in ds.records:
        if not rec.captions and rec.label is not None and rec.label < len(names):
            rec.captions = [f"a photo of a {names[rec.label]}."]
    return ds


def _open_source(source: str, wrapper: Any, kind: str, skip_bad: bool, root: str | None) -> MultimodalDataset:
    task = "vqa" if kind == "blip_vqa" else None
    try:
        ds = open_split(source, "train", task=task, transform=transform_for(wrapper), skip_bad=skip_bad, root=root)
    except DataError as exc:
        if "split" in str(exc) and "@" not in source:
            raise DataError(f"{exc} (calibration reads the train split; name another with {source}@SPLIT, "
                            "which the leak check then keeps apart from evaluation)") from None
        raise
    if kind == "blip_vqa" and ds.task != "vqa":
        raise DataError(f"{source}: a BLIP VQA model calibrates on question/answer data (VQA json), "
                        f"got a {ds.format_name} dataset")
    return captions_for_classes(ds)


def calibration_items(
    wrapper: Any, source: str, total: int, seed: int, skip_bad: bool = False, root: str | None = None
) -> tuple[MultimodalDataset, list[int]]:
    """The dataset of a calibration ``source`` and the ``total`` item indices drawn from it (seeded).

    ``world`` renders reference-world train scenes in memory; any other spec opens its train split
    (or ``SPEC@SPLIT``). Items are drawn without replacement when the dataset is large enough,
    with replacement otherwise.
    """
    kind = _kind(wrapper)
    if getattr(wrapper, "tokenizer", None) is None:
        raise DataError(f"calibration source {source!r} needs text, but the model has no tokenizer; use 'synthetic'")
    ds = _world_dataset(wrapper, total, seed, kind) if source == "world" else _open_source(
        source, wrapper, kind, skip_bad, root)
    gen = torch.Generator().manual_seed(seed)
    if len(ds) >= total:
        order = torch.randperm(len(ds), generator=gen)[:total]
    else:
        order = torch.randint(0, len(ds), (total,), generator=gen)
    return ds, order.tolist()


def build_calibration_batches(
    wrapper: Any,
    source: str,
    num_batches: int,
    batch_size: int,
    seed: int,
    skip_bad: bool = False,
    root: str | None = None,
    items: tuple[MultimodalDataset, list[int]] | None = None,
    allow_unpaired: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` batches of ``batch_size`` for ``wrapper.model(**batch)``, deterministic per seed.

    ``source``: ``synthetic``, ``world``, or a dataset spec (path, ``hf:NAME``, ``world:PART``,
    known name, each optionally ``@SPLIT``; the train split by default). ``items`` reuses a
    :func:`calibration_items` draw (a job that leak-checks them first). Bad items raise a
    ``DataError`` naming the file unless ``skip_bad``. ``synthetic`` for a model that calibrates
    on image-text pairs needs ``allow_unpaired`` (:func:`check_paired`).
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}")
    kind = _kind(wrapper)
    check_paired(wrapper, source, allow_unpaired)
    if source == "synthetic":
        gen = torch.Generator().manual_seed(seed)
        return [wrapper.synthetic_batch(batch_size, generator=gen) for _ in range(num_batches)]
    total = num_batches * batch_size
    ds, order = items if items is not None else calibration_items(wrapper, source, total, seed, skip_bad, root)
    subset = torch.utils.data.Subset(ds, order)
    collate = Collator(
        tokenizer=None if kind == "llava" else wrapper.tokenizer,
        max_length=wrapper.max_text_length,
        caption="random",
        mean=ds.transform.mean,
        std=ds.transform.std,
        skip_bad=skip_bad,
        answers_as_labels=kind == "blip_vqa",
        seed=seed,
    )
    if kind == "llava":
        collate = PairCollator(wrapper, collate)
    loader = build_loader(subset, batch_size, shuffle=False, collate_fn=collate, seed=seed, skip_bad=skip_bad)
    keys = (
        ("pixel_values", "input_ids", "attention_mask", "labels")
        if kind in ("blip_vqa", "llava")
        else ("pixel_values", "input_ids", "attention_mask")
    )
    batches = []
    for batch in loader:
        inputs = model_inputs(batch, keys)
        if kind == "blip_vqa" and "labels" not in inputs:
            raise DataError(f"{source}: VQA calibration needs answers (an annotations file)")
        batches.append(inputs)
    if not batches:
        raise DataError(f"{source}: every calibration item was unreadable ({loader.skipped} skipped)")
    skipped = loader.skipped + sum(getattr(ds, "skipped", {}).values())
    if skipped:
        log.warning("calibration: %d unreadable item(s) of %s skipped (--skip-bad)", skipped, source)
    return batches


class PairCollator:
    """A LLaVA batch: each sample's image, prompt and target tokens (``wrapper.training_inputs``).

    A sample with a question is prompted with it and answered with its most common answer; any
    other sample is prompted with the model's caption instruction and continued with one of its
    captions (drawn as the wrapped :class:`Collator` draws).
    """

    def __init__(self, wrapper: Any, base: Collator) -> None:
        self.wrapper, self.base = wrapper, base

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(samples)
        if "pixel_values" not in batch:
            return batch
        good = [s for s in samples if not s.get("error")]
        prompts, targets = [], []
        for s in good:
            if s.get("question") is not None and s.get("answers"):
                prompts.append(s["question"])
                targets.append(Counter(s["answers"]).most_common(1)[0][0])
            elif s.get("captions"):
                prompts.append(self.wrapper.caption_prompt)
                targets.append(self.base._choose(s))
            else:
                raise DataError(f"item {s.get('image_id')}: a LLaVA model calibrates on image-text pairs; this "
                                "item has neither captions nor a question with answers")
        batch.update(self.wrapper.training_inputs(prompts, targets))
        return batch

