"""A model as stacks of transformer blocks: find them, run one block as a model of its own, stand in for blocks.

A transformer tower is an embedding, a stack of blocks (an ``nn.ModuleList`` of modules of one
class, each called as ``block(hidden_states, *args, **kwargs)`` and returning the next hidden
states, alone or first in a tuple) and a head. The sequential pipeline works one block at a time:

* :func:`find_stacks`: the stacks holding the layers to compress, in module order;
* :class:`BlockView`: one block as a model whose module names are the block's names in the whole
  model (``vision_model.encoder.layers.3.mlp.fc1``), called as ``view(**inputs)`` with the block's
  own arguments and returning ``{"hidden_states": ...}``, so stages, statistics and distillation
  work on it as on any model;
* :class:`RelayHub`: every block replaced by a stand-in while the rest of the model runs. The first
  block of a stack not done yet *catches* its inputs (the hidden states and the other arguments,
  attention masks and the like; the forward pass stops there: :class:`StopForward`); a finished
  stack *replays* its last block's output for the batch being run (the rest of its blocks pass the
  hidden states on), so the parts after it (a head, another tower that reads it) see what the
  finished stack computed, without any of its blocks resident.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CompressionError
from ..utils.io import tensor_digest
from .calibration import to_device


class StopForward(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a catching stand-in: the inputs it needed are recorded, the rest of the forward pass is not."""


@dataclass(frozen=True)
class Stack:
    """One stack of transformer blocks: ``name`` (the ``ModuleList``), ``blocks`` (full names, in order)."""

    name: str
    blocks: tuple[str, ...]


def find_stacks(model: nn.Module, layer_names: Sequence[str]) -> list[Stack]:
    """The block stacks holding any of ``layer_names``, in module order: each outermost ``nn.ModuleList`` whose
    children are all of one class (a ``ModuleList`` inside a found stack is part of its blocks)."""
    stacks: list[Stack] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not len(mod) or any(name.startswith(f"{s.name}.") for s in stacks):
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        blocks = tuple(f"{name}.{i}" if name else str(i) for i in range(len(mod)))
        if any(n.startswith(f"{b}.") for b in blocks for n in layer_names):
            stacks.append(Stack(name, blocks))
    return stacks


def block_of(name: str, stacks: Sequence[Stack]) -> str | None:
    """The block that module ``name`` belongs to, or ``None`` (outside every stack)."""
    for s in stacks:
        if name.startswith(f"{s.name}."):
            index = name[len(s.name) + 1:].split(".", 1)[0]
            return f"{s.name}.{index}"
    return None


