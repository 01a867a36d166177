"""Calibration activations between two blocks: a bounded buffer in memory, files beyond it.

A stream is one sequence of per-batch hidden states flowing through a stack (the dense model's on
the calibration batches, the compressed model's on the held-out ones, ...). The sequential pipeline
reads a stream at one block boundary and writes it at the next; :class:`Boundary` holds both.

Resident tensors are bounded by ``max_bytes`` over both boundaries; past it each tensor goes to a
file. With a ``directory`` (a run's own, for resuming) every tensor is a file,
``<directory>/<boundary>/<stream>-<batch>.safetensors``, each written atomically, so the boundary a
run's progress file names is complete and a resumed run reads it back; older boundaries are deleted
once the progress file has moved past them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..utils.io import atomic_save_safetensors, load_safetensors

_NAME = re.compile(r"^(?P<stream>[a-z0-9_]+)-(?P<batch>\d{5})\.safetensors$")


class Boundary:
    """The streams at the current block boundary (read) and at the next one (written); see the module docstring.

    ``directory``: where the files go (``None``: a private temporary directory, made when the buffer
    first overflows and removed with the object).
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, max_bytes: int = 1 << 28,
                 index: int = 0) -> None:
        self.persistent = directory is not None
        self.root = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.index = index
        self._now: dict[str, dict[int, torch.Tensor | Path]] = {}
        self._next: dict[str, dict[int, torch.Tensor | Path]] = {}
        self._resident = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- where tensors go
    def _dir(self, index: int) -> Path:
        if self.root is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="rcc-streams-")
            return Path(self._tmp.name) / f"{index:05d}"
        return self.root / f"{index:05d}"

    def _store(self, index: int, stream: str, j: int, tensor: torch.Tensor) -> torch.Tensor | Path:
        size = tensor.numel() * tensor.element_size()
        if not self.persistent and self._resident + size <= self.max_bytes:
            self._resident += size
            return tensor.detach()
        path = self._dir(index) / f"{stream}-{j:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_save_safetensors({"t": tensor}, path)
        except OSError as exc:
            raise CheckpointError(f"{path}: could not write calibration activations ({exc.strerror or exc}); free "
                                  "space or point the run elsewhere") from exc
        return path

    @staticmethod
    def _read(held: torch.Tensor | Path) -> torch.Tensor:
        return held if isinstance(held, torch.Tensor) else load_safetensors(held)["t"]

    # ---------------------------------------------------------------- streams
    def put(self, stream: str, j: int, tensor: torch.Tensor) -> None:
        """Batch ``j`` of ``stream`` at the next boundary."""
        self._next.setdefault(stream, {})[j] = self._store(self.index + 1, stream, j, tensor)

    def set_now(self, stream: str, tensors: list[torch.Tensor]) -> None:
        """``stream`` at the current boundary (the inputs of a stack's first block, as caught)."""
        self._drop(self._now.pop(stream, {}))
        self._now[stream] = {j: self._store(self.index, stream, j, t) for j, t in enumerate(tensors)}

    def get(self, stream: str, j: int) -> torch.Tensor:
        """Batch ``j`` of ``stream`` at the current boundary."""
        return self._read(self._now[stream][j])

    def all(self, stream: str) -> list[torch.Tensor]:
        """Every batch of ``stream`` at the current boundary, in order."""
        held = self._now.get(stream, {})
        return [self._read(held[j]) for j in sorted(held)]

    def streams(self) -> list[str]:
        return sorted(self._now)

    def has(self, stream: str) -> bool:
        return stream in self._now

    def advance(self) -> None:
        """The next boundary becomes the current one; the old one's tensors and files go."""
        for held in self._now.values():
            self._drop(held)
        self._now, self._next = self._next, {}
        if self.root is not None or self._tmp is not None:
            shutil.rmtree(self._dir(self.index), ignore_errors=True)
        self.index += 1

    def _drop(self, held: dict[int, torch.Tensor | Path]) -> None:
        for v in held.values():
            if isinstance(v, torch.Tensor):
                self._resident -= v.numel() * v.element_size()

    # ---------------------------------------------------------------- resume
    def reopen(self, index: int) -> None:
        """Read boundary ``index`` back from the directory (a resumed run); every other boundary is removed."""
        if self.root is None:
            raise CheckpointError("no directory to resume calibration activations from")
        self.index = index
        here = self._dir(index)
        if not here.is_dir():
            raise CheckpointError(f"{here}: the calibration activations of the boundary the run stopped at are "
                                  "missing; start the run again")
        self._now, self._next = {}, {}
        for f in sorted(here.iterdir()):
            m = _NAME.match(f.name)
            if m:
                self._now.setdefault(m["stream"], {})[int(m["batch"])] = f
        for other in self.root.iterdir():
            if other.is_dir() and other != here:
                shutil.rmtree(other, ignore_errors=True)


class History:
    """Per block and batch, a tensor kept for a later pass (every block's inputs, for a reverse sweep): resident up
    to ``max_bytes``, files past it (under ``directory``, or a private temporary directory)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, max_bytes: int = 1 << 28) -> None:
        self.root = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self._held: dict[tuple[int, int], torch.Tensor | Path] = {}
        self._resident = 0
        self._tmp: tempfile.TemporaryDirectory | None = None

    def put(self, index: int, j: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self._resident + size <= self.max_bytes:
            self._held[(index, j)] = tensor.cpu()
            self._resident += size
            return
        if self.root is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rcc-history-")
        root = self.root if self.root is not None else Path(self._tmp.name)
        path = root / f"{index:05d}" / f"t-{j:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_save_safetensors({"t": tensor}, path)
        except OSError as exc:
            raise CheckpointError(f"{path}: could not write calibration activations ({exc.strerror or exc})") from exc
        self._held[(index, j)] = path

    def get(self, index: int, j: int) -> torch.Tensor:
        held = self._held[(index, j)]
        return held if isinstance(held, torch.Tensor) else load_safetensors(held)["t"]


__all__ = ["Boundary", "History"]
