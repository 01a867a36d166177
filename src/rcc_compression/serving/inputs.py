"""Request limits and the decoding of client input (base64 images, texts), checked before any work.

Nothing a client sends is ever used as a path: images arrive as base64 bytes (a ``data:`` URL
prefix is accepted) and are decoded from memory by Pillow, restricted to a few formats, with the
pixel count checked from the header before the pixels are decoded (no decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class ServeLimits(BaseModel):
    """What one request may ask for; a request over a limit gets 413 (size) or 422 (content)
    with a JSON error naming the limit."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="request body")
    max_image_bytes: int = Field(4 * 2**20, ge=64, description="one decoded image file")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one image")
    max_image_side: int = Field(8192, ge=1, description="longer side of one image")
    max_batch: int = Field(32, ge=1, description="images or texts in one request")
    max_text_chars: int = Field(1000, ge=1, description="one text, label, question or prompt")
    max_caption_tokens: int = Field(64, ge=1, description="caption/answer length a request may ask for")
    max_beams: int = Field(4, ge=1, description="beam search width a request may ask for")
    request_timeout_s: float = Field(30.0, gt=0, description="whole request, body read to answer")


class LimitError(Exception):
    """A request broke a limit (``status`` 413) or carries unusable content (422)."""

    def __init__(self, status: int, code: str, message: str, limit: str | None = None,
                 value: Any = None, maximum: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.limit, self.value, self.maximum = status, code, limit, value, maximum

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.limit is not None:
            err.update(limit=self.limit, value=self.value, max=self.maximum)
        return {"error": err}


def over(limit: str, value: Any, maximum: Any, what: str, status: int = 413) -> LimitError:
    return LimitError(status, "limit_exceeded", f"{what}: {value} exceeds {limit}={maximum}", limit, value, maximum)


def check_batch(n: int, limits: ServeLimits, what: str) -> None:
    if n == 0:
        raise LimitError(422, "invalid_request", f"{what}: give at least one")
    if n > limits.max_batch:
        raise over("max_batch", n, limits.max_batch, f"{what} in one request")


def check_texts(texts: list[str], limits: ServeLimits, what: str) -> None:
    for i, t in enumerate(texts):
        if len(t) > limits.max_text_chars:
            raise over("max_text_chars", len(t), limits.max_text_chars, f"{what}[{i}] length", status=422)


def decode_image(data: str, limits: ServeLimits, index: int = 0) -> Any:
    """A base64 image (PNG, JPEG, WebP, BMP) as an RGB PIL image, within the size and pixel limits."""
    from PIL import Image

    where = f"images[{index}]"
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise LimitError(422, "invalid_image", f"{where}: a data URL must be base64 (data:image/...;base64,...)")
    if len(data) > (limits.max_image_bytes * 4) // 3 + 4:
        raise over("max_image_bytes", (len(data) * 3) // 4, limits.max_image_bytes, f"{where} size")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise LimitError(422, "invalid_image", f"{where}: not base64 image data") from None
    if len(raw) > limits.max_image_bytes:
        raise over("max_image_bytes", len(raw), limits.max_image_bytes, f"{where} size")
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Exception:  # noqa: BLE001 - Pillow raises many types for junk input
        raise LimitError(422, "invalid_image",
                         f"{where}: not a readable image (allowed: {', '.join(IMAGE_FORMATS)})") from None
    w, h = img.size
    if max(w, h) > limits.max_image_side:
        raise over("max_image_side", max(w, h), limits.max_image_side, f"{where} side")
    if w * h > limits.max_image_pixels:
        raise over("max_image_pixels", w * h, limits.max_image_pixels, f"{where} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return img.convert("RGB")
    except Exception:  # noqa: BLE001
        raise LimitError(422, "invalid_image", f"{where}: image data is truncated or corrupt") from None
