"""Training recipes of the bundled reference models: a tiny CLIP, a tiny BLIP and a tiny LLaVA on the world.

``rcc world train-reference --kind clip|blip|llava --out DIR`` trains on the world's train split (read
through the Karpathy-json loader and the tensor cache), within a wall-clock budget on a CPU, then
records its quality on a freshly generated test split in ``DIR/reference.json``:

* CLIP: symmetric InfoNCE with a learnable temperature, a random one of each image's five captions
  per step, plus one *attribute-swap* hard negative per image when the scene allows one (the same
  scene described with colours exchanged between objects, or one attribute changed): only text
  that binds each colour to its own shape tells the positive from it, which is what zero-shot on
  unseen colour-shape pairs needs. Negatives use only pairs seen in training. Half of each batch
  is single-object scenes in groups of one colour (so shape, not colour, separates them), and
  some single-object images are shown in grey with a colour-free caption (shape features that
  transfer to colours the shape was never seen in).
* BLIP: the captioning language-model loss of ``BlipForConditionalGeneration`` on a random caption
  per image; decoder inputs start with ``[DEC]``, as generation does.
* LLaVA: the bundled CLIP's vision tower, a projector and a small Llama, trained on captions and
  questions about the same images (:mod:`.reference_llava`).

Both run as steps of :class:`~..training.trainer.CompressionTrainer` (the trainer recovery uses),
with AdamW, linear warm-up and a cosine decay fitted to the time budget, and brightness/contrast
augmentation only: no hue changes or flips (they would falsify colours and relations) and no crops
(objects sit on the patch grid).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import open_world
from ..data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, TrainAugment, normalize
from ..data.world import (
    ALL_PAIRS,
    COLOURS,
    HELD_OUT_PAIRS,
    PREFIXES,
    SEEN_PAIRS,
    SHAPE_WORDS,
    SHAPES,
    WORLD_TEMPLATES,
    WORLD_VERSION,
    WorldSpec,
    build_world_tokenizer,
    caption_from_objects,
    classification_scenes,
    generate_world,
    generation_progress,
    load_world_info,
    render_scene,
)
from ..errors import DataError
from ..evaluation.suite import evaluate_model
from ..evaluation.zero_shot import classifier_weights
from ..models.base import image_processor_class
from ..models.blip import BLIPWrapper
from ..models.clip import CLIPWrapper
from ..training.callbacks import Callback, ProgressBar
from ..training.distributed import DistInfo
from ..training.settings import TrainingSection
from ..training.trainer import CompressionTrainer
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger
from ..utils.runs import RunRecord, process_tempdir
from ..utils.seeding import seed_everything
from .reference_llava import LlavaBatches, build_llava, freeze_tower, image_features, llava_loss

log = get_logger("reference")

IMAGE_SIZE = 64


@dataclass
class ReferenceRecipe:
    """Sizes and optimisation settings of one reference model (defaults: the shipped CLIP)."""

    kind: str = "clip"
    seed: int = 0
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    hidden: int = 64
    vision_layers: int = 4
    text_layers: int = 2
    heads: int = 4
    patch: int = 8
    mlp_ratio: int = 4
    hard_negatives: bool = True
    #: share of each batch drawn as single-object scenes in groups of one colour (forces shape discrimination)
    grouped_fraction: float = 0.5
    groups: int = 8
    #: chance that a single-object image is shown in grey with a colour-free caption ("one circle.")
    grey_fraction: float = 0.3
    time_budget_s: float = 1200.0
    eval_every: int = 250
    #: LLaVA: the CLIP whose vision tower starts the model (None: a fresh tower of the sizes above)
    vision_from: str | None = None
    #: LLaVA: the language model's width and MLP ratio, and the share of questions among the targets
    lm_hidden: int = 128
    lm_mlp_ratio: int = 3
    vqa_fraction: float = 0.5
    #: CPU threads; 0 picks the cores the machine's load leaves free
    threads: int = 0


def default_recipe(kind: str, seed: int = 0) -> ReferenceRecipe:
    """The recipe the shipped model of ``kind`` was trained with."""
    if kind == "clip":
        return ReferenceRecipe(kind="clip", seed=seed)
    if kind == "blip":
        return ReferenceRecipe(kind="blip", seed=seed, steps=2500, batch_size=96, lr=1e-3, hidden=96,
                               vision_layers=4, text_layers=2, patch=8, hard_negatives=False, grouped_fraction=0.0,
                               grey_fraction=0.0)
    if kind == "llava":
        return ReferenceRecipe(kind="llava", seed=seed, steps=2000, batch_size=48, lr=1e-3, text_layers=3, heads=4,
                               hard_negatives=False, grouped_fraction=0.0, grey_fraction=0.0,
                               vision_from="rcc-clip-world", lm_hidden=128, lm_mlp_ratio=3, vqa_fraction=0.5)
    raise DataError(f"--kind must be clip, blip or llava, got {kind!r}")


# ------------------------------------------------------------------------------- model builders
def build_clip(recipe: ReferenceRecipe, tokenizer: Any) -> Any:
    """A randomly initialised ``CLIPWrapper`` of the recipe's sizes over the world tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    h = recipe.hidden
    vocab = tokenizer.get_vocab()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=recipe.mlp_ratio * h,
                         num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.heads,
                         max_position_embeddings=tokenizer.model_max_length, pad_token_id=vocab["[PAD]"],
                         bos_token_id=vocab["[BOS]"], eos_token_id=vocab["[EOS]"]),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=recipe.patch, hidden_size=h,
                           intermediate_size=recipe.mlp_ratio * h, num_hidden_layers=recipe.vision_layers,
                           num_attention_heads=recipe.heads),
        projection_dim=h,
    )
    torch.manual_seed(recipe.seed)
    model = CLIPModel(cfg)
    proc = image_processor_class("clip")(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return CLIPWrapper(model, proc, tokenizer, name="rcc-clip-world")


def build_blip(recipe: ReferenceRecipe, tokenizer: Any) -> Any:
    """A randomly initialised captioning ``BLIPWrapper`` of the recipe's sizes over the world tokenizer."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    h = recipe.hidden
    vocab = tokenizer.get_vocab()
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=recipe.mlp_ratio * h,
                         num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.heads,
                         max_position_embeddings=tokenizer.model_max_length, encoder_hidden_size=h,
                         pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[EOS]"],
                         eos_token_id=vocab["[EOS]"]),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=recipe.patch, hidden_size=h,
                           intermediate_size=recipe.mlp_ratio * h, num_hidden_layers=recipe.vision_layers,
                           num_attention_heads=recipe.heads),
        projection_dim=h,
    )
    torch.manual_seed(recipe.seed)
    model = BlipForConditionalGeneration(cfg)
    proc = image_processor_class("blip")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return BLIPWrapper(model, proc, tokenizer, name="rcc-blip-world")


# ------------------------------------------------------------------------------------- data
@dataclass
class TrainSplit:
    """The world's train split in memory: uint8 pixels, captions and scene descriptions per image."""

    pixels: torch.Tensor
    captions: list[list[str]]
    scenes: list[dict[str, Any]]


def load_train_split(world_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> TrainSplit:
    """Read the train split through the Karpathy loader, caching its pixels as safetensors shards."""
    transform = ImageTransform(size=IMAGE_SIZE, crop=IMAGE_SIZE)
    ds = open_world(world_dir, "captions", "train", transform)
    ds.cache_data(cache_dir or Path(world_dir) / ".cache")
    pixels = torch.stack([ds.pixels(i) for i in range(len(ds))])
    return TrainSplit(pixels, [r.captions for r in ds.records], [r.meta.get("scene", {}) for r in ds.records])


def swap_negative(scene: dict[str, Any], rng: random.Random, allowed: set[tuple[str, str]]) -> str | None:
    """A caption of the scene with colours exchanged between two objects, or one attribute changed.

    Only ``allowed`` (colour, shape) pairs appear, so a training negative never names a held-out
    pair. ``None`` when no such variant exists.
    """
    objs = [(o["colour"], o["shape"], float(o["x"])) for o in scene.get("objects", [])]
    if not objs:
        return None
    candidates: list[list[tuple[str, str, float]]] = []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if a[0] != b[0] and a[1] != b[1] and (b[0], a[1]) in allowed and (a[0], b[1]) in allowed:
                swapped = list(objs)
                swapped[i], swapped[j] = (b[0], a[1], a[2]), (a[0], b[1], b[2])
                candidates.append(swapped)
    if not candidates or rng.random() < 0.3:
        k = rng.randrange(len(objs))
        c, s, x = objs[k]
        for _ in range(10):
            new = (rng.choice(list(COLOURS)), s) if rng.random() < 0.5 else (c, rng.choice(SHAPES))
            if new != (c, s) and new in allowed:
                changed = list(objs)
                changed[k] = (new[0], new[1], x)
                candidates.append(changed)
                break
    if not candidates:
        return None
    return caption_from_objects(rng.choice(candidates))


class BatchSampler:
    """Training batches of image indices: uniform, or partly colour-grouped single-object scenes.

    With ``grouped_fraction`` > 0, that share of a batch is ``groups`` groups of single-object
    scenes of one colour each; inside a group only the shape tells captions apart, which gives
    shape the gradient signal that random batches (told apart by colours and counts) lack.
    """

    def __init__(self, scenes: Sequence[dict[str, Any]], batch_size: int, grouped_fraction: float, groups: int,
                 seed: int) -> None:
        self.n = len(scenes)
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.by_colour: dict[str, list[int]] = {}
        for i, sc in enumerate(scenes):
            objs = sc.get("objects", [])
            if len(objs) == 1:
                self.by_colour.setdefault(objs[0]["colour"], []).append(i)
        usable = [c for c, idx in self.by_colour.items() if len(idx) >= 2]
        self.groups = min(groups, len(usable))
        self.per_group = int(batch_size * grouped_fraction) // max(self.groups, 1) if self.groups else 0

    def __call__(self) -> torch.Tensor:
        idx: list[int] = []
        if self.per_group:
            colours = [c for c in sorted(self.by_colour) if len(self.by_colour[c]) >= self.per_group]
            for c in self.rng.sample(colours, min(self.groups, len(colours))):
                idx += self.rng.sample(self.by_colour[c], self.per_group)
        idx += [self.rng.randrange(self.n) for _ in range(self.batch_size - len(idx))]
        return torch.tensor(idx)


def encode_texts_bucketed(model: Any, tokenizer: Any, texts: Sequence[str], bucket: int = 64) -> torch.Tensor:
    """Normalised text embeddings, encoding length-sorted chunks so little compute goes to padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for start in range(0, len(order), bucket):
        chunk = [texts[i] for i in order[start : start + bucket]]
        limit = tokenizer.model_max_length
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        parts.append(model.text_projection(pooled))
    emb = torch.cat(parts)
    inverse = torch.argsort(torch.tensor(order))
    return F.normalize(emb[inverse], dim=-1)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE on normalised embeddings; ``negatives`` are extra texts for the image side only."""
    candidates = text if negatives is None or negatives.numel() == 0 else torch.cat([text, negatives])
    target = torch.arange(image.shape[0], device=image.device)
    i2t = scale * image @ candidates.t()
    t2i = scale * text @ image.t()
    return (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2


class Schedule:
    """Linear warm-up and cosine decay over a horizon that fits the time budget.

    From step ``probe`` on, every ``every`` steps, the recent seconds per step are measured and the
    horizon shrinks (never grows) to what the remaining budget allows, so the learning rate is
    annealed when the time runs out: a slow or shared machine trains fewer steps rather than
    stopping mid-schedule. The horizon is recorded; ``--steps N`` with an ample budget reproduces a
    run exactly.
    """

    def __init__(self, recipe: ReferenceRecipe, probe: int = 30, every: int = 50) -> None:
        self.recipe = recipe
        self.horizon = recipe.steps
        self.probe = probe
        self.every = every
        self.start = time.perf_counter()
        self._mark = (0, self.start)

    def observe(self, step: int) -> None:
        """Shrink the horizon when the recent speed cannot finish it within the budget."""
        done = step + 1
        if done < self.probe or (done - self.probe) % self.every:
            return
        now = time.perf_counter()
        per_step = (now - self._mark[1]) / max(done - self._mark[0], 1)
        self._mark = (done, now)
        remaining = self.recipe.time_budget_s - (now - self.start)
        affordable = done + int(0.95 * max(remaining, 0.0) / max(per_step, 1e-9))
        if affordable < self.horizon:
            self.horizon = max(done + 1, affordable)
            log.info("%.2f s/step: the schedule now ends at step %d (budget %.0f s)", per_step, self.horizon,
                     self.recipe.time_budget_s)

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(self.recipe.warmup, 1))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, self.horizon) / max(self.horizon, 1)))

    def done(self, step: int) -> bool:
        return step + 1 >= self.horizon or time.perf_counter() - self.start > self.recipe.time_budget_s


