"""Output sensitivity of every layer, streamed a block at a time: the planner's output-gradient weights at scale.

:func:`~.calibration.output_sensitivity` weighs each output channel of each layer by how much the
model's outputs move per unit of error there (Hutchinson's estimate of the Gauss-Newton diagonal:
``f[c] = E_v ||(J^T v)_c||^2 / (T E_out)``), with one backward pass through the whole model. Here
the same quantity is computed with one block resident at a time:

1. a forward sweep keeps every block's dense inputs (per batch; a bounded buffer, files beyond);
2. the model's head is run on each stack's last output (stacks replayed, :class:`.blocks.RelayHub`)
   and the Gaussian probes ``v`` are drawn exactly as the whole computation draws them (batch by
   batch, probe by probe, output by output), giving the gradient at each stack's last output;
3. a reverse sweep reads the blocks from the last to the first, runs each on its kept inputs and
   carries the gradient back through it, adding each layer's ``||(J^T v)_c||^2`` on the way.

The result equals the whole model's up to floating-point rounding. A stack whose inputs depend on
another stack's output (a decoder cross-attending to an image tower) would need the gradient
carried into those inputs too; for such a model the result is ``None`` and the planner weighs each
layer by its own output error, as the whole planner does where the model cannot be differentiated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.logging import get_logger
from ..utils.memory import release_memory
from .blocks import Stack, hidden_output
from .calibration import PRIMARY_OUTPUTS, flatten_outputs, to_device
from .placement import CheckpointSource, ResidentSource
from .streams import History
from .walk import Walk, block_forward

log = get_logger("streamsens")


class StreamedSensitivity:
    """One forward and one reverse sweep over the blocks (see the module docstring); :meth:`run` returns
    ``{layer: per-output-channel weight}`` or ``None``."""

    def __init__(self, source: CheckpointSource | ResidentSource, stacks: Sequence[Stack], names: Sequence[str],
                 batches: Sequence[Mapping[str, Any]], device: torch.device, devices: Mapping[str, torch.device],
                 root: Path | None = None, buffer_bytes: int = 1 << 28, seed: int = 0, probes: int = 1,
                 report: Any = None) -> None:
        self.source, self.names, self.device, self.devices = source, list(names), device, devices
        self.walk = Walk(source.model, stacks, {"fit": list(batches)}, device,
                         root / "walk" if root is not None else None, buffer_bytes)
        self.history = History(root / "inputs" if root is not None else None, buffer_bytes)
        self.order: list[Stack] = []
        self.consts: dict[str, list[dict[str, Any]]] = {}
        self.seed, self.probes, self.report = seed, probes, report
        self.total = sum(len(s.blocks) for s in stacks)
        self.fisher: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    # ---------------------------------------------------------------- 1. forward
    def _forward(self) -> bool:
        """Keep every block's dense inputs; ``False`` when a stack reads another stack's output."""
        walk, g = self.walk, 0
        while len(walk.done) < len(walk.stacks):
            stack = walk.begin_stack(fresh=True)
            if _depends(walk.consts["fit"]):
                log.info("stack %s reads another stack's output: output sensitivity is not streamed; the planner "
                         "weighs each layer by its own output error", stack.name)
                return False
            self.order.append(stack)
            self.consts[stack.name] = walk.consts["fit"]
            for name in stack.blocks:
                block = self.source.materialize(name, self.devices[name])
                batches = walk.batches(stack, "fit")
                walk.note_output_kind(stack, block, batches[0], self.devices[name])
                for j, b in enumerate(batches):
                    self.history.put(g, j, b[walk.keys[stack.name]])
                for j, y in enumerate(block_forward(block, batches, self.devices[name])):
                    walk.boundary.put("fit", j, y.cpu())
                walk.boundary.advance()
                del block, batches
                self.source.release(name)
                release_memory()
                g += 1
                self._tick("sensitivity forward", g)
            walk.end_stack(stack)
        return True

    def _tick(self, what: str, done: int) -> None:
        if self.report is not None:
            self.report(f"{what} {done}/{self.total}", done, self.total)

    # ---------------------------------------------------------------- 2. the head
    def _head(self) -> tuple[dict[str, list[list[torch.Tensor]]], float] | None:
        """Per stack, per batch, per probe: the gradient of ``<outputs, v>`` at the stack's last output; and the
        outputs' energy. ``None`` where no output depends on the stacks."""
        walk = self.walk
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        grads: dict[str, list[list[torch.Tensor]]] = {s.name: [] for s in self.order}
        energy = 0.0
        model = self.source.model
        was = model.training
        model.eval()
        try:
            for j, batch in enumerate(walk.inputs["fit"]):
                leaves = {s.name: walk.finals[s.name].get("fit", j).to(self.device).requires_grad_()
                          for s in self.order}
                walk.hub.replay = {name: (lambda _j, t=t: t) for name, t in leaves.items()}
                with torch.enable_grad(), walk.hub.installed(model, walk.signatures):
                    flat = flatten_outputs(model(**to_device(batch, self.device)))
                primary = [k for k in PRIMARY_OUTPUTS if k in flat] or list(flat)
                targets = [flat[k] for k in primary if flat[k].requires_grad]
                if not targets:
                    return None
                energy += sum(float(t.detach().double().pow(2).sum()) for t in targets)
                per_stack: dict[str, list[torch.Tensor]] = {name: [] for name in leaves}
                for p in range(self.probes):
                    vs = [torch.randn(t.shape, generator=g).to(t) for t in targets]
                    got = torch.autograd.grad(targets, list(leaves.values()), vs, retain_graph=p + 1 < self.probes,
                                              allow_unused=True)
                    for name, gr in zip(leaves, got, strict=True):
                        per_stack[name].append(torch.zeros_like(leaves[name]) if gr is None else gr.detach())
                for name in leaves:
                    grads[name].append(per_stack[name])
        finally:
            walk.hub.replay = {}
            model.train(was)
        return grads, energy

    # ---------------------------------------------------------------- 3. reverse
    def _reverse(self, grads: dict[str, list[list[torch.Tensor]]]) -> None:
        g_end = sum(len(s.blocks) for s in self.order)
        done = 0
        for stack in reversed(self.order):
            carried = grads[stack.name]
            g_end -= len(stack.blocks)
            for i in reversed(range(len(stack.blocks))):
                name = stack.blocks[i]
                carried = self._through(name, g_end + i, stack, carried)
                done += 1
                self._tick("sensitivity backward", done)

    def _through(self, name: str, g: int, stack: Stack, carried: list[list[torch.Tensor]]
                 ) -> list[list[torch.Tensor]]:
        """Carry the gradient at block ``name``'s output back to its input, adding its layers' share."""
        device = self.devices[name]
        block = self.source.materialize(name, device)
        local = [n for n in self.names if n.startswith(f"{name}.")]
        outs: dict[str, torch.Tensor] = {}
        hooks = [block.get_submodule(n[len(name) + 1:]).register_forward_hook(
            lambda _m, _a, y, n=n: outs.__setitem__(n, y)) for n in local]
        key = self.walk.keys[stack.name]
        back: list[list[torch.Tensor]] = []
        was = block.training
        block.eval()
        try:
            for j, per_probe in enumerate(carried):
                outs.clear()
                x = self.history.get(g, j).to(device).requires_grad_()
                with torch.enable_grad():
                    y = hidden_output(block(**{key: x, **to_device(self.consts[stack.name][j], device)}))
                seen = [n for n in local if n in outs]
                here: list[torch.Tensor] = []
                for p, gy in enumerate(per_probe):
                    got = torch.autograd.grad([y], [outs[n] for n in seen] + [x], [gy.to(y)],
                                              retain_graph=p + 1 < len(per_probe), allow_unused=True)
                    for n, gr in zip(seen, got[:-1], strict=True):
                        if gr is None:
                            continue
                        gr = gr.detach().reshape(-1, gr.shape[-1]).double()
                        self.fisher[n] = self.fisher.get(n, 0) + gr.pow(2).sum(0).cpu() / len(per_probe)
                        if p == 0:
                            self.rows[n] = self.rows.get(n, 0) + gr.shape[0]
                    here.append(torch.zeros_like(x) if got[-1] is None else got[-1].detach())
                back.append(here)
        finally:
            for h in hooks:
                h.remove()
            block.train(was)
        outs.clear()
        del block
        self.source.release(name)
        release_memory()
        return back

    def run(self) -> dict[str, torch.Tensor] | None:
        if not self._forward():
            return None
        head = self._head()
        if head is None:
            return None
        grads, energy = head
        self._reverse(grads)
        if not self.fisher or energy <= 0:
            return None
        return {n: (self.fisher[n] / (self.rows[n] * energy)).float().cpu() for n in self.names if n in self.fisher}


def _depends(consts: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a stack's caught arguments carry hidden states of another stack (a floating tensor of 3 or more
    dimensions, as a cross-attended sequence is; masks and position tables are not)."""
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3 and v.shape[-1] > 1
               and not _is_mask(k) for c in consts for k, v in c.items())


def _is_mask(key: str) -> bool:
    return "mask" in key or "position" in key or "bias" in key


def streamed_sensitivity(source: CheckpointSource | ResidentSource, stacks: Sequence[Stack], names: Sequence[str],
                         batches: Sequence[Mapping[str, Any]], device: torch.device,
                         devices: Mapping[str, torch.device], root: Path | None = None, buffer_bytes: int = 1 << 28,
                         report: Any = None) -> dict[str, torch.Tensor] | None:
    """Per output channel of each of ``names``, its output sensitivity (see the module docstring), or ``None``."""
    return StreamedSensitivity(source, stacks, names, batches, device, devices, root, buffer_bytes,
                               report=report).run()


__all__ = ["StreamedSensitivity", "streamed_sensitivity"]

