"""Walking a model's block stacks in execution order with calibration streams: what both sequential passes share.

A pass (the planning survey, the compression) carries named *streams* through the stacks: per
batch, the hidden states entering the current block (``fit_dense``: the dense model's on the
calibration batches, ``hold_comp``: the compressed model's on the held-out ones, ...). A stack's
first inputs are caught by running the model with every block stood in for (:class:`.blocks.RelayHub`):
stacks already walked replay their last output from the stream's *finals*, so a stack that reads
another (a decoder cross-attending to an image tower) sees that tower as the stream computed it.
The hidden states live in a :class:`.streams.Boundary` (a bounded buffer, files beyond it or in a
run directory); the other arguments of the blocks (attention masks and the like) are caught again
when a run resumes, and kept in memory (they do not grow with depth).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CompressionError
from .blocks import RelayHub, Stack, block_signature, hidden_key, hidden_output
from .calibration import to_device
from .streams import Boundary


class Walk:
    """The stacks of ``model`` and the streams one pass carries through them.

    ``streams``: stream name -> the batches it starts from (model inputs); ``root``: the run's
    directory for this pass (``None``: streams in memory up to ``buffer_bytes``, temporary files past it).
    """

    def __init__(self, model: nn.Module, stacks: Sequence[Stack], streams: Mapping[str, Sequence[Mapping[str, Any]]],
                 device: torch.device, root: Path | None = None, buffer_bytes: int = 1 << 28) -> None:
        self.model = model
        self.stacks = list(stacks)
        self.inputs = {k: list(v) for k, v in streams.items() if v}
        self.device = device
        self.root = root
        self.buffer_bytes = buffer_bytes
        self.signatures: dict[str, inspect.Signature] = {
            s.name: block_signature(model.get_submodule(s.blocks[0])) for s in self.stacks}
        self.keys = {name: hidden_key(sig) for name, sig in self.signatures.items()}
        self.hub = RelayHub(self.stacks)
        self.boundary = Boundary(root / "boundary" if root is not None else None, buffer_bytes)
        self.finals: dict[str, Boundary] = {}
        #: per stream, the other arguments of the current stack's blocks, per batch
        self.consts: dict[str, list[dict[str, Any]]] = {}
        self.done: list[str] = []

    # ---------------------------------------------------------------- stacks
    def stack(self, name: str) -> Stack:
        return next(s for s in self.stacks if s.name == name)

    def _replay(self, stream: str) -> dict[str, Callable[[int], torch.Tensor]]:
        return {name: (lambda j, f=self.finals[name], s=stream: f.get(s, j)) for name in self.done}

    def catch(self, stream: str) -> tuple[str, list[dict[str, Any]]]:
        """Run the model on ``stream``'s batches until the first block of a stack not walked yet; returns that
        stack and each batch's call of its first block (keyword arguments)."""
        self.hub.catch = {s.name for s in self.stacks if s.name not in self.done}
        self.hub.replay = self._replay(stream)
        try:
            with self.hub.installed(self.model, self.signatures):
                caught = self.hub.run(self.model, self.inputs[stream], self.device)
        finally:
            self.hub.catch, self.hub.replay = set(), {}
        names = {c[0] for c in caught}
        if len(names) != 1:
            raise CompressionError(f"calibration batches reach different stacks first ({sorted(names)}); the "
                                   "sequential pipeline needs every batch to run the same way")
        return caught[0][0], [c[1] for c in caught]

    def begin_stack(self, fresh: bool) -> Stack:
        """Catch the next stack's inputs on every stream: its blocks' other arguments always, and with ``fresh``
        (not resumed inside it) its first hidden states into the boundary. Returns the stack."""
        if not self.inputs:  # no calibration data: the stacks in module order, nothing caught
            return next(s for s in self.stacks if s.name not in self.done)
        found = None
        for stream in self.inputs:
            name, calls = self.catch(stream)
            if found is not None and name != found:
                raise CompressionError(f"stream {stream} reaches stack {name} where another reaches {found}")
            found = name
            key = self.keys[name]
            self.consts[stream] = [{k: v for k, v in c.items() if k != key} for c in calls]
            if fresh:
                self.boundary.set_now(stream, [c[key].detach() for c in calls])
        assert found is not None
        return self.stack(found)

    def end_stack(self, stack: Stack) -> None:
        """The stack is walked: its streams' last outputs become its finals (replayed from now on)."""
        root = self.root / "finals" / f"{self.stacks.index(stack):03d}" if self.root is not None else None
        finals = Boundary(root, self.buffer_bytes)
        for stream in self.inputs:
            finals.set_now(stream, self.boundary.all(stream))
        self.finals[stack.name] = finals
        self.done.append(stack.name)

    def reopen_finals(self, done: Sequence[str]) -> None:
        """A resumed run: the finals of the stacks it had walked, read back from its directory."""
        for name in done:
            stack = self.stack(name)
            if self.root is None:
                raise CompressionError("cannot resume without a run directory")
            finals = Boundary(self.root / "finals" / f"{self.stacks.index(stack):03d}", self.buffer_bytes)
            finals.reopen(0)
            self.finals[name] = finals
            self.done.append(name)

    # ---------------------------------------------------------------- blocks
    def batches(self, stack: Stack, stream: str, hidden: Sequence[torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """The current block's inputs on ``stream`` (``hidden``: other hidden states with the same arguments)."""
        key = self.keys[stack.name]
        hidden = self.boundary.all(stream) if hidden is None else hidden
        return [{key: h, **c} for h, c in zip(hidden, self.consts[stream], strict=True)]

    def note_output_kind(self, stack: Stack, block: nn.Module, batch: Mapping[str, Any], device: torch.device) -> None:
        """Whether the stack's blocks return tuples (their stand-ins return the same kind)."""
        if stack.name not in self.hub.tuples:
            with torch.no_grad():
                self.hub.tuples[stack.name] = isinstance(block(**to_device(batch, device)), (tuple, list))

    @torch.no_grad()
    def outputs(self, stream: str) -> list[Any]:
        """The whole model's outputs on ``stream``'s batches, every stack replayed from its finals."""
        self.hub.replay = self._replay(stream)
        try:
            with self.hub.installed(self.model, self.signatures):
                return self.hub.run(self.model, self.inputs[stream], self.device, outputs=True)
        finally:
            self.hub.replay = {}


@torch.no_grad()
def block_forward(module: nn.Module, batches: Sequence[Mapping[str, Any]], device: torch.device
                  ) -> list[torch.Tensor]:
    """A block's (or a :class:`.blocks.BlockView`'s) hidden-state outputs on each batch."""
    was = module.training
    module.eval()
    try:
        out = []
        for b in batches:
            res = module(**to_device(b, device))
            out.append((res["hidden_states"] if isinstance(res, dict) else hidden_output(res)).detach())
        return out
    finally:
        module.train(was)


__all__ = ["Walk", "block_forward"]