def grey_views(
    pixels: torch.Tensor,
    texts: list[str],
    scenes: Sequence[dict[str, Any]],
    idx: torch.Tensor,
    fraction: float,
    rng: random.Random,
) -> None:
    """In place: show some single-object images in grey, captioned by shape only.

    Without colour the caption can only be matched by shape, so the image encoder learns shape
    features that do not depend on the colour they were seen in, which is what recognising a
    held-out colour-shape pair needs. No colour is named, so no held-out pair is shown or named.
    """
    for j, i in enumerate(idx.tolist()):
        objs = scenes[i].get("objects", [])
        if len(objs) == 1 and rng.random() < fraction:
            grey = 0.299 * pixels[j, 0].float() + 0.587 * pixels[j, 1].float() + 0.114 * pixels[j, 2].float()
            pixels[j] = grey.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1)
            shape = rng.choice(SHAPE_WORDS[objs[0]["shape"]])
            texts[j] = rng.choice([f"one {shape}.", f"{rng.choice(PREFIXES)} one {shape}."])


# ----------------------------------------------------------------------------------- training
@torch.no_grad()
def _quick_zero_shot(
    wrapper: Any, pixels: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], unseen: torch.Tensor
) -> tuple[float, float]:
    """(top-1, unseen top-1) on a small in-memory colour+shape set, for training logs."""
    wrapper.eval()
    weights = classifier_weights(wrapper, classnames, WORLD_TEMPLATES)
    emb = torch.cat([wrapper.encode_image(normalize(pixels[i : i + 256])) for i in range(0, len(pixels), 256)])
    ok = ((emb @ weights.t()).argmax(1) == labels).float()
    wrapper.train()
    return float(ok.mean()), float(ok[unseen].mean()) if unseen.any() else float("nan")


