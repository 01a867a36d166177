"""The reference world: procedural 64x64 scenes of coloured shapes with natural captions.

The world is the project's own measuring instrument: images, captions, class folders and VQA
questions that need no download, generated deterministically from a seed. A scene holds one to
three objects (8 shapes x 8 colours x 2 sizes, anywhere on the canvas) on a textured, noisy
background. Sixteen colour-shape pairs (:data:`HELD_OUT_PAIRS`, two per colour and two per
shape) never occur in a training split, in images or in text, so zero-shot accuracy on them
measures compositional generalisation rather than memory.

On disk (:func:`generate_world`)::

    DIR/world.json                            seed, sizes, held-out pairs (written last)
    DIR/images/{split}/{imgid:06d}.png        caption scenes
    DIR/captions/dataset_world.json           Karpathy-style captions json (splits train/val/test)
    DIR/classification/{task}/classnames.txt  folder -> class name; tasks: shape, colour, colour_shape
    DIR/classification/{task}/{split}/{folder}/{k:05d}.png
    DIR/vqa/questions_{split}.json            VQAv2 questions ("what colour is the triangle?")
    DIR/vqa/annotations_{split}.json          VQAv2 annotations (10 answers each)

Every scene is drawn from its own random stream ``(seed, split, purpose, index)``, so any prefix
of a split can be regenerated in memory (:func:`world_scenes`) exactly as it is on disk.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.logging import get_logger
from ..utils.progress import interactive, progress_bar

log = get_logger("data")

#: bump when rendering or captions change, so recorded figures name the world they were measured on
WORLD_VERSION = 1
IMAGE_SIZE = 64
SPLITS = ("train", "val", "test")
TASKS = ("shape", "colour", "colour_shape")

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 85, 225),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 185),
    "orange": (245, 135, 25),
    "pink": (245, 130, 200),
    "white": (242, 242, 242),
}
SIZES: dict[str, float] = {"small": 9.0, "large": 15.0}  # radius in pixels at 64x64
#: object centres lie on this pixel grid (the reference models' patch size): position varies over
#: 5 to 7 places per axis, and a shape looks the same wherever it is, so a tiny ViT learns it fast
POSITION_GRID = 8
BACKGROUNDS = ("plain", "striped", "checkered", "gradient", "mottled")

# the first word is the canonical one (class names, VQA answers); the rest are synonyms in captions
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
    "star": ("star",), "cross": ("cross", "plus sign"), "heart": ("heart",),
    "diamond": ("diamond", "rhombus"), "ring": ("ring", "hoop"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain",), "striped": ("striped",), "checkered": ("checkered", "chequered"),
    "gradient": ("shaded",), "mottled": ("mottled", "cloudy"),
}
NUMBER_WORDS = ("zero", "one", "two", "three")
POSITION_PHRASES = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)
PREFIXES = ("a photo of", "a picture of", "an image of", "there is", "a drawing of", "a rendering of")

#: colour-shape pairs absent from every training split: (shape - colour) mod 8 in {0, 3}
HELD_OUT_OFFSETS = (0, 3)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES) if (si - ci) % len(SHAPES) in HELD_OUT_OFFSETS
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

_STREAMS = {"captions": 1, "classification": 2, "vqa": 3}
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


# ------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class WorldObject:
    """One shape on the canvas: what it is, where its centre is (pixels), its radius and tilt."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    angle: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)
    shade: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A full scene description; :func:`render_scene` turns it into pixels deterministically."""

    objects: tuple[WorldObject, ...]
    background: str
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_params: tuple[float, ...]
    noise_sigma: float
    noise_seed: int
    size: int = IMAGE_SIZE

    def pairs(self) -> list[tuple[str, str]]:
        """The (colour, shape) pair of every object."""
        return [(o.colour, o.shape) for o in self.objects]

    def to_json(self) -> dict[str, Any]:
        """The parts of the scene annotations need (objects and background)."""
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "x": round(o.x, 2), "y": round(o.y, 2)}
                for o in self.objects
            ],
        }


@dataclass
class WorldSpec:
    """How much of the world to generate. Counts are scenes (captions, VQA) or images per class."""

    seed: int = 0
    train: int = 20000
    val: int = 500
    test: int = 1000
    cls_train_per_class: int = 40
    cls_val_per_class: int = 4
    cls_test_per_class: int = 16
    vqa_train: int = 4000
    vqa_val: int = 500
    vqa_test: int = 1000
    splits: tuple[str, ...] = SPLITS
    parts: tuple[str, ...] = ("captions", "classification", "vqa")
    image_size: int = IMAGE_SIZE
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, kind: str, split: str) -> int:
        """Number of scenes (or images per class for ``classification``) of one split."""
        if kind == "captions":
            return int(getattr(self, split))
        if kind == "classification":
            return int(getattr(self, f"cls_{split}_per_class"))
        return int(getattr(self, f"vqa_{split}"))


def scene_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one scene; independent of every other scene's."""
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[kind], _SPLIT_IDS[split], index]))


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """Colour-shape pairs a split may show: training sees only :data:`SEEN_PAIRS`."""
    return SEEN_PAIRS if split == "train" else ALL_PAIRS


