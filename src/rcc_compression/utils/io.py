"""Atomic file writes, hashing and safe loading.

Every file rcc-compression writes goes to a temporary name in the same directory, is flushed to
disk, and is then renamed over the target, so a crash never leaves a half-written file under the
final name. Files get the permissions ``open()`` would give them (``0o666`` less the umask) unless
a mode is asked for (encrypted checkpoints ask for ``0o600``). Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

_CHUNK = 1 << 20


def default_mode(directory: bool = False) -> int:
    """The mode a new file (``0o666``) or directory (``0o777``) gets under the process umask."""
    umask = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    if umask is None:  # no procfs: read the umask by setting it (and back)
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0o600; give the file the permissions a plain open() would have
        os.chmod(tmp, mode if mode is not None else default_mode())
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int | None = None) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", mode)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    mode: int | None = None,
) -> None:
    """Save tensors with safetensors atomically (tensors are made contiguous and detached)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, mode) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def load_safetensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file (no code execution possible)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def split_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: each storage once (safetensors refuses shared ones, e.g. tied weights); a tensor
    that shares another's storage, offset and shape is recorded as an alias of the first one's key."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel() > 0:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = t
    return out, aliases


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """A digest of the exact contents (dtype, shape, bytes) of ``tensors``: what memoised roundings are keyed by."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``).

    A file that needs anything else to unpickle (classes, functions: a pickle that would run code)
    is refused with :class:`~rcc_compression.errors.CheckpointError` before any of it runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused: not a plain tensor file ({first[:200]})") from None


# ------------------------------------------------------------------ whole directories
_STALE_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_STALE_DIR = re.compile(r"^\..+\.(partial|old)-[A-Za-z0-9_]{8}$")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield an empty staging directory next to ``path``; on success it replaces ``path`` whole.

    The staging directory (``.NAME.partial-XXXXXXXX``) is renamed into place only after the body
    finished, so ``path`` holds either the old directory or the complete new one; an error removes
    the staging directory and leaves ``path`` untouched. An existing ``path`` is moved aside and
    deleted after the rename (the caller decides whether replacing it is allowed).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(staging, mode if mode is not None else default_mode(directory=True))
        yield staging
        replace_directory(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` directory to ``target``; an existing ``target`` is moved aside first and
    deleted after the rename (``target`` holds the old directory or the new one at every moment)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside)  # aside is an empty directory: rename may replace it
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, target)


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete what interrupted atomic writes left under ``directory``; returns what was removed.

    These are ``.NAME.XXXXXXXX.tmp`` files (:func:`atomic_path`) and ``.NAME.partial-*`` /
    ``.NAME.old-*`` directories (:func:`atomic_dir`). Only call it while no other process writes
    there (a run holds :func:`directory_lock`).
    """
    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for here, dirs, files in os.walk(root):
        for d in list(dirs):
            if _STALE_DIR.match(d):
                shutil.rmtree(Path(here) / d, ignore_errors=True)
                removed.append(Path(here) / d)
                dirs.remove(d)
        for f in files:
            if _STALE_FILE.match(f):
                with contextlib.suppress(FileNotFoundError):
                    (Path(here) / f).unlink()
                removed.append(Path(here) / f)
    return sorted(removed)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (file ``.lock``) for the body, or raise at once.

    Two processes writing one run directory would interleave checkpoints; the second one gets a
    :class:`~rcc_compression.errors.CheckpointError`. The kernel drops the lock when the process
    dies, so a killed run never leaves its directory locked.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ident = root.resolve()
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        fcntl = None
    if fcntl is None or ident in _HELD_LOCKS:  # re-entrant within this process
        _HELD_LOCKS[ident] = _HELD_LOCKS.get(ident, 0) + 1
        try:
            yield
        finally:
            _HELD_LOCKS[ident] -= 1
            if not _HELD_LOCKS[ident]:
                del _HELD_LOCKS[ident]
        return
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CheckpointError(f"{root}: in use by another rcc process (pid {holder}); wait for it to finish"
                                  ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD_LOCKS[ident] = 1
        try:
            yield
        finally:
            del _HELD_LOCKS[ident]
    finally:
        os.close(fd)


_HELD_LOCKS: dict[Path, int] = {}