def _val_probe(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    scenes = list(classification_scenes(seed, "val", 4))
    pixels = torch.from_numpy(__import__("numpy").stack([render_scene(s) for _, s in scenes])).permute(0, 3, 1, 2)
    pairs = [s.pairs()[0] for _, s in scenes]
    labels = torch.tensor([ALL_PAIRS.index(p) for p in pairs])
    unseen = torch.tensor([p in HELD_OUT_PAIRS for p in pairs])
    return pixels, labels, [f"{c} {s}" for c, s in ALL_PAIRS], unseen


class _Batches(Sequence[dict[str, Any]]):
    """The recipe's training batches, drawn lazily in order: item ``i`` is the ``i``-th step's batch.

    Every random draw (batch indices, caption choice, grey views, augmentation, hard negatives)
    comes from generators seeded by the recipe, in a fixed order, so a run is a function of its
    seed. The trainer asks for each index once, in order.
    """

    def __init__(self, recipe: ReferenceRecipe, data: TrainSplit, tokenizer: Any) -> None:
        self.recipe, self.data, self.tokenizer = recipe, data, tokenizer
        self.allowed = set(SEEN_PAIRS)
        self.augment = TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.1, contrast=0.1)
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.rng = random.Random(recipe.seed)
        self.sampler = BatchSampler(data.scenes, recipe.batch_size, recipe.grouped_fraction, recipe.groups,
                                    recipe.seed)

    def __len__(self) -> int:
        return self.recipe.steps

    def __getitem__(self, i: Any) -> dict[str, Any]:
        r, d, rng = self.recipe, self.data, self.rng
        idx = self.sampler()
        if r.kind == "clip":
            raw = d.pixels[idx].clone()
            texts = [rng.choice(d.captions[i]) for i in idx.tolist()]
            if r.grey_fraction > 0:
                grey_views(raw, texts, d.scenes, idx, r.grey_fraction, rng)
            pixels = self.augment(raw, self.gen)
            negs = [swap_negative(d.scenes[i], rng, self.allowed) for i in idx.tolist()] if r.hard_negatives else []
            return {"pixel_values": pixels, "texts": texts, "negatives": [t for t in negs if t]}
        pixels = self.augment(d.pixels[idx], self.gen)
        texts = [rng.choice(d.captions[i]) for i in idx.tolist()]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"pixel_values": pixels, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}