def _muted_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.05, 0.35), rng.uniform(0.22, 0.58)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _object_rgb(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour], dtype=np.float64) * rng.uniform(0.88, 1.08) + rng.normal(0, 8, 3)
    return tuple(int(v) for v in np.clip(np.round(base), 0, 255))  # type: ignore[return-value]


def _place(
    rng: np.random.Generator, radii: Sequence[float], size: int, tries: int = 200, grid: int = 0
) -> list[tuple[float, float]] | None:
    """Centres for circles of ``radii`` inside the canvas without overlap (rejection sampling).

    With ``grid`` > 0 the centres lie on multiples of ``grid`` pixels.
    """
    centres: list[tuple[float, float]] = []
    for r in radii:
        lo, hi = r + 1, size - r - 1
        if grid:
            lo, hi = grid * np.ceil(lo / grid), grid * np.floor(hi / grid)
            if hi < lo:
                return None
        for _ in range(tries):
            x, y = rng.uniform(lo, hi, 2)
            if grid:
                x, y = grid * np.round(x / grid), grid * np.round(y / grid)
            placed = zip(centres, radii[: len(centres)], strict=True)
            if all((x - cx) ** 2 + (y - cy) ** 2 >= (r + cr + 2) ** 2 for (cx, cy), cr in placed):
                centres.append((float(x), float(y)))
                break
        else:
            return None
    return centres


