"""Request limits and the decoding of client input (base64 images, texts, templates), checked before any work.

Nothing a client sends is ever used as a path: images arrive as base64 bytes (a ``data:`` URL
prefix is accepted) and are decoded from memory by Pillow, restricted to a few formats. What
decoding costs is bounded before any pixel is decoded: every image's header is read first, and
one image over ``max_image_pixels``/``max_image_side`` or a request whose images together declare
more than ``max_request_pixels`` is refused (413) with nothing decoded (a 2.8 KB PNG can declare
4096 x 4096). The server also bounds the pixels one key has in flight (``max_key_pixels``).

Zero-shot templates are a fixed placeholder syntax, not ``str.format``: exactly one ``{}`` or
``{label}`` and no other brace. They are checked, and the length of every prompt they make is
computed, before any prompt is built.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..data.images import COMMON_FORMATS, ImageError, ImageInfo, ImageTooLarge, check_size, open_image, probe_image

IMAGE_FORMATS = COMMON_FORMATS


class ServeLimits(BaseModel):
    """What one request may ask for; a request over a limit gets 413 (size) or 422 (content)
    with a JSON error naming the limit."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="request body")
    max_image_bytes: int = Field(4 * 2**20, ge=64, description="one decoded image file")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one image")
    max_image_side: int = Field(8192, ge=1, description="longer side of one image")
    max_request_pixels: int = Field(2**25, ge=1, description="width x height summed over one request's images")
    max_key_pixels: int = Field(2**26, ge=1, description="width x height of the images one key has in flight "
                                                         "(decoded or being decoded); over it: 429")
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
    """Every text within ``max_text_chars`` and encodable as UTF-8 (a lone surrogate such as ``"\\ud800"``
    is refused here, 422, instead of failing the model's batch)."""
    for i, t in enumerate(texts):
        if len(t) > limits.max_text_chars:
            raise over("max_text_chars", len(t), limits.max_text_chars, f"{what}[{i}] length", status=422)
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LimitError(422, "invalid_text", f"{what}[{i}]: not valid Unicode text ({exc.reason} at "
                                                  f"position {exc.start})") from None


PLACEHOLDERS = ("{}", "{label}")


def split_template(template: str, index: int = 0) -> tuple[str, str]:
    """(text before, text after) the one placeholder of a zero-shot template.

    A template holds exactly one ``{}`` or ``{label}`` and no other ``{`` or ``}``: no format
    specs, no fields, no attribute access, no escapes.
    """
    where = f"templates[{index}]"
    found = [(template.find(p), p) for p in PLACEHOLDERS if p in template]
    if not found:
        raise LimitError(422, "invalid_template", f"{where}: needs one placeholder, {{}} or {{label}}, for the class "
                                                  "name")
    pos, ph = min(found)
    before, after = template[:pos], template[pos + len(ph):]
    if any(c in before or c in after for c in "{}"):
        raise LimitError(422, "invalid_template", f"{where}: holds exactly one placeholder, {{}} or {{label}}, and no "
                                                  "other '{' or '}'")
    return before, after


def expand_templates(templates: list[str], labels: list[str], limits: ServeLimits) -> list[str]:
    """Prompts ``label x template`` (label-major), every one checked against ``max_text_chars`` before any is built."""
    parts = [split_template(t, i) for i, t in enumerate(templates)]
    check_batch(len(labels) * len(parts), limits, "prompts (labels x templates)")
    longest_fixed = max(len(b) + len(a) for b, a in parts)
    longest_label = max(len(c) for c in labels)
    if longest_fixed + longest_label > limits.max_text_chars:
        raise over("max_text_chars", longest_fixed + longest_label, limits.max_text_chars,
                   "the longest prompt (template and label)", status=422)
    return [b + c + a for c in labels for b, a in parts]


def _raw_image(data: str, limits: ServeLimits, where: str) -> bytes:
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
    return raw


def _image_limit(exc: ImageTooLarge, limits: ServeLimits, where: str) -> LimitError:
    """413 naming the server's own limit (also when Pillow's global bound refused the header first)."""
    if exc.limit == "max_side":
        return over("max_image_side", exc.value, limits.max_image_side, f"{where} side")
    return over("max_image_pixels", exc.value if exc.value >= 0 else "more than Pillow's bound",
                limits.max_image_pixels, f"{where} pixels")


def probe_images(data: list[str], limits: ServeLimits) -> tuple[list[bytes], list[ImageInfo]]:
    """Every image's bytes and header, checked against the per-image and per-request limits (nothing decoded)."""
    raws, infos = [], []
    for i, d in enumerate(data):
        where = f"images[{i}]"
        raw = _raw_image(d, limits, where)
        try:
            info = probe_image(raw, IMAGE_FORMATS, what=where)
            check_size(info, limits.max_image_pixels, limits.max_image_side, where)
        except ImageTooLarge as exc:
            raise _image_limit(exc, limits, where) from None
        except ImageError as exc:
            raise LimitError(422, "invalid_image", str(exc)) from None
        raws.append(raw)
        infos.append(info)
    total = sum(info.pixels for info in infos)
    if total > limits.max_request_pixels:
        raise over("max_request_pixels", total, limits.max_request_pixels, "pixels of the request's images")
    return raws, infos


def decode_image(raw: bytes | str, limits: ServeLimits, index: int = 0) -> Any:
    """One image (base64 text or its bytes) as an RGB PIL image, within the size and pixel limits."""
    where = f"images[{index}]"
    if isinstance(raw, str):
        raw = _raw_image(raw, limits, where)
    try:
        return open_image(raw, max_pixels=limits.max_image_pixels, max_side=limits.max_image_side,
                          formats=IMAGE_FORMATS, what=where)
    except ImageTooLarge as exc:
        raise _image_limit(exc, limits, where) from None
    except ImageError as exc:
        raise LimitError(422, "invalid_image", str(exc)) from None