class ReferenceObjective(nn.Module):
    """The recipe's loss for :class:`~..training.trainer.CompressionTrainer`.

    CLIP: symmetric InfoNCE with the batch's attribute-swap hard negatives as extra texts for the
    image side. BLIP: the captioning language-model loss of ``BlipForConditionalGeneration``.
    """

    def __init__(self, kind: str, tokenizer: Any) -> None:
        super().__init__()
        self.kind, self.tokenizer = kind, tokenizer

    def forward(self, model: nn.Module, batch: dict[str, Any], index: int | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.kind == "blip":
            return model(**batch).loss, {}
        if self.kind == "llava":
            return llava_loss(model, batch), {}
        texts, negs = batch["texts"], batch["negatives"]
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=batch["pixel_values"]).pooler_output),
                          dim=-1)
        txt = encode_texts_bucketed(model, self.tokenizer, texts + negs)
        scale = model.logit_scale.exp().clamp(max=100.0)
        return contrastive_loss(img, txt[: len(texts)], txt[len(texts) :], scale), {}


class _Budget(Callback):
    """Fits the schedule to the wall-clock budget, logs probe accuracy, and ends the run in time."""

    def __init__(self, recipe: ReferenceRecipe, schedule: Schedule, wrapper: Any) -> None:
        self.recipe, self.schedule, self.wrapper = recipe, schedule, wrapper
        self.probe = _val_probe(recipe.seed) if recipe.kind == "clip" else None
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, trainer: Any) -> None:
        self.schedule.start = time.perf_counter()

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        step = trainer.state.step - 1
        elapsed = time.perf_counter() - self.schedule.start
        self.schedule.observe(step)
        finished = self.schedule.done(step)
        if step % self.recipe.eval_every == 0 or finished:
            entry: dict[str, Any] = {"step": step, "seconds": round(elapsed, 1), "loss": round(logs["loss"], 4)}
            if self.probe is not None:
                top1, unseen = _quick_zero_shot(self.wrapper, *self.probe)
                entry.update(val_top1=round(top1, 4), val_top1_unseen=round(unseen, 4))
            self.history.append(entry)
            log.info("step %d (%.0fs): %s", step, elapsed,
                     ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if k not in ("step", "seconds")))
        trainer.state.should_stop = finished