def sample_scene(
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]],
    n_objects: int | None = None,
    size: int = IMAGE_SIZE,
) -> Scene:
    """A random scene whose objects use only ``pairs``; one to three objects unless ``n_objects``."""
    n = int(n_objects) if n_objects is not None else int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    chosen = [pairs[int(i)] for i in rng.integers(0, len(pairs), n)]
    if n >= 2 and rng.uniform() < 0.2:  # same pair twice, so counts ("two red circles") occur
        chosen[1] = chosen[0]
    scale = size / IMAGE_SIZE
    while True:
        sizes = [str(rng.choice(list(SIZES))) for _ in range(n)]
        radii = [SIZES[s] * scale * rng.uniform(0.9, 1.1) for s in sizes]
        centres = _place(rng, radii, size, grid=int(round(POSITION_GRID * scale)))
        if centres is not None:
            break
    objects = []
    for (colour, shape), sz, r, (x, y) in zip(chosen, sizes, radii, centres, strict=True):
        tilt = rng.uniform(-0.25, 0.25) if shape in ("triangle", "star", "heart", "cross") else 0.0
        objects.append(
            WorldObject(
                shape,
                colour,
                sz,
                x,
                y,
                float(r),
                float(tilt),
                _object_rgb(colour, rng),
                float(rng.uniform(-0.12, 0.12)),
            )
        )
    background = str(rng.choice(BACKGROUNDS))
    bg_params = tuple(float(v) for v in rng.uniform(0, 1, 6))
    return Scene(
        objects=tuple(objects),
        background=background,
        bg_colours=(_muted_rgb(rng), _muted_rgb(rng)),
        bg_params=bg_params,
        noise_sigma=float(rng.uniform(3, 12)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        size=size,
    )


# --------------------------------------------------------------------------------- rendering
def _polygon_mask(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every (u, v) against the vertices ``poly`` (k x 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):  # loop over edges; every pixel at once
        crosses = (ay > v) != (by > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = ax + (v - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (u < xint)
    return inside


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    k = np.arange(2 * points)
    radius = np.where(k % 2 == 0, 1.0, inner)
    theta = -np.pi / 2 + k * np.pi / points
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


_STAR = _star_polygon()


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in unit coordinates (``v`` points down; the shape fills about [-1, 1]^2)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.52**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "diamond":
        return np.abs(u) / 0.8 + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.75) & (np.abs(u) <= (v + 0.95) / 1.7)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "star":
        return _polygon_mask(u, v, _STAR)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.2
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _background(scene: Scene) -> np.ndarray:
    """The background as float RGB (size x size x 3), vectorised over pixels."""
    n = scene.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n
    p = scene.bg_params
    theta = p[0] * np.pi
    along = xx * np.cos(theta) + yy * np.sin(theta)
    if scene.background == "plain":
        t = np.zeros_like(xx)
    elif scene.background == "striped":
        freq = 3 + 6 * p[1]
        t = 0.5 + 0.5 * np.tanh(4 * np.sin(2 * np.pi * (freq * along + p[2])))
    elif scene.background == "checkered":
        k = 3 + int(p[1] * 6)
        t = ((np.floor(xx * k + p[2]) + np.floor(yy * k + p[3])) % 2).astype(np.float64)
    elif scene.background == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-9)
    elif scene.background == "mottled":
        t = np.zeros_like(xx)
        for i in range(3):
            fx, fy = 1 + 3 * p[(i + 1) % 6], 1 + 3 * p[(i + 3) % 6]
            t += np.cos(2 * np.pi * (fx * xx + p[(i + 2) % 6])) * np.cos(2 * np.pi * (fy * yy + p[(i + 4) % 6]))
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    else:
        raise ValueError(f"unknown background {scene.background!r}")
    c0, c1 = (np.asarray(c, dtype=np.float64) for c in scene.bg_colours)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def render_scene(scene: Scene, supersample: int = 2) -> np.ndarray:
    """Pixels of a scene as ``uint8`` (size x size x 3); a pure function of ``scene``."""
    n, s = scene.size, supersample
    img = _background(scene)
    fine = (np.arange(n * s, dtype=np.float64) + 0.5) / s
    gy, gx = np.meshgrid(fine, fine, indexing="ij")
    for obj in scene.objects:
        du, dv = (gx - obj.x) / obj.radius, (gy - obj.y) / obj.radius
        ca, sa = np.cos(obj.angle), np.sin(obj.angle)
        u, v = ca * du + sa * dv, -sa * du + ca * dv
        alpha = shape_mask(obj.shape, u, v).astype(np.float64).reshape(n, s, n, s).mean(axis=(1, 3))
        shading = 1.0 + obj.shade * np.clip(((gx - obj.x) / obj.radius)[::s, ::s], -1, 1)
        colour = np.clip(np.asarray(obj.rgb, dtype=np.float64)[None, None, :] * shading[..., None], 0, 255)
        img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_sigma, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- captions
def _pick(rng: np.random.Generator, words: Sequence[str], canonical_p: float = 0.75) -> str:
    if len(words) == 1 or rng.uniform() < canonical_p:
        return words[0]
    return str(words[int(rng.integers(1, len(words)))])


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def plural(word: str) -> str:
    """English plural of a shape word (``cross`` -> ``crosses``, ``plus sign`` -> ``plus signs``)."""
    return word + "es" if word.endswith(("s", "x")) else word + "s"


def _np(obj: WorldObject, rng: np.random.Generator) -> str:
    """A noun phrase for one object, in one of several word orders."""
    c, s = _pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])
    form = rng.choice(4, p=[0.5, 0.3, 0.1, 0.1])
    if form == 0:
        return f"{_article(c)} {c} {s}"
    if form == 1:
        z = _pick(rng, SIZE_WORDS[obj.size], 0.6)
        return f"{_article(z)} {z} {c} {s}"
    if form == 2:
        return f"{_article(s)} {s} that is {c}"
    return f"{_article(s)} {s} in {c}"


