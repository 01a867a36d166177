"""Opening images with a bound on what decoding them costs, checked from the header before any pixel is decoded.

A small compressed file can declare a huge image (a 2.8 KB PNG decodes to 4096 x 4096 x 3 bytes):
what decoding costs is the declared width x height, not the file size. :func:`probe_image` reads
only the header (size, mode, format); :func:`open_image` refuses an image over ``max_pixels`` or
``max_side`` with :class:`ImageTooLarge` before decoding it, then decodes it whole (a truncated
file fails here, not later) and converts it. Pillow's own global ``Image.MAX_IMAGE_PIXELS`` check
stays in force as a last line; the limits here are per call, so a server and a dataset loader can
each choose theirs.

Sources are a path, ``bytes`` or a binary file object; ``formats`` restricts the decoders Pillow
may try (a server accepts a few common formats, not every plugin Pillow has).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image, ImageMode

from ..errors import DataError

#: the formats a caller that takes images from outside usually allows
COMMON_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
#: the default bound on width x height: 4096 x 4096 (48 MiB as RGB)
DEFAULT_MAX_PIXELS = 4096 * 4096

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


class ImageError(DataError):
    """An image cannot be read: not an image, a format not allowed, truncated or corrupt."""


class ImageTooLarge(ImageError):
    """An image declares more pixels (or a longer side) than allowed; raised before it is decoded.

    ``limit`` names the bound (``max_pixels`` or ``max_side``), ``value`` what the image declares
    and ``maximum`` the bound's value.
    """

    def __init__(self, message: str, limit: str, value: int, maximum: int) -> None:
        super().__init__(message)
        self.limit, self.value, self.maximum = limit, value, maximum


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header declares."""

    width: int
    height: int
    mode: str
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """Bytes Pillow holds for the decoded pixels in the image's own mode (RGB takes 4 a pixel, as RGBA)."""
        try:
            m = ImageMode.getmode(self.mode)
        except KeyError:
            return 4 * self.pixels
        return self.pixels * (4 if len(m.bands) > 1 else int(m.typestr[-1]))


def _name(source: ImageSource) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image data"


def _open(fp: Any, formats: tuple[str, ...] | list[str] | None, what: str) -> Any:
    """A lazily opened PIL image (header parsed, no pixels decoded) on the binary file ``fp``."""
    try:
        return Image.open(fp, formats=list(formats) if formats is not None else None)
    except Image.DecompressionBombError as exc:  # over twice Pillow's global MAX_IMAGE_PIXELS
        raise _bomb(exc, what) from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for junk input
        allowed = f" (allowed: {', '.join(formats)})" if formats is not None else ""
        raise ImageError(f"{what}: not a readable image{allowed}") from None


def _bomb(exc: Exception, what: str) -> ImageTooLarge:
    """Pillow's own refusal (over twice ``Image.MAX_IMAGE_PIXELS``) as :class:`ImageTooLarge`."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
    pixels = int(found.group(1)) if found else -1
    return ImageTooLarge(f"{what}: {pixels} pixels exceeds max_pixels={limit} (Pillow's decompression-bomb bound)",
                         "max_pixels", pixels, limit)


@contextlib.contextmanager
def _binary(source: ImageSource, what: str) -> Iterator[Any]:
    """A binary file object over ``source``, closed afterwards when opened here."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below; the decoded image outlives it
        except FileNotFoundError:
            raise ImageError(f"{what}: file not found") from None
        except OSError as exc:
            raise ImageError(f"{what}: cannot be read ({exc.strerror})") from None
        with f:
            yield f
    else:
        yield source


def check_size(info: ImageInfo, max_pixels: int | None, max_side: int | None, what: str) -> None:
    """Raise :class:`ImageTooLarge` when ``info`` declares a side over ``max_side`` or more than ``max_pixels``."""
    side = max(info.width, info.height)
    if max_side is not None and side > max_side:
        raise ImageTooLarge(f"{what}: {info.width} x {info.height}: side {side} exceeds max_side={max_side}",
                            "max_side", side, max_side)
    if max_pixels is not None and info.pixels > max_pixels:
        raise ImageTooLarge(f"{what}: {info.width} x {info.height} = {info.pixels} pixels exceeds "
                            f"max_pixels={max_pixels}", "max_pixels", info.pixels, max_pixels)


def probe_image(source: ImageSource, formats: tuple[str, ...] | list[str] | None = None,
                what: str | None = None) -> ImageInfo:
    """Width, height, mode and format of an image from its header alone (nothing is decoded)."""
    what = what or _name(source)
    with _binary(source, what) as fp:
        img = _open(fp, formats, what)
        return ImageInfo(int(img.width), int(img.height), str(img.mode), str(img.format))


def open_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_side: int | None = None,
               formats: tuple[str, ...] | list[str] | None = None, mode: str | None = "RGB",
               what: str | None = None) -> Any:
    """The image at ``source`` fully decoded (converted to ``mode``; ``None`` keeps its own).

    The declared size is checked against ``max_pixels`` and ``max_side`` before decoding
    (:class:`ImageTooLarge`); unreadable, disallowed, truncated or corrupt data raise
    :class:`ImageError`. ``what`` names the image in messages (default: the path).
    """
    what = what or _name(source)
    with _binary(source, what) as fp:
        img = _open(fp, formats, what)
        check_size(ImageInfo(int(img.width), int(img.height), str(img.mode), str(img.format)),
                   max_pixels, max_side, what)
        try:
            img.load()  # the pixels now live in memory: the image outlives the file
            return img.convert(mode) if mode is not None and img.mode != mode else img
        except Image.DecompressionBombError as exc:
            raise _bomb(exc, what) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"{what}: image data is truncated or corrupt ({str(exc)[:120]})") from None


__all__ = ["COMMON_FORMATS", "DEFAULT_MAX_PIXELS", "ImageError", "ImageInfo", "ImageTooLarge", "check_size",
           "open_image", "probe_image"]