def hidden_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned (alone, or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def bind_call(signature: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A block's call as keyword arguments (``**kwargs`` merged in), so it can be repeated as ``block(**inputs)``."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise CompressionError(f"a block was called in a way its signature does not take ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise CompressionError("a block was called with extra positional arguments; they cannot be replayed")
        else:
            out[key] = value
    return out


def block_signature(block: nn.Module) -> inspect.Signature:
    """The signature of ``block.forward`` (without ``self``)."""
    return inspect.signature(block.forward)


def hidden_key(signature: inspect.Signature) -> str:
    """The name of the argument that carries the hidden states (the first one)."""
    first = next(iter(signature.parameters.values()), None)
    if first is None or first.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise CompressionError("a block's forward takes no hidden-states argument first; it cannot be run alone")
    return first.name


class BlockView(nn.Module):
    """One block as a model: its modules keep their names in the whole model; ``view(**inputs)`` runs it.

    Returns ``{"hidden_states": ...}``: the outputs statistics, the gate's errors and distillation compare.
    """

    def __init__(self, path: str, block: nn.Module) -> None:
        super().__init__()
        node: nn.Module = self
        parts = path.split(".")
        for part in parts[:-1]:
            child = nn.Module()
            node.add_module(part, child)
            node = child
        node.add_module(parts[-1], block)
        self.path = path

    @property
    def block(self) -> nn.Module:
        return self.get_submodule(self.path)

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        return {"hidden_states": hidden_output(self.block(**inputs))}


class _StandIn(nn.Module):
    """What a block is while the hub runs the model (see :class:`RelayHub`)."""

    def __init__(self, hub: RelayHub, stack: str, index: int, signature: inspect.Signature) -> None:
        super().__init__()
        self.hub, self.stack, self.index, self.signature = hub, stack, index, signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.hub.call(self, args, kwargs)


class RelayHub:
    """Runs a model with every block of ``stacks`` stood in for (the module docstring says how).

    ``catch``: the stacks whose first block records its call and stops the pass; ``replay``: per finished
    stack, ``batch index -> its last block's output``; ``tuples``: the stacks whose blocks return tuples.
    """

    def __init__(self, stacks: Sequence[Stack]) -> None:
        self.stacks = list(stacks)
        self.catch: set[str] = set()
        self.replay: dict[str, Callable[[int], torch.Tensor]] = {}
        self.tuples: dict[str, bool] = {}
        self.batch = 0
        self.caught: tuple[str, dict[str, Any]] | None = None

    def call(self, stand: _StandIn, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if stand.index == 0 and stand.stack in self.catch:
            self.caught = (stand.stack, bind_call(stand.signature, args, kwargs))
            raise StopForward
        hidden = args[0] if args else kwargs[hidden_key(stand.signature)]
        if stand.index == 0 and stand.stack in self.replay:
            hidden = self.replay[stand.stack](self.batch).to(hidden.device, hidden.dtype)
        return (hidden,) if self.tuples.get(stand.stack) else hidden

    @contextlib.contextmanager
    def installed(self, model: nn.Module, signatures: Mapping[str, inspect.Signature]) -> Iterator[None]:
        """Stand-ins in place of every block of the stacks for the duration; the blocks put back after."""
        saved: list[tuple[nn.ModuleList, int, nn.Module]] = []
        try:
            for s in self.stacks:
                holder = model.get_submodule(s.name)
                for i in range(len(holder)):
                    saved.append((holder, i, holder[i]))
                    holder[i] = _StandIn(self, s.name, i, signatures[s.name])
            yield
        finally:
            for holder, i, block in saved:
                holder[i] = block

    @torch.no_grad()
    def run(self, model: nn.Module, batches: Sequence[Mapping[str, Any]], device: torch.device,
            outputs: bool = False) -> list[Any]:
        """Run ``model`` on each batch; returns what was caught per batch (``(stack, call)``), or with
        ``outputs`` the model's outputs. A catching pass that reaches no catching block raises."""
        found: list[Any] = []
        for j, batch in enumerate(batches):
            self.batch, self.caught = j, None
            try:
                out = model(**to_device(batch, device))
            except StopForward:
                found.append(self.caught)
                continue
            if self.catch:
                raise CompressionError(f"the calibration batches never reached the blocks of {sorted(self.catch)}; "
                                       "the sequential pipeline needs a forward pass that runs every stack")
            found.append(out if outputs else None)
        return found



# ------------------------------------------------------------------------------------ block memo
_Key = tuple[Any, ...]
_UNKEYED = object()


def _call_key(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _Key | None:
    """A key of a block's call by the exact contents of its arguments; ``None`` for arguments it cannot key
    (a cache object, a module): such a call always runs."""

    def key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tensor_digest(value))
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (tuple, list)):
            inner = [key(v) for v in value]
            return _UNKEYED if any(k is _UNKEYED for k in inner) else (type(value).__name__, *inner)
        return _UNKEYED

    parts = [(name, key(value)) for name, value in [*enumerate(args), *sorted(kwargs.items())]]
    return None if any(k is _UNKEYED for _, k in parts) else tuple(parts)


def _copy_output(out: Any) -> Any | None:
    """A copy of a block's output (a tensor, or a tuple or list of tensors and ``None``), or ``None`` when it
    is of another kind (not remembered)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return type(out)(None if o is None else o.detach().clone() for o in out)
    return None


def _output_bytes(out: Any) -> int:
    items = out if isinstance(out, (tuple, list)) else [out]
    return sum(o.numel() * o.element_size() for o in items if isinstance(o, torch.Tensor))


def _state(block: nn.Module) -> tuple[list[Any], list[int]]:
    """What a block computes with: its modules, parameters and buffers (by identity) and their versions."""
    tensors = [*block.parameters(), *block.buffers()]
    return [*block.modules(), *tensors], [t._version for t in tensors]


def _hooked(block: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules())


class BlockMemo:
    """Block outputs remembered by their exact inputs, for inference passes that change a few layers.

    Planning runs the same calibration batches through the model many times, each time with one
    layer or a few changed (a probe, the prefix compressed so far). A block none of whose modules
    changed (same modules, parameters and buffers, unmodified) that receives exactly the inputs it
    received before returns what it returned then, without running: the blocks before a changed
    layer cost nothing. A block runs for real whenever it has a hook (statistics are being read
    inside it), autograd or training mode is on, or its arguments cannot be keyed; the result is then
    remembered, replacing the one for the same inputs; a block holds at most ``slots`` (the number of
    batches the passes run), its oldest forgotten first (the passes go through the layers in execution
    order: the blocks after a changed layer see inputs that will not come again), and all together at
    most ``max_bytes``. Inputs are keyed by a digest of their bytes
    (:func:`~rcc_compression.utils.io.tensor_digest`), so only outputs are held.
    """

    def __init__(self, model: nn.Module, stacks: Sequence[Stack], slots: int = 1, max_bytes: int = 1 << 28) -> None:
        self.blocks = [model.get_submodule(b) for s in stacks for b in s.blocks]
        self.slots, self.max_bytes, self.held = slots, max_bytes, 0
        self.entries: dict[int, dict[_Key, tuple[list[Any], list[int], Any]]] = {}
        self.hits = self.runs = 0

    def _forward(self, block: nn.Module, run: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: Mapping[str, Any]) -> Any:
        if torch.is_grad_enabled() or block.training or _hooked(block):
            return run(*args, **kwargs)
        key = _call_key(args, kwargs)
        if key is None:
            return run(*args, **kwargs)
        held = self.entries.setdefault(id(block), {})
        objects, versions = _state(block)
        found = held.get(key)
        if found is not None and len(found[0]) == len(objects) and all(
                a is b for a, b in zip(found[0], objects, strict=True)) and found[1] == versions:
            self.hits += 1
            return _copy_output(found[2])
        self.runs += 1
        out = run(*args, **kwargs)
        if found is not None:
            held.pop(key)
            self.held -= _output_bytes(found[2])
        while held and len(held) >= self.slots:  # dicts keep insertion order: the oldest first
            self.held -= _output_bytes(held.pop(next(iter(held)))[2])
        size = _output_bytes(out)
        if self.slots > 0 and self.held + size <= self.max_bytes:
            kept = _copy_output(out)
            if kept is not None:
                held[key] = (objects, versions, kept)
                self.held += size
        return out

    @contextlib.contextmanager
    def active(self) -> Iterator[BlockMemo]:
        """The memo in force for the duration (each block's ``forward`` routed through it); remembered
        outputs persist from one activation to the next."""
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for block in self.blocks:
                run = block.forward
                patched.append((block, block.__dict__.get("forward")))

                def forward(*args: Any, _block: nn.Module = block, _run: Callable[..., Any] = run,
                            **kwargs: Any) -> Any:
                    return self._forward(_block, _run, args, kwargs)

                block.forward = forward
            yield self
        finally:
            for block, own in patched:
                if own is None:
                    del block.forward
                else:
                    block.forward = own

    def clear(self) -> None:
        """Forget every remembered output."""
        self.entries.clear()
        self.held = 0


__all__ = ["BlockMemo", "BlockView", "RelayHub", "Stack", "StopForward", "bind_call", "block_of", "block_signature",
           "find_stacks", "hidden_key", "hidden_output"]