def relation(a: WorldObject, b: WorldObject) -> str:
    """Where ``a`` is relative to ``b``: ``to the left of``, ``above``, ... or ``next to``."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) > 6:
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) > 6:
        return "above" if dy > 0 else "below"
    return "next to"


def position_phrase(obj: WorldObject, size: int = IMAGE_SIZE) -> str:
    """Where an object is on a 3x3 grid (``in the top left corner``, ``in the middle``, ...)."""
    col, row = min(int(3 * obj.x / size), 2), min(int(3 * obj.y / size), 2)
    return POSITION_PHRASES[row][col]


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _counted(objs: Sequence[WorldObject], rng: np.random.Generator) -> str | None:
    """``two red circles and a blue star`` when a pair repeats, else ``None``."""
    counts = Counter((o.colour, o.shape) for o in objs)
    if max(counts.values()) < 2:
        return None
    parts = []
    for (c, s), k in counts.items():
        if k == 1:
            parts.append(_np(next(o for o in objs if (o.colour, o.shape) == (c, s)), rng))
        else:
            cw, sw = _pick(rng, COLOUR_WORDS[c]), _pick(rng, SHAPE_WORDS[s])
            lead = NUMBER_WORDS[k] if k > 2 or rng.uniform() < 0.7 else "a pair of"
            parts.append(f"{lead} {cw} {plural(sw)}")
    return _join(parts)


def caption_from_objects(objects: Sequence[tuple[str, str, float]]) -> str:
    """The plainest caption of (colour, shape, x) objects: left to right, repeats counted."""
    objs = sorted(objects, key=lambda o: o[2])
    counts = Counter((c, s) for c, s, _ in objs)
    parts: list[str] = []
    for c, s, _ in objs:
        k = counts.pop((c, s), 0)
        if k == 1:
            parts.append(f"{_article(c)} {c} {s}")
        elif k > 1:
            parts.append(f"{NUMBER_WORDS[k]} {c} {plural(s)}")
    return _join(parts) + "."


def canonical_caption(scene: Scene) -> str:
    """The plainest caption of a scene (``two red circles and a blue star.``)."""
    return caption_from_objects([(o.colour, o.shape, o.x) for o in scene.objects])


def _the(obj: WorldObject, rng: np.random.Generator) -> str:
    """``the red circle`` (with synonyms)."""
    return f"the {_pick(rng, COLOUR_WORDS[obj.colour])} {_pick(rng, SHAPE_WORDS[obj.shape])}"


def describe(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct captions: one canonical (left to right), the rest varied in words and order.

    Single objects are also described as ``one red circle`` and partially (``one circle``,
    ``one red object``): the world's prompt templates are built from these forms, so zero-shot
    prompts are sentences of the training language, never its held-out pairs.
    """
    objs = sorted(scene.objects, key=lambda o: o.x)
    captions = [canonical_caption(scene)]
    bg = scene.background
    k = len(objs)
    for _ in range(200):
        if len(captions) >= n:
            break
        order = [objs[int(i)] for i in rng.permutation(k)]
        nps = [_np(o, rng) for o in order]
        bgw = _pick(rng, BACKGROUND_WORDS[bg])
        prefix = str(rng.choice(PREFIXES))
        counted = _counted(order, rng)
        options: list[str] = [_join(nps), f"{prefix} {_join(nps)}", f"{_join(nps)} on {_article(bgw)} {bgw} background"]
        if k == 1:
            o = order[0]
            one = f"one {_pick(rng, COLOUR_WORDS[o.colour])} {_pick(rng, SHAPE_WORDS[o.shape])}"
            partial = str(
                rng.choice(
                    [
                        f"one {_pick(rng, SHAPE_WORDS[o.shape])}",
                        f"one {_pick(rng, COLOUR_WORDS[o.colour])} {rng.choice(['object', 'shape'])}",
                    ]
                )
            )
            options += [
                f"{nps[0]} {position_phrase(o, scene.size)}",
                f"{_the(o, rng)} is {position_phrase(o, scene.size)}",
                f"{prefix} {one}",
                one,
                f"{prefix} {partial}",
                f"{prefix} {nps[0]} on {_article(bgw)} {bgw} background",
            ]
        else:
            count = NUMBER_WORDS[k]
            noun = str(rng.choice(["objects", "shapes"]))
            rel = relation(order[0], order[1])
            options += [
                f"{count} {noun}: {_join(nps)}",
                f"{nps[0]} {rel} {nps[1]}" + (f", and {nps[2]}" if k == 3 else ""),
                f"{_the(order[0], rng)} is {rel} {_the(order[1], rng)}",
            ]
            if counted is not None:
                there = "there are" if prefix == "there is" and not counted.startswith(("a ", "an ")) else prefix
                options += [counted, f"{there} {counted}"]
        text = str(rng.choice(options)) + "."
        if text not in captions:
            captions.append(text)
    return captions


