"""Differentially private recovery training: DP-SGD through Opacus (``training.privacy``).

Every step takes a Poisson sample of the training items (each item in with probability
``q = batch_size / items``), computes each item's gradient, clips it to ``max_grad_norm``, sums,
adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and divides by the expected batch
size (Abadi et al., 2016). Opacus computes the per-sample gradients (its hooks, with a functorch
sampler for :class:`~rcc_compression.compression.layers.CompressedLinear` registered here), clips
and noises them (``DPOptimizer``, in its secure mode) and accounts for the privacy spent (its RDP
or PRV accountant). The noise multiplier is the smallest that keeps the planned steps within
``(epsilon, delta)``; a step that would go past the budget is never taken.

What it covers: the items of the training data (one item = one image with its captions), for
the parameters trained. It needs a loss that is a mean of per-item terms: CLIP's contrastive
terms compare every item with the others of its batch, so under privacy only the feature terms
(and attention transfer) may be weighted. The noise and the sampling draw from a generator seeded
by the operating system's entropy, never from ``experiment.seed``: a recorded seed would let
anyone replay the noise. A private run is therefore not reproducible bit for bit, by design.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..compression.layers import CompressedLinear
from ..errors import ConfigError
from ..utils.logging import get_logger
from .settings import PrivacySection

log = get_logger("training")

#: loss terms that couple the items of a batch, per model family (not allowed under privacy)
COUPLED_TERMS = {"clip": ("kd", "task"), "blip": ("kd", "task")}


def _opacus() -> Any:
    try:
        import opacus  # noqa: F401
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.grad_sample import GradSampleHooks, register_grad_sampler
        from opacus.optimizers import DPOptimizer
    except ImportError:
        raise ConfigError("training.privacy needs Opacus: pip install 'rcc-compression[privacy]'") from None
    return {"create_accountant": create_accountant, "get_noise_multiplier": get_noise_multiplier,
            "GradSampleHooks": GradSampleHooks, "register_grad_sampler": register_grad_sampler,
            "DPOptimizer": DPOptimizer}


# ------------------------------------------------------------------------------ per-sample gradients
def compressed_linear_grad_sample(layer: nn.Module, activations: Sequence[torch.Tensor], backprops: torch.Tensor
                                  ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a layer's trainable parameters from its inputs and output gradients.

    The layer's own forward is replayed on each sample under ``vmap(grad(...))``, so this holds
    for whatever the layer computes from its parameters and (frozen) buffers. Opacus calls it
    from its backward hook with the batch's inputs and the output gradients (scaled to per-sample
    losses).
    """
    params = {n: p for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
    if not params:
        return {}
    replay = _Forward(layer)
    with torch.no_grad():  # state the layer builds lazily (an unpacked mask) is built outside the transforms
        layer.forward(activations[0][:1])

    def contribution(ps: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (functional_call(replay, ps, (x.unsqueeze(0),)) * g.unsqueeze(0)).sum()

    detached = {f"layer.{n}": p.detach() for n, p in params.items()}
    grads = vmap(grad(contribution), in_dims=(None, 0, 0))(detached, activations[0], backprops)
    return {p: grads[f"layer.{n}"] for n, p in params.items()}


class _Forward(nn.Module):
    """Calls a layer's ``forward`` directly: its hooks (Opacus' own among them) do not fire on the replay."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.forward(x)


_REGISTERED = False


def _register(op: Mapping[str, Any]) -> None:
    global _REGISTERED
    if not _REGISTERED:
        op["register_grad_sampler"](CompressedLinear)(compressed_linear_grad_sample)
        _REGISTERED = True


# ------------------------------------------------------------------------------ accounting
def noise_for_budget(cfg: PrivacySection, sample_rate: float, steps: int,
                     spent: Sequence[tuple[float, float, int]] = ()) -> float:
    """The smallest noise multiplier with which ``steps`` more steps at ``sample_rate`` keep within ``cfg.epsilon``.

    Without earlier steps (``spent``, an accountant history) this is Opacus' own calibration;
    after them, the same bisection on the composed history.
    """
    steps = max(int(steps), 1)
    if not spent:
        return float(_opacus()["get_noise_multiplier"](target_epsilon=cfg.epsilon, target_delta=cfg.delta,
                                                       sample_rate=sample_rate, steps=steps,
                                                       accountant=cfg.accountant))

    def eps(sigma: float) -> float:
        return epsilon_of(cfg.accountant, [*spent, (sigma, sample_rate, steps)], cfg.delta)

    lo, hi = 0.0, 10.0
    while eps(hi) > cfg.epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ConfigError(f"training.privacy: the budget epsilon {cfg.epsilon:g} is spent (epsilon "
                              f"{epsilon_of(cfg.accountant, spent, cfg.delta):.3f} already); no further private "
                              "step fits it")
    while eps(hi) < cfg.epsilon - 0.01 * cfg.epsilon and hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= cfg.epsilon else (mid, hi)
    return hi


def epsilon_of(accountant: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon spent by a history of ``(noise_multiplier, sample_rate, steps)`` at ``delta`` (Opacus' accountant)."""
    if not history:
        return 0.0
    acc = _opacus()["create_accountant"](mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def validate_objective(objective: Any, family: str) -> None:
    """Refuse a loss that is not a mean of per-item terms, or one with trainable parameters of its own."""
    loss = getattr(objective, "loss", None)
    weights = getattr(loss, "weights", None)
    if weights is not None:
        coupled = [t for t in COUPLED_TERMS.get(family, ()) if getattr(weights, t)]
        if coupled:
            keys = " and ".join(f"training.{t}_weight" for t in coupled)
            raise ConfigError(
                f"training.privacy: the {family.upper()} {'/'.join(coupled)} term(s) compare each item with the "
                f"others of its batch, so clipping one item's gradient would not bound its influence; set {keys} "
                f"to 0 (feature matching, and attention transfer, are per item)")
    if isinstance(objective, nn.Module) and any(p.requires_grad for p in objective.parameters()):
        raise ConfigError("training.privacy: the loss has trainable projections (student and teacher widths "
                          "differ); private training covers the model's own parameters only")


def _check_model(model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    chosen = {id(p) for p in params}
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) in chosen]
        if own and not isinstance(m, CompressedLinear | nn.Linear | nn.LayerNorm | nn.Embedding | nn.Conv2d):
            raise ConfigError(f"training.privacy: no per-sample gradients for {name} ({type(m).__name__}); "
                              "train the compressed layers only (training.trainable: compressed)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ConfigError(f"training.privacy: {name} is a batch norm in training mode (it mixes the items "
                              "of a batch); not supported")


# ------------------------------------------------------------------------------ the engine
class PrivateTraining:
    """DP-SGD for one training run: Poisson sampling, per-sample clipping, noise, the accountant.

    ``items``: how many training items there are; ``batch_size``: the expected batch size
    (``q = batch_size / items``); ``steps``: the planned optimiser steps, which the noise
    multiplier is calibrated to (when the config does not fix it). A fixed noise multiplier with
    which the planned steps would spend more than the budget is refused before anything trains.
    """

    def __init__(self, cfg: PrivacySection, items: int, batch_size: int, steps: int,
                 spent: Sequence[tuple[float, float, int]] = ()) -> None:
        if items < 2:
            raise ConfigError(f"training.privacy: {items} training item(s); private training needs a data set")
        if batch_size >= items:
            raise ConfigError(f"training.privacy: batch size {batch_size} >= {items} training items; the sampling "
                              "that the accountant counts on needs a batch smaller than the data")
        self.op = _opacus()
        _register(self.op)
        self.cfg = cfg
        self.items, self.batch_size = int(items), int(batch_size)
        self.sample_rate = batch_size / items
        self.planned_steps = max(int(steps), 1)
        self.spent = [tuple(h) for h in spent]  # earlier private steps on the same data (one budget)
        self.noise_multiplier = (float(cfg.noise_multiplier) if cfg.noise_multiplier is not None
                                 else noise_for_budget(cfg, self.sample_rate, self.planned_steps, self.spent))
        planned = epsilon_of(cfg.accountant, [*self.spent, (self.noise_multiplier, self.sample_rate,
                                                            self.planned_steps)], cfg.delta)
        if planned > cfg.epsilon:
            fit = self.steps_within_budget()
            raise ConfigError(
                f"training.privacy: {self.planned_steps} steps at noise multiplier {self.noise_multiplier:g} "
                f"(sample rate {self.sample_rate:.4g}) would spend epsilon {planned:.3f} > the budget "
                f"{cfg.epsilon:g}; train at most {fit} steps (training.max_steps) or leave "
                f"training.privacy.noise_multiplier unset")
        self.planned_epsilon = planned
        self.accountant = self.op["create_accountant"](mechanism=cfg.accountant)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.stopped: str | None = None
        self._hooks: Any = None
        self._optimizer: Any = None

    # ---------------------------------------------------------------- budget
    @property
    def steps_taken(self) -> int:
        return sum(int(h[2]) for h in self.accountant.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Every private step on this data: earlier runs' and this one's, as ``(noise, sample rate, steps)``."""
        return [*self.spent, *(tuple(h) for h in self.accountant.history)]

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far (plus ``extra_steps`` more steps) at the budget's delta."""
        history = self.history
        if extra_steps:
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return epsilon_of(self.cfg.accountant, history, self.cfg.delta)

    def steps_within_budget(self) -> int:
        """How many steps of this run fit the budget in all (binary search on the accountant)."""
        def fits(n: int) -> bool:
            return epsilon_of(self.cfg.accountant, [*self.spent, (self.noise_multiplier, self.sample_rate, n)],
                              self.cfg.delta) <= self.cfg.epsilon

        lo, hi = 0, self.planned_steps
        while fits(hi) and hi < 10**8:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def may_step(self) -> bool:
        """Whether one more step stays within the budget; if not, records why the run stops."""
        if self.steps_taken < self.planned_steps:
            return True  # the plan was checked against the budget up front
        after = self.epsilon(1)
        if after <= self.cfg.epsilon:
            return True
        self.stopped = (f"privacy budget: step {self.steps_taken + 1} would spend epsilon {after:.3f} > "
                        f"{self.cfg.epsilon:g} (delta {self.cfg.delta:g}); stopped after {self.steps_taken} steps")
        log.warning("%s", self.stopped)
        return False

    # ---------------------------------------------------------------- wiring
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]
               ) -> torch.optim.Optimizer:
        """Per-sample gradient hooks on ``model``; returns ``optimizer`` wrapped to clip and noise them."""
        _check_model(model, params)
        # the first hooked layer's input needs no gradient: PyTorch warns that its hook sees output gradients only,
        # which is all a per-sample gradient needs
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs", category=UserWarning)
        self._hooks = self.op["GradSampleHooks"](model, batch_first=True, loss_reduction="mean", strict=False)
        device = params[0].device if params else torch.device("cpu")
        # the noise is drawn where the gradients are (a CUDA generator for CUDA gradients), seeded like the sampling
        noise = (self.generator if device.type == "cpu"
                 else torch.Generator(device=device).manual_seed(secrets.randbits(63)))
        dp = self.op["DPOptimizer"](optimizer, noise_multiplier=self.noise_multiplier,
                                    max_grad_norm=self.cfg.max_grad_norm, expected_batch_size=self.batch_size,
                                    loss_reduction="sum", generator=noise, secure_mode=True)
        # the hooks scale each forward's gradients to per-item losses ("mean"); the optimiser sums the
        # clipped ones ("sum") and this divides by the expected batch size, whatever the number of forwards
        dp.attach_step_hook(self._scale)
        self._optimizer = dp
        return dp

    def _scale(self, optimizer: Any) -> None:
        for p in optimizer.params:
            if p.grad is not None:
                p.grad.div_(self.batch_size)

    def empty_batch(self) -> None:
        """An empty Poisson sample still takes its (noise only) step: zero per-sample gradients."""
        for p in self._optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def after_step(self) -> dict[str, float]:
        """Count the step just taken; returns the epsilon spent so far (for the step log)."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return {"epsilon": self.epsilon()}

    def close(self) -> None:
        """Remove the hooks and the per-sample gradient attributes."""
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks = None
        if self._optimizer is not None:
            for p in self._optimizer.params:
                for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)

    # ---------------------------------------------------------------- records
    def state_dict(self) -> dict[str, Any]:
        """The accountant's history (for a resumed run); the noise generator's state is never saved."""
        return {"history": [list(h) for h in self.accountant.history], "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.history = [tuple(h) for h in state.get("history", [])]

    def record(self) -> dict[str, Any]:
        """What a run directory records: the budget, the mechanism and the privacy spent."""
        return {
            "epsilon_budget": self.cfg.epsilon, "delta": self.cfg.delta, "epsilon_spent": self.epsilon(),
            "steps": self.steps_taken, "planned_steps": self.planned_steps,
            "planned_epsilon": self.planned_epsilon, "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm, "sample_rate": self.sample_rate,
            "expected_batch_size": self.batch_size, "items": self.items, "accountant": self.cfg.accountant,
            "earlier_steps": sum(int(h[2]) for h in self.spent), "sampling": "Poisson",
            "noise": "Gaussian, secure mode, generator seeded from OS entropy (not recorded)",
            "stopped": self.stopped,
        }


# ------------------------------------------------------------------------------ Poisson sampling
def poisson_draws(items: int, sample_rate: float, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """``steps`` Poisson samples of ``range(items)``: each item in each with probability ``sample_rate``."""
    for _ in range(steps):
        keep = torch.rand(items, generator=generator) < sample_rate
        yield keep.nonzero().flatten().tolist()


def steps_per_epoch(items: int, batch_size: int) -> int:
    """Poisson steps that make one expected pass over the data."""
    return max(1, math.ceil(items / batch_size))