def train_model(recipe: ReferenceRecipe, data: TrainSplit, progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """Train the reference model of ``recipe.kind`` with :class:`~..training.trainer.CompressionTrainer`.

    One epoch of ``recipe.steps`` lazily drawn batches, AdamW (betas 0.9/0.98) with gradient
    clipping at 1, and the time-budget :class:`Schedule`; returns the wrapper and a log of the run.
    """
    tok = build_world_tokenizer(recipe.kind, max_length=128 if recipe.kind == "llava" else 40)
    if recipe.kind == "llava":
        wrapper = build_llava(recipe, tok, IMAGE_SIZE)
        freeze_tower(wrapper)
        log.info("vision tower features of %d training images", len(data.pixels))
        batches: Sequence[dict[str, Any]] = LlavaBatches(recipe, data, wrapper, image_features(wrapper, data.pixels))
    else:
        wrapper = (build_clip if recipe.kind == "clip" else build_blip)(recipe, tok)
        batches = _Batches(recipe, data, tok)
    wrapper.train()
    cfg = TrainingSection(batch_size=recipe.batch_size, learning_rate=recipe.lr, num_epochs=1, optimizer="adamw",
                          weight_decay=recipe.weight_decay, betas=(0.9, 0.98), grad_clip=1.0, dropout=True,
                          kd_weight=0.0, feature_weight=0.0, task_weight=1.0)
    schedule = Schedule(recipe)
    budget = _Budget(recipe, schedule, wrapper)
    callbacks: list[Callback] = [budget] + ([ProgressBar(f"training {recipe.kind.upper()}")] if progress else [])
    with CompressionTrainer(wrapper.model, ReferenceObjective(recipe.kind, tok), cfg,
                            train_data=batches, order=lambda epoch: range(recipe.steps),
                            callbacks=callbacks, seed=recipe.seed, dist=DistInfo(),
                            scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)) as trainer:
        state = trainer.fit()
    wrapper.eval()
    return wrapper, {
        "steps_done": state.step,
        "planned_steps": schedule.horizon,
        "seconds": round(time.perf_counter() - schedule.start, 1),
        "history": budget.history,
    }