# --------------------------------------------------------------------------------------- VQA
def _answers(word: str, synonyms: Sequence[str]) -> list[str]:
    """Ten annotator answers; a synonym, where there is one, takes three of them."""
    return [word] * 10 if len(synonyms) < 2 else [word] * 7 + [synonyms[1]] * 3


def questions_for(
    scene: Scene, rng: np.random.Generator, pairs: Sequence[tuple[str, str]]
) -> list[tuple[str, list[str], str]]:
    """Candidate (question, ten answers, answer type) triples about a scene.

    Yes/no questions about absent objects name only ``pairs`` (the split's allowed pairs), so a
    training split never mentions a held-out pair even in a question.
    """
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    out: list[tuple[str, list[str], str]] = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            word = str(rng.choice(["colour", "color"]))
            out.append((f"what {word} is the {o.shape}?", _answers(o.colour, COLOUR_WORDS[o.colour]), "other"))
        if colours[o.colour] == 1:
            out.append((f"what shape is the {o.colour} object?", _answers(o.shape, SHAPE_WORDS[o.shape]), "other"))
    n = len(scene.objects)
    noun = str(rng.choice(["objects", "shapes"]))
    out.append((f"how many {noun} are there?", [str(n)] * 10, "number"))  # digits, as VQAv2 stores numbers
    present = set(scene.pairs())
    if rng.uniform() < 0.5:
        c, s = scene.pairs()[int(rng.integers(0, n))]
        out.append((f"is there {_article(c)} {c} {s}?", ["yes"] * 10, "yes/no"))
    else:
        absent = [p for p in pairs if p not in present]
        c, s = absent[int(rng.integers(0, len(absent)))]
        out.append((f"is there {_article(c)} {c} {s}?", ["no"] * 10, "yes/no"))
    return out


# ------------------------------------------------------------------------------- vocabulary
WORLD_TEMPLATES = (
    "a photo of one {}.",
    "a picture of one {}.",
    "an image of one {}.",
    "there is one {}.",
    "a drawing of one {}.",
    "a rendering of one {}.",
    "one {}.",
)
WORLD_COLOUR_TEMPLATES = (
    "a photo of one {} object.",
    "a picture of one {} shape.",
    "an image of one {} object.",
    "there is one {} shape.",
    "one {} object.",
    "one {} shape.",
)


def world_vocabulary() -> list[str]:
    """Every word a world caption, question, answer or world template can contain (sorted)."""
    words: set[str] = set()
    texts: list[str] = [*PREFIXES, *WORLD_TEMPLATES, *WORLD_COLOUR_TEMPLATES, *NUMBER_WORDS]
    texts += [p for row in POSITION_PHRASES for p in row]
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, BACKGROUND_WORDS):
        for syn in table.values():
            texts += list(syn)
    texts += [plural(w) for syn in SHAPE_WORDS.values() for w in syn]
    texts += [
        "a an one that is in on background and objects shapes object shape something 0 1 2 3",
        "to the left of right above below next to a pair of",
        "what colour color is the shape object how many are there yes no photo picture image single",
    ]
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]+", t.replace("{}", " ").lower()))
    words.update({".", ",", ":", "?"})
    return sorted(words)


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[DEC]")
#: the token a LLaVA prompt holds where the image's features go
IMAGE_TOKEN = "<image>"


