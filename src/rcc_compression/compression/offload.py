"""Tensors a compression needs rarely, kept in files instead of memory: the teacher's weights, rollback copies.

A cascade holds three models' worth of weights if it keeps them all resident: the layers being
compressed, the frozen dense teacher (the targets, and the outputs the gate compares with) and
rollback copies of earlier steps. The last two are read a few times per step, so with
``cascade.offload: disk`` they live in files of a private temporary directory and are read back
(from the page cache, which is not the process's memory) when used. ``memory`` keeps them
resident, as plain tensors.

Files are written once and never changed; each is deleted when nothing refers to its handle any
more, and the directory when its store goes. A killed process cleans up nothing: the next store made
in the same place removes the directories of processes that no longer run. Reads use ``readinto``
into a fresh tensor, not a memory map, so a read tensor is the only resident copy and it is freed
with its last reference.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressionError
from ..utils.runs import pid_alive
from .layers import CompressedLinear

OFFLOAD_MODES = ("disk", "memory")


#: offload directories are named ``rcc-offload-<pid>-<random>``: the pid tells whether their process still runs
PREFIX = "rcc-offload-"


def remove_orphans(root: Path) -> list[Path]:
    """Remove this user's offload directories under ``root`` whose process is gone (killed: no clean-up ran)."""
    removed = []
    for path in root.glob(f"{PREFIX}*-*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid() or pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class StoredTensor:
    """A handle to one tensor written to a file; :meth:`load` reads it back onto its device."""

    __slots__ = ("path", "shape", "dtype", "device", "_store", "__weakref__")

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 store: TensorStore) -> None:
        self.path, self.shape, self.dtype, self.device = path, shape, dtype, device
        self._store = store  # the directory lives as long as any handle in it
        weakref.finalize(self, _unlink, str(path))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def load(self, device: torch.device | None = None) -> torch.Tensor:
        """A new tensor with the stored values (on ``device``, default: the device it was stored from)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if out.numel():
            raw = out.reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as fh:
                got = fh.readinto(memoryview(raw))
            if got != raw.nbytes:
                raise CompressionError(f"{self.path}: offloaded tensor truncated ({got} of {raw.nbytes} bytes); "
                                       "the offload directory was changed during the run")
        target = device if device is not None else self.device
        return out if target.type == "cpu" else out.to(target)

    def __deepcopy__(self, memo: dict[int, Any]) -> StoredTensor:
        return self  # immutable: copies share the file

    def __repr__(self) -> str:
        return f"StoredTensor({tuple(self.shape)}, {self.dtype}, {self.path.name})"


class ResidentTensor:
    """The ``memory`` counterpart of :class:`StoredTensor`: holds the tensor itself."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def load(self, device: torch.device | None = None) -> torch.Tensor:
        return self.tensor if device is None else self.tensor.to(device)

    def __deepcopy__(self, memo: dict[int, Any]) -> ResidentTensor:
        return self


Handle = StoredTensor | ResidentTensor


class TensorStore:
    """Where a run keeps tensors it reads rarely: files in a private directory (``disk``) or memory.

    ``root``: the directory to create the private directory in (default: the system's temporary
    directory, ``TMPDIR``). The private directory is removed once the store and all its handles are gone.
    """

    def __init__(self, mode: str = "disk", root: str | Path | None = None) -> None:
        if mode not in OFFLOAD_MODES:
            raise CompressionError(f"offload mode {mode!r}; allowed: {', '.join(OFFLOAD_MODES)}")
        self.mode = mode
        self.dir: Path | None = None
        self._count = itertools.count()
        if mode == "disk":
            try:
                if root is not None:
                    Path(root).mkdir(parents=True, exist_ok=True)
                remove_orphans(Path(root or tempfile.gettempdir()))
                self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
            except OSError as exc:
                raise CompressionError(f"cannot create an offload directory in {root or tempfile.gettempdir()}: "
                                       f"{exc.strerror or exc}; set compression.cascade.offload_dir or "
                                       "compression.cascade.offload: memory") from exc
            weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def put(self, tensor: torch.Tensor) -> Handle:
        """Keep a copy of ``tensor`` (detached); later changes to ``tensor`` do not reach it."""
        t = tensor.detach()
        if self.dir is None:
            return ResidentTensor(t.clone())
        path = self.dir / f"{next(self._count):07d}.bin"
        data = t.contiguous().cpu()
        try:
            with open(path, "wb") as fh:
                if data.numel():
                    fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            _unlink(str(path))
            raise CompressionError(f"{path}: could not write an offloaded tensor ({exc.strerror or exc}); free "
                                   "space, set compression.cascade.offload_dir elsewhere, or "
                                   "compression.cascade.offload: memory") from exc
        return StoredTensor(path, tuple(t.shape), t.dtype, t.device, self)


class OffloadedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives in a :class:`TensorStore`; ``weight`` reads it on each use.

    It is what the dense teacher's Linear layers become: forward passes and ``.weight`` give
    exactly the dense values, while only the bias stays resident.
    """

    def __init__(self, weight: Handle, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self._stored = weight
        self._device = weight.device
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._stored.load(self._device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        probe = fn(torch.empty(0, dtype=self._stored.dtype, device=self._device))
        if probe.dtype != self._stored.dtype:
            raise CompressionError("the offloaded teacher keeps its dtype; cast the model before compressing it")
        self._device = probe.device
        return super()._apply(fn, recurse)

    def materialize(self) -> nn.Linear:
        """A plain resident ``nn.Linear`` with the same weight and bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self._device, dtype=self._stored.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)


class StoredTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping of names to stored tensors; each lookup reads its tensor back."""

    def __init__(self, handles: Mapping[str, Handle]) -> None:
        self._handles = dict(handles)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)


class TeacherWeights(Mapping[str, torch.Tensor]):
    """The teacher's weight of each named layer, read when looked up (a file read for an offloaded layer)."""

    def __init__(self, teacher: nn.Module, names: Iterable[str]) -> None:
        self._teacher, self._names = teacher, dict.fromkeys(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        mod = self._teacher.get_submodule(name)
        return mod.weight if isinstance(mod, nn.Linear) else mod.effective_weight()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def teacher_copy(model: nn.Module, store: TensorStore | None = None) -> nn.Module:
    """The frozen dense teacher of ``model``: its Linear layers copied (into ``store`` when given, as
    :class:`OffloadedLinear`), every other parameter and buffer shared with ``model``.

    Sharing is safe because no stage changes anything but the Linear layers it compresses.
    """
    memo: dict[int, Any] = {}
    for mod in model.modules():
        if isinstance(mod, CompressedLinear):
            continue
        if isinstance(mod, nn.Linear) and store is not None and not isinstance(mod, OffloadedLinear):
            bias = None if mod.bias is None else mod.bias.detach().clone()
            off = OffloadedLinear(store.put(mod.weight), bias).train(mod.training)
            for hooks in ("_forward_hooks", "_forward_pre_hooks"):  # what a deep copy would carry over
                getattr(off, hooks).update(getattr(mod, hooks))
            memo[id(mod)] = off
            continue
        if isinstance(mod, nn.Linear):
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            memo[id(t)] = t
    shared = {k for k, v in memo.items() if isinstance(v, torch.Tensor)}
    teacher = copy.deepcopy(model, memo=memo)
    for p in teacher.parameters():
        if id(p) not in shared:
            p.requires_grad_(False)
    return teacher.eval()


def materialize(model: nn.Module) -> nn.Module:
    """Replace every :class:`OffloadedLinear` in ``model`` by a resident ``nn.Linear`` (in place); returns it."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, OffloadedLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.materialize())
    return model


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["OFFLOAD_MODES", "PREFIX", "OffloadedLinear", "ResidentTensor", "StoredTensor", "StoredTensors",
           "TeacherWeights", "TensorStore", "materialize", "remove_orphans", "teacher_copy"]