# ---------------------------------------------------------------------------- figures, saving
def measure_figures(wrapper: Any, kind: str, spec: Any, bootstrap_samples: int = 1000) -> dict[str, Any]:
    """Evaluate on a test split generated afresh from ``spec`` (a ``WorldSpec``); keys read ``world:PART``."""
    benches = {"clip": ["zero_shot", "retrieval"], "blip": ["captioning"], "llava": ["captioning", "vqa"]}[kind]
    with process_tempdir("rcc-world-test-") as tmp_path:
        tmp = str(tmp_path)
        spec.splits = ("test",)
        spec.parts = {"clip": ("captions", "classification"), "blip": ("captions",),
                      "llava": ("captions", "vqa")}[kind]
        generate_world(tmp, spec)
        results = evaluate_model(wrapper, benches, [tmp], bootstrap_samples=bootstrap_samples, seed=spec.seed)
    results["datasets"] = ["world"]
    results["world_seed"] = spec.seed
    for bench, per_ds in results["results"].items():
        results["results"][bench] = {k.replace(f"{tmp}#", "world:"): v for k, v in per_ds.items()}
        for v in results["results"][bench].values():
            v["source"] = str(v.get("source", "")).replace(tmp, "<world test split>")
    return results


def headline_figures(results: dict[str, Any]) -> dict[str, float]:
    """The few numbers quoted for a reference model (value only; CIs stay in reference.json)."""
    out: dict[str, float] = {}
    res = results["results"]
    for task in ("colour_shape", "shape", "colour"):
        r = res.get("zero_shot", {}).get(f"world:{task}")
        if r:
            out[f"zero_shot_{task}_top1"] = r["metrics"]["top1"]["value"]
            if task == "colour_shape":
                out["zero_shot_colour_shape_top1_unseen"] = r["metrics_unseen"]["top1"]["value"]
                out["zero_shot_colour_shape_top1_seen"] = r["metrics_seen"]["top1"]["value"]
    r = res.get("retrieval", {}).get("world:captions")
    if r:
        for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"):
            out[f"retrieval_{key}"] = r["metrics"][key]["value"]
    r = res.get("captioning", {}).get("world:captions")
    if r:
        for key in ("CIDEr", "BLEU-4", "BLEU-1", "ROUGE-L", "METEOR"):
            if key in r["metrics"]:
                out[f"captioning_{key}"] = r["metrics"][key]["value"]
    r = res.get("vqa", {}).get("world:vqa")
    if r:
        for key, m in r["metrics"].items():
            out[f"vqa_{key}"] = m["value"]
    return out