def build_world_tokenizer(kind: str = "clip", max_length: int = 40) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`world_vocabulary`.

    ``kind="clip"`` wraps texts as ``[BOS] ... [EOS]``; ``"blip"`` as ``[DEC] ... [EOS]``, so the
    training inputs start with the decoder start token that BLIP's ``generate`` begins with;
    ``"llava"`` starts texts with ``[BOS]`` only (a causal model continues them) and knows
    ``<image>``, the position a LLaVA model writes image features to, as a special token.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if kind not in ("clip", "blip", "llava"):
        raise ValueError(f"kind must be 'clip', 'blip' or 'llava', got {kind!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in world_vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # "circle ." -> "circle."
    start = "[DEC]" if kind == "blip" else "[BOS]"
    single = f"{start} $A" if kind == "llava" else f"{start} $A [EOS]"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(start, vocab[start]), ("[EOS]", vocab["[EOS]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token=start,
        eos_token="[EOS]",
        model_max_length=max_length,
    )
    if kind == "blip":
        fast.sep_token = "[EOS]"
        fast.cls_token = "[DEC]"
    if kind == "llava":
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


# -------------------------------------------------------------------------- in-memory scenes
@dataclass
class WorldItem:
    """One generated caption scene: its pixels, its captions and its description."""

    index: int
    image: np.ndarray
    captions: list[str]
    scene: Scene


def world_scenes(
    seed: int, split: str, count: int, start: int = 0, image_size: int = IMAGE_SIZE
) -> Iterator[WorldItem]:
    """Caption scenes ``start .. start+count-1`` of a split, exactly as :func:`generate_world` writes them."""
    if split not in SPLITS:
        raise DataError(f"world split must be one of {', '.join(SPLITS)}, got {split!r}")
    pairs = split_pairs(split)
    for i in range(start, start + count):
        rng = scene_rng(seed, "captions", split, i)
        scene = sample_scene(rng, pairs, size=image_size)
        yield WorldItem(i, render_scene(scene), describe(scene, rng), scene)


def classification_scenes(
    seed: int, split: str, per_class: int, image_size: int = IMAGE_SIZE
) -> Iterator[tuple[int, Scene]]:
    """Single-object scenes, ``per_class`` for every colour-shape pair the split allows (pair-major order)."""
    pairs = split_pairs(split)
    for pi, pair in enumerate(pairs):
        for k in range(per_class):
            index = pi * per_class + k
            rng = scene_rng(seed, "classification", split, ALL_PAIRS.index(pair) * 100000 + k)
            yield index, sample_scene(rng, [pair], n_objects=1, size=image_size)


# ---------------------------------------------------------------------------------- writing
def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def task_label(task: str, colour: str, shape: str) -> tuple[str, str]:
    """(folder, class name) of an object for one classification task."""
    if task == "shape":
        return shape, shape
    if task == "colour":
        return colour, colour
    if task == "colour_shape":
        return f"{colour}_{shape}", f"{colour} {shape}"
    raise DataError(f"unknown world task {task!r}; tasks: {', '.join(TASKS)}")


def task_classes(task: str) -> list[tuple[str, str]]:
    """Every (folder, class name) of a task, in a fixed order."""
    if task == "shape":
        return [(s, s) for s in SHAPES]
    if task == "colour":
        return [(c, c) for c in COLOURS]
    return [task_label(task, c, s) for c, s in ALL_PAIRS]


def generate_world(
    out: str | os.PathLike[str],
    spec: WorldSpec | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the world described by ``spec`` under ``out`` and return its ``world.json`` record.

    ``progress(stage, done, total)`` is called as images are written. ``world.json`` is written
    last, so a directory without it is an interrupted generation.
    """
    spec = spec or WorldSpec()
    root = Path(out)
    for split in spec.splits:
        if split not in SPLITS:
            raise DataError(f"world split must be one of {', '.join(SPLITS)}, got {split!r}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "world.json").unlink(missing_ok=True)
    report = progress or (lambda *_: None)

    unknown = set(spec.parts) - {"captions", "classification", "vqa"}
    if unknown or not spec.parts:
        raise DataError(f"world parts must be among captions, classification, vqa; got {sorted(spec.parts)}")
    if "vqa" in spec.parts and "captions" not in spec.parts:
        raise DataError("the world's VQA questions are about its caption scenes: generate 'captions' too")
    karpathy: list[dict[str, Any]] = []
    sent_id = 0
    vqa_scenes: dict[str, list[tuple[int, Scene, str]]] = {}
    for split in spec.splits if "captions" in spec.parts else ():
        total = spec.count("captions", split)
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        vqa_scenes[split] = []
        for item in world_scenes(spec.seed, split, total, image_size=spec.image_size):
            name = f"{item.index:06d}.png"
            (img_dir / name).write_bytes(_png_bytes(item.image))
            img_id = len(karpathy)
            karpathy.append(
                {
                    "filepath": f"images/{split}",
                    "filename": name,
                    "imgid": img_id,
                    "split": split,
                    "sentids": list(range(sent_id, sent_id + len(item.captions))),
                    "sentences": [
                        {
                            "raw": c,
                            "tokens": c.rstrip(".").replace(",", "").replace(":", "").split(),
                            "imgid": img_id,
                            "sentid": sent_id + j,
                        }
                        for j, c in enumerate(item.captions)
                    ],
                    "scene": item.scene.to_json(),
                }
            )
            sent_id += len(item.captions)
            vqa_scenes[split].append((img_id, item.scene, f"images/{split}/{name}"))
            if item.index % 250 == 0 or item.index == total - 1:
                report(f"captions/{split}", item.index + 1, total)
    if "captions" in spec.parts:
        atomic_write_json(root / "captions" / "dataset_world.json", {"dataset": "world", "images": karpathy})
    if "vqa" in spec.parts:
        _write_vqa(root, spec, vqa_scenes)
    if "classification" in spec.parts:
        _write_classification(root, spec, report)

    record = {
        "format": "rcc-world",
        "version": WORLD_VERSION,
        "seed": spec.seed,
        "image_size": spec.image_size,
        "spec": {k: v for k, v in asdict(spec).items() if k != "extra"}
        | {"splits": list(spec.splits), "parts": list(spec.parts)},
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "backgrounds": list(BACKGROUNDS),
        "held_out_pairs": [f"{c} {s}" for c, s in HELD_OUT_PAIRS],
        "tasks": {t: f"classification/{t}" for t in TASKS} if "classification" in spec.parts else {},
        "captions": "captions/dataset_world.json" if "captions" in spec.parts else None,
        "vqa": {
            s: {"questions": f"vqa/questions_{s}.json", "annotations": f"vqa/annotations_{s}.json"} for s in spec.splits
        }
        if "vqa" in spec.parts
        else {},
    } | spec.extra
    atomic_write_json(root / "world.json", record)
    return record


def _write_vqa(root: Path, spec: WorldSpec, scenes: dict[str, list[tuple[int, Scene, str]]]) -> None:
    for split, items in scenes.items():
        want = min(spec.count("vqa", split), 4 * len(items))
        questions, annotations = [], []
        for i in range(want):
            img_id, scene, rel = items[i % len(items)]
            rng = scene_rng(spec.seed, "vqa", split, i)
            cands = questions_for(scene, rng, split_pairs(split))
            q, answers, atype = cands[int(rng.integers(0, len(cands)))]
            qid = i
            questions.append({"image_id": img_id, "question": q, "question_id": qid, "image": rel})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": img_id,
                    "question_type": " ".join(q.split()[:2]),
                    "answer_type": atype,
                    "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
                    ],
                }
            )
        info = {"description": "rcc reference world VQA", "version": WORLD_VERSION, "seed": spec.seed}
        atomic_write_json(
            root / "vqa" / f"questions_{split}.json",
            {
                "info": info,
                "task_type": "Open-Ended",
                "data_type": "world",
                "data_subtype": split,
                "questions": questions,
            },
        )
        atomic_write_json(
            root / "vqa" / f"annotations_{split}.json",
            {"info": info, "data_type": "world", "data_subtype": split, "annotations": annotations},
        )


def _write_classification(root: Path, spec: WorldSpec, report: Callable[[str, int, int], None]) -> None:
    base = root / "classification"
    for task in TASKS:
        tdir = base / task
        tdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tdir / "classnames.txt", "".join(f"{f}\t{n}\n" for f, n in task_classes(task)))
        templates = "world_colour" if task == "colour" else "world"
        atomic_write_json(
            tdir / "dataset.json",
            {
                "name": f"world-{task}",
                "templates": templates,
                "held_out_pairs": [f"{c} {s}" for c, s in HELD_OUT_PAIRS],
            },
        )
    for split in spec.splits:
        per_class = spec.count("classification", split)
        total = per_class * len(split_pairs(split))
        for index, scene in classification_scenes(spec.seed, split, per_class, spec.image_size):
            obj = scene.objects[0]
            png = _png_bytes(render_scene(scene))
            first: Path | None = None
            for task in TASKS:
                folder, _ = task_label(task, obj.colour, obj.shape)
                path = base / task / split / folder / f"{index:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                if first is None:
                    path.write_bytes(png)
                    first = path
                else:
                    path.unlink(missing_ok=True)
                    _link_or_copy(first, path)
            if index % 250 == 0 or index == total - 1:
                report(f"classification/{split}", index + 1, total)


def load_world_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``world.json`` record of a generated world directory (a ``DataError`` if absent or malformed)."""
    file = Path(path) / "world.json"
    if not file.is_file():
        raise DataError(
            f"{file}: not found; generate the world with `rcc world generate --out {path}` "
            "(a directory without world.json is an interrupted generation)"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


DEFAULT_SEED = 0


def default_cache_dir() -> Path:
    """Where generated worlds are kept: ``$RCC_CACHE`` or ``~/.cache/rcc_compression``."""
    return Path(os.environ.get("RCC_CACHE") or Path.home() / ".cache" / "rcc_compression")


@contextlib.contextmanager
def generation_progress(what: str, bar: bool | None = None) -> Iterator[Callable[[str, int, int], None]]:
    """A ``report(stage, done, total)`` for :func:`generate_world` that shows where it is: a progress bar on a
    terminal (``bar``; default: when standard error is one) and a log line per stage at every tenth."""
    log.info("generating %s (once; later runs reuse it)", what)
    seen: dict[str, int] = {}

    with progress_bar(interactive() if bar is None else bar, by_first_word=False) as show:
        def report(stage: str, done: int, total: int) -> None:
            show(f"world {stage}", done, total)
            tenth = (10 * done) // max(total, 1)
            if tenth > seen.get(stage, -1):
                seen[stage] = tenth
                log.info("world %s: %d/%d images", stage, done, total)

        yield report


def ensure_world(
    seed: int = DEFAULT_SEED,
    splits: Sequence[str] = ("test",),
    cache_dir: str | os.PathLike[str] | None = None,
    spec: WorldSpec | None = None,
) -> Path:
    """A generated world with ``splits`` at default sizes, made once and then reused from the cache (with
    progress shown while it is generated: the train split takes minutes)."""
    spec = spec or WorldSpec(seed=seed)
    spec.seed = seed
    spec.splits = tuple(s for s in SPLITS if s in set(splits))
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / "worlds" / f"v{WORLD_VERSION}-seed{seed}-{key}"
    if not (path / "world.json").is_file():
        # generate beside the target and rename, so concurrent callers never see half a world
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with generation_progress(f"the reference world ({', '.join(spec.splits)}; seed {seed}) in {path}") as report:
            generate_world(tmp, spec, progress=report)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first (or a stale partial directory is in the way)
            if not (path / "world.json").is_file():
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
            shutil.rmtree(tmp, ignore_errors=True)
    return path
