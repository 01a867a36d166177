"""Image and text transforms: CLIP normalisation, resize and centre crop, training augmentation,
caption cleaning and truncation.

Images are handled with PIL (resizing) and torch (everything after), so no torchvision is needed.
The deterministic part of an image transform has a :meth:`ImageTransform.fingerprint`, which keys
caches of preprocessed tensors: change any parameter and the cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataError

#: OpenAI CLIP normalisation (also BLIP's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shorter side, or exact height x width), centre crop, scale to [0, 1], normalise.

    ``size`` is the shorter side after resizing (``None``: no resize); ``resize_exact`` resizes to
    ``size x size`` regardless of aspect (BLIP's processor does this); ``crop`` is the square centre
    crop (``None``: no crop). :meth:`to_uint8` stops before normalisation, which is what caches store.
    """

    size: int | None = 224
    crop: int | None = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: str = "bicubic"
    resize_exact: bool = False

    def fingerprint(self) -> str:
        """A short hash of every parameter that changes the output (cache key)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_uint8(self, image: Any) -> torch.Tensor:
        """Resized and cropped pixels, ``uint8`` (3 x H x W), before normalisation."""
        from PIL import Image

        img = to_pil(image)
        if self.size is not None:
            w, h = img.size
            if self.resize_exact:
                new = (self.size, self.size)
            else:
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(self.size * long / short)  # truncation, as Hugging Face processors do
                new = (self.size, new_long) if w <= h else (new_long, self.size)
            if new != (w, h):
                img = img.resize(new, resample=Image.Resampling(_RESAMPLE[self.resample]))
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.crop is not None:
            arr = center_crop(arr, self.crop)
        return arr.contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8`` (or [0, 255] float) pixels, ... x 3 x H x W, to normalised float32."""
        return normalize(pixels, self.mean, self.std)

    def __call__(self, image: Any) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))


def to_pil(image: Any) -> Any:
    """An RGB PIL image from a PIL image, an H x W x 3 array, or a 3 x H x W uint8 tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(arr[..., :3])


def center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Square centre crop of ... x H x W (padded with zeros when the image is smaller), as HF processors do."""
    h, w = pixels.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        pixels = torch.nn.functional.pad(pixels, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = pixels.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[..., top : top + size, left : left + size]


def normalize(
    pixels: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """``(pixels / 255 - mean) / std`` per channel (channel axis -3)."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def transform_for(wrapper_or_processor: Any) -> ImageTransform:
    """The :class:`ImageTransform` equivalent to a model's Hugging Face image processor.

    Reads ``size``/``crop_size``/``image_mean``/``image_std`` of ``CLIPImageProcessor`` (shorter
    side, then centre crop) and ``BlipImageProcessor`` (exact resize, no crop).
    """
    proc = getattr(wrapper_or_processor, "image_processor", wrapper_or_processor)
    if proc is None:
        raise DataError("the model has no image processor (a bare nn.Module?): load it with get_model(), or "
                        "give an ImageTransform explicitly")
    size = dict(getattr(proc, "size", None) or {})
    mean = tuple(float(v) for v in (getattr(proc, "image_mean", None) or CLIP_MEAN))
    std = tuple(float(v) for v in (getattr(proc, "image_std", None) or CLIP_STD))
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}.get(
        int(getattr(proc, "resample", 3) or 3), "bicubic"
    )
    do_resize = bool(getattr(proc, "do_resize", True))
    do_crop = bool(getattr(proc, "do_center_crop", False))
    crop_cfg = dict(getattr(proc, "crop_size", None) or {})
    if "shortest_edge" in size:
        resize, exact = int(size["shortest_edge"]), False
    else:
        resize, exact = int(size.get("height", 224)), True
    crop = int(crop_cfg.get("height", resize)) if do_crop else None
    return ImageTransform(
        size=resize if do_resize else None, crop=crop, mean=mean, std=std, resample=resample, resize_exact=exact
    )


@dataclass
class TrainAugment:
    """Training augmentation on uint8 tensors, batched: random resized crop and brightness/contrast.

    Hue is never changed and images are never flipped by default: in the reference world colour
    words and left/right relations are the labels. ``hflip`` exists for datasets without them.
    """

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a uint8 batch B x 3 x H x W and return it normalised (float32)."""
        b, _, h, w = pixels.shape
        x = pixels.float() / 255.0
        g = generator
        area = torch.empty(b).uniform_(*self.scale, generator=g)
        logr = torch.empty(b).uniform_(np.log(self.ratio[0]), np.log(self.ratio[1]), generator=g)
        ratio = logr.exp()
        cw = (area * ratio).sqrt().clamp(max=1.0)
        ch = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, generator=g) * (1 - cw) + cw / 2) * 2 - 1
        cy = (torch.rand(b, generator=g) * (1 - ch) + ch / 2) * 2 - 1
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        if self.hflip:
            flip = torch.rand(b, generator=g) < 0.5
            theta[flip, 0, 0] *= -1
        grid = torch.nn.functional.affine_grid(theta, (b, 3, h, w), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        bright = 1 + torch.empty(b, 1, 1, 1).uniform_(-self.brightness, self.brightness, generator=g)
        contrast = 1 + torch.empty(b, 1, 1, 1).uniform_(-self.contrast, self.contrast, generator=g)
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mu) * contrast + mu) * bright
        x = x.clamp(0, 1) * 255.0
        return normalize(x, self.mean, self.std)


# -------------------------------------------------------------------------------------- text
_SPACES = re.compile(r"\s+")
_CONTROL = re.compile(r"[\u0000-\u001f\u007f-\u009f]")


def clean_caption(text: str, lowercase: bool = False) -> str:
    """Unicode-normalise (NFKC), drop control characters, collapse whitespace, strip.

    Returns ``""`` for captions with nothing left, which loaders treat as an empty caption.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    return text.lower() if lowercase else text


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` whitespace-separated words of ``text`` (all when ``None``)."""
    if max_words is None:
        return text
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    words = text.split(" ")
    return text if len(words) <= max_words else " ".join(words[:max_words])