def save_reference(wrapper: Any, out: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write the model (safetensors), tokenizer, image processor and ``reference.json`` into ``out``."""
    path = Path(out)
    wrapper.save_pretrained(path)
    atomic_write_json(path / "reference.json", record)
    return path


def _free_cores() -> int:
    """CPU threads to train with: the cores other processes leave idle (at least one).

    Oversubscribed OpenMP threads wait on each other at every barrier, so on a shared machine
    fewer threads train faster than all of them.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def train_reference(
    kind: str,
    out: str | os.PathLike[str],
    world_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    time_budget_s: float = 1200.0,
    steps: int | None = None,
    progress: bool = False,
    recipe: ReferenceRecipe | None = None,
    bootstrap_samples: int = 1000,
    test_spec: Any = None,
) -> dict[str, Any]:
    """Train a reference model on the world (generated at ``seed`` unless given), save it, return its record.

    The figures are measured on the world's test split at default sizes (``test_spec`` overrides
    them), generated afresh from the world's seed, so anyone can reproduce them.
    """
    recipe = recipe or default_recipe(kind, seed)
    recipe.kind, recipe.time_budget_s = kind, time_budget_s
    if steps is not None:
        recipe.steps = steps
    torch.set_num_threads(recipe.threads or _free_cores())
    seed_everything(recipe.seed)
    out = Path(out)
    # named by pid: a run killed outright (no clean-up) has its folder removed by the next one
    with process_tempdir("rcc-world-") as tmp:
        generated = world_dir is None
        if world_dir is None:
            world_dir = Path(tmp) / "world"
            with generation_progress(f"the world's train split (seed {seed})", bar=progress) as report:
                generate_world(world_dir, WorldSpec(seed=seed, splits=("train",), parts=("captions",)), progress=report)
        info = load_world_info(world_dir)
        where = f"generated in a temporary directory (seed {seed}, train split)" if generated else str(world_dir)
        with RunRecord(out / "training_run", {"recipe": asdict(recipe), "world": where}, recipe.seed) as run:
            data = load_train_split(world_dir, Path(tmp) / "cache")
            log.info("train split: %d images, %d captions", len(data.captions), sum(map(len, data.captions)))
            wrapper, train_log = train_model(recipe, data, progress)
            train_log["threads"] = torch.get_num_threads()
            spec = test_spec or WorldSpec(seed=int(info["seed"]))
            spec.seed = int(info["seed"])
            results = measure_figures(wrapper, kind, spec, bootstrap_samples)
            record = {
                "model": wrapper.name,
                "kind": kind,
                "figures": headline_figures(results),
                "world": {
                    "version": WORLD_VERSION,
                    "seed": spec.seed,
                    "train_split": "train",
                    "train_images": len(data.captions),
                    "test_split": "test",
                    "test_sizes": {"test": spec.test, "cls_test_per_class": spec.cls_test_per_class,
                                   "vqa_test": spec.vqa_test},
                },
                "evaluation": results,
                "training": {"recipe": asdict(recipe), **train_log},
                "parameters": sum(p.numel() for p in wrapper.model.parameters()),
            }
            run.update(figures=record["figures"], training=train_log)
            save_reference(wrapper, out, record)
    return record
