"""Data loading that cannot be pointed elsewhere: paths confined to a dataset's root, and a manifest of digests.

A dataset's annotation files name its images by path. :class:`DatasetGuard` refuses any such path
that leaves the dataset's root: a ``..`` component, an absolute path outside it, or a symbolic
link (of the file or of any folder on the way) that resolves outside it. The refusal is one line,
raised while the dataset is built, before anything under the path is opened.

A dataset may carry a manifest, ``rcc-manifest.json`` in its root, with the sha256 of every file
(``rcc data manifest DIR`` writes one). When it is there, every file the dataset reads (its
annotation files and each image, as it is loaded) must be listed and match its digest; a file
that is not listed or was changed is refused.

Nothing in a data file is executed: annotations are JSON or TSV, images are decoded by
:mod:`~rcc_compression.data.images` from an allow-list of formats (no PostScript/EPS, whose
Pillow plugin runs Ghostscript) with the pixel count checked from the header before decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..utils.io import atomic_write_json

MANIFEST_NAME = "rcc-manifest.json"
MANIFEST_FORMAT = "rcc-dataset-manifest"
MANIFEST_VERSION = 1
#: image formats a dataset may hold (Pillow's names); what the datasets decode, nothing else
DATASET_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
#: the largest image a dataset loader decodes (width x height); larger ones are refused from the header
DATASET_MAX_PIXELS = 8192 * 8192


class PathEscape(DataError):
    """A path named by a data file leaves the dataset's root."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DatasetGuard:
    """Confines paths to ``root`` and checks files against the root's manifest (when it has one).

    ``root`` is resolved once (a root that is itself a link is followed: the user chose it).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(os.path.expanduser(str(root))))
        self.manifest: dict[str, str] | None = None
        self.checked: set[str] = set()
        mfile = self.root / MANIFEST_NAME
        if mfile.is_file():
            self.manifest = read_manifest(mfile)

    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` (relative to the root, or absolute) as a root-relative POSIX name; escapes are refused."""
        text = os.fspath(path)
        parts = Path(text).parts
        if ".." in parts:
            raise PathEscape(f"{text}: a '..' in a dataset path is refused (dataset root {self.root}); nothing read")
        full = Path(text) if Path(text).is_absolute() else self.root / text
        real = Path(os.path.realpath(full))
        try:
            rel = real.relative_to(self.root)
        except ValueError:
            how = "a symbolic link resolves" if os.path.abspath(full) != str(real) else "it lies"
            raise PathEscape(f"{text}: outside the dataset root {self.root} ({how} to {real}); nothing read") from None
        return rel.as_posix()

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """The confined absolute path of ``path`` (see :meth:`relative`)."""
        return self.root / self.relative(path)

    def verify(self, path: str | os.PathLike[str]) -> Path:
        """Confine ``path`` and, with a manifest, check that it is listed and its sha256 matches (once per file)."""
        rel = self.relative(path)
        full = self.root / rel
        if self.manifest is not None and rel not in self.checked:
            want = self.manifest.get(rel)
            if want is None:
                raise DataError(f"{full}: not listed in {self.root / MANIFEST_NAME}; refused")
            try:
                got = _sha256(full)
            except OSError as exc:
                raise DataError(f"{full}: cannot be read ({exc.strerror})") from None
            if got != want:
                raise DataError(f"{full}: sha256 {got[:16]}... does not match the manifest's {want[:16]}...; "
                                "the file changed since the manifest was written")
            self.checked.add(rel)
        return full

    def describe(self) -> dict[str, Any]:
        """For reports: the root, whether a manifest guards it and how many files were checked."""
        return {"root": str(self.root), "manifest": self.manifest is not None, "files_checked": len(self.checked)}


def read_manifest(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{root-relative path: sha256}`` of a manifest file; a malformed one is a one-line error."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a readable manifest ({exc})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict)
            or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items())):
        raise DataError(f"{p}: not an {MANIFEST_FORMAT} file (format, version, files: {{path: sha256}})")
    for name in files:
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise PathEscape(f"{p}: lists {name!r}, outside the dataset root; refused")
    return dict(files)


def iter_files(root: Path) -> Iterable[Path]:
    """Every regular file under ``root`` (not following links out of it), the manifest itself aside."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.name == MANIFEST_NAME and p.parent == root:
                continue
            yield p


def write_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``root/rcc-manifest.json`` with the sha256 of every file under ``root``; returns it.

    A link that leaves the root is refused (the manifest would vouch for a file elsewhere).
    """
    guard = DatasetGuard(root)
    guard.manifest = None
    files = {guard.relative(p): _sha256(p) for p in iter_files(guard.root)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
    atomic_write_json(guard.root / MANIFEST_NAME, manifest)
    return manifest


def manifest_mismatches(root: str | os.PathLike[str], manifest: Mapping[str, str] | None = None) -> dict[str, list]:
    """Files missing, changed or unlisted under ``root`` relative to its manifest (all checked now)."""
    guard = DatasetGuard(root)
    listed = manifest if manifest is not None else (guard.manifest or {})
    present = {guard.relative(p): p for p in iter_files(guard.root)}
    return {"missing": sorted(set(listed) - set(present)),
            "changed": sorted(k for k, p in present.items() if k in listed and _sha256(p) != listed[k]),
            "unlisted": sorted(set(present) - set(listed))}
