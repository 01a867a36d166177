"""The public API (README's quick start, docs/guides/compress-your-model.md): ``compress_model`` and
``CompressionPipeline``.

Both run the engine (:mod:`rcc_compression.compression`) with distillation wired in: the engine
does not train, so the stages' distillation (``dare`` between rounds, ``alphaedit`` scaling)
reaches it as a callable, :func:`distiller`, built here from the run's ``training`` section.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..compression.cascade import CascadePipeline, compression_summary
from ..compression.dryrun import dry_run_report, format_report, stage_formats
from ..compression.layers import to_inference
from ..compression.matching import check_section_patterns
from ..compression.rate import achieved_rate, alternative_sections, apply_rate
from ..compression.registry import STAGES
from ..compression.stage import Distiller
from ..compression.towers import tower_record
from ..config import CalibrationSection, RCCConfig, load_config
from ..data.calibration import check_paired_batches
from ..errors import CompressionError
from ..models.registry import get_model, unwrap_model
from ..training.callbacks import Callback
from ..training.recovery import finetune_on_batches
from ..training.settings import TrainingSection
from ..utils.logging import get_logger
from ..utils.progress import interactive, progress_bar
from .common import bundled_name, fit_and_holdout, world_batches
from .sequential import choose_pipeline, compress_sequential

log = get_logger("api")


def distiller(training: TrainingSection | None = None, callbacks: Sequence[Callback] = ()) -> Distiller:
    """The engine's distiller: :func:`~rcc_compression.training.recovery.finetune_on_batches` with ``training``.

    ``None`` trains as the default ``training`` section does, with a constant learning rate;
    ``callbacks`` join every trainer (e.g. one that sends each step to the run's tracker). With
    ``training.privacy`` every distillation of the pipeline draws on one privacy budget (one ledger).
    """
    ledger: list | None = [] if training is not None and training.privacy is not None else None
    return functools.partial(finetune_on_batches, config=training, callbacks=tuple(callbacks), ledger=ledger)


class CompressionPipeline(CascadePipeline):
    """The cascade with distillation: :class:`~rcc_compression.compression.cascade.CascadePipeline` plus a distiller.

    ``training`` (a ``TrainingSection``, or ``None`` for the defaults) sets the losses, optimiser
    and schedule of stage distillation; ``distill`` replaces the distiller altogether. Without
    ``calibration_data`` a bundled model (``rcc-clip-world``, ``rcc-blip-world``, the tiny test
    models) calibrates on the world data, as :func:`compress_model` does (the default
    ``calibration`` section's batches, its last ``holdout_batches`` held out for the gate); any
    other model falls back to the engine's random inputs, with a warning.

    >>> pipe = CompressionPipeline()
    >>> pipe.add_stage("dare", config={"pruning_rate": 0.9})  # doctest: +SKIP
    >>> compressed = pipe.compress(model)  # doctest: +SKIP
    """

    def __init__(self, config: Any = None, *, training: TrainingSection | None = None,
                 distill: Distiller | None = None, allow_unpaired: bool = False, **kwargs: Any) -> None:
        super().__init__(config, distill=distill or distiller(training), **kwargs)
        self.training = training
        self.allow_unpaired = allow_unpaired

    def compress(self, model: nn.Module, resume: bool = False) -> nn.Module:
        """Run the cascade; a model that calibrates on image-text pairs refuses to run on noise.

        Without ``calibration_data`` a model that is not bundled would calibrate on random inputs;
        for SigLIP and LLaVA that is refused unless ``allow_unpaired=True``.
        """
        noise = self.calibration is None and bundled_name(model, model) is None
        if noise and getattr(model, "paired_calibration", False) and not self.allow_unpaired:
            raise CompressionError(
                f"a {model.model_type} model calibrates on image-text pairs: pass calibration_data=... (for the "
                "bundled models: build_calibration_batches(model, 'world', ...)), or allow_unpaired=True to "
                "calibrate on random inputs anyway")
        if self.calibration is not None:
            check_paired_batches(model, self.calibration, self.allow_unpaired)
        return super().compress(model, resume=resume)

    def _prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        world = None
        if self.calibration is None and bundled_name(model, model) is not None:
            cal = CalibrationSection()
            world = world_batches(model, cal, self.seed)
            n_hold = cal.holdout_batches if self.holdout is None else 0
            self.calibration = world[:-n_hold] if n_hold else world
            if self.holdout is None:
                self.holdout = world[-n_hold:] if n_hold else []
        out = super()._prepare(model)
        if world is not None:
            self.calibration_source = "world"
        return out


def _resolve_config(config: Any) -> RCCConfig:
    if config is None:
        return load_config(None)
    if isinstance(config, RCCConfig):
        return config.model_copy(deep=True)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if isinstance(config, Mapping):
        return load_config(None, data=dict(config))
    raise CompressionError(f"config must be a path, a mapping or an RCCConfig, got {type(config).__name__}")


def compress_model(
    model: str | os.PathLike[str] | nn.Module = "rcc-clip-world",
    compression_rate: float | None = 0.5,
    method: str = "cascade",
    calibration_data: Iterable[Mapping[str, Any]] | None = None,
    config: Any = None,
    *,
    scope: str = "layers",
    lowrank_share: float | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    holdout_data: Iterable[Mapping[str, Any]] | None = None,
    preserve_data: Iterable[Mapping[str, Any]] | None = None,
    reference_model: str | os.PathLike[str] | nn.Module | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress_callback: Callable[[str, int, int], None] | None = None,
    progress: bool | None = None,
    dry_run: bool = False,
    pipeline: str | None = None,
) -> Any:
    """Compress a model to ``compression_rate`` and return it, with ``.compression_stats`` attached.

    ``model`` is a bundled name, a local directory, a hub id, a wrapper, or any ``nn.Module``.
    ``method`` is ``cascade`` (the stages of ``config.compression.cascade.stages``) or one stage
    name. With a rate, per-stage targets are planned so the stored bytes of the compressed layers
    (``scope="layers"``) or of the whole model (``scope="model"``) land on it; a rate that cannot
    be reached raises :class:`CompressionError` saying why, and a run the gate stops early reports
    the rate it did reach and the step that failed. ``progress`` shows progress bars (planning,
    each stage over its layers, the cascade's steps) on standard error; ``None``: when it is a
    terminal.

    ``dry_run=True`` compresses nothing: it prints every Linear layer with its tower, the pattern
    that selected or excluded it, and the format and bytes the plan gives it, and returns that
    report (a dict; see :func:`~rcc_compression.compression.dryrun.dry_run_report`). The layers it
    marks as compressed are exactly those a run with the same arguments compresses. Any
    ``targets``/``ignore`` pattern of the config that matches no Linear layer raises, naming the
    nearest module names.

    The result's ``compression_stats["towers"]`` holds each tower's dense and stored bytes (they
    sum to the model) and the output agreement with only that tower compressed.

    ``calibration_data`` (batches of keyword arguments for ``model(**batch)``) is needed for any
    model but the bundled ones (``rcc-clip-world``, ``rcc-blip-world`` and the tiny test models),
    which calibrate on the world data by default. ``holdout_data`` are the batches the validation
    gate scores; without them the last ``min(2, n // 3)`` calibration batches are held out (before
    any planning sees them), and with fewer than 3 batches the gate reports "not measured".
    ``preserve_data`` is AlphaEdit's preserve set (``alphaedit.mode: closed_form``: outputs on it
    must not move). ``reference_model`` (or ``compression.dare.reference_model``) is the base a
    fine-tune came from, for ``dare.target: delta`` (published DARE).

    The model is compressed in place and returned in eval mode, its compressed layers in their
    inference form: it holds what its checkpoint would store (``train()`` brings back the float
    parameters recovery training needs, :func:`~rcc_compression.compression.layers.to_inference` gives
    them back).
    ``pipeline`` (``whole``, ``sequential``: a block at a time, :func:`~.sequential.compress_sequential`, or
    ``auto``; default ``compression.cascade.pipeline``) says how the model is held while it is compressed.
    """
    cfg = _resolve_config(config)
    seed = cfg.experiment.seed if seed is None else seed
    if method != "cascade" and method not in STAGES:
        raise CompressionError(f"unknown method {method!r}; allowed: cascade, {', '.join(STAGES)}")
    chosen = choose_pipeline(model, pipeline or cfg.compression.cascade.pipeline, cfg)
    if chosen.name == "sequential":
        _refuse_unsupported(chosen.why, dry_run=dry_run, metric_fn=metric_fn, preserve_data=preserve_data,
                            reference_model=reference_model, lowrank_share=lowrank_share)
        return compress_sequential(model, compression_rate, method, calibration_data, cfg, chosen, scope=scope,
                                   holdout_data=holdout_data, run_dir=run_dir, seed=seed, device=device,
                                   progress=progress, progress_callback=progress_callback,
                                   distill=distiller(cfg.training))
    wrapper_or_module = model if isinstance(model, nn.Module) else get_model(model, cfg.model.type, cfg.model.dtype)
    inner = unwrap_model(wrapper_or_module)
    fit, holdout, calibration_source = fit_and_holdout(model, wrapper_or_module, cfg, seed, calibration_data,
                                                       holdout_data)
    section = cfg.compression
    stages = list(section.cascade.stages) if method == "cascade" else [method]
    section.cascade.stages = stages
    check_section_patterns(inner, section)  # a pattern that matches nothing: refused before any work
    plan: dict[str, Any] | None = None
    if compression_rate is None and section.cascade.target_rate is not None:
        compression_rate, scope = section.cascade.target_rate, section.cascade.rate_scope
    reference_model = _reference_model(reference_model, cfg, stages)
    with progress_bar(interactive() if progress is None else progress, by_first_word=True) as bar:

        def report(what: str, done: int, total: int) -> None:
            bar(what, done, total)
            if progress_callback is not None:
                progress_callback(what, done, total)

        alternatives: dict[str, Any] = {}
        if compression_rate is not None:
            share = lowrank_share if lowrank_share is not None else section.cascade.lowrank_share
            before = section.model_copy(deep=True)
            # the holdout stays unseen
            plan = apply_rate(inner, section, compression_rate, scope, share, fit, progress=report)
            alternatives = alternative_sections(before, plan, calibrated=bool(fit))
        if dry_run:
            formats = None if (plan or {}).get("method") == "layers" else stage_formats(inner, section)
            found = dry_run_report(inner, section, plan, formats)
            print(format_report(found), end="")
            return found
        pipe = CompressionPipeline(section, calibration_data=fit, holdout_data=holdout, preserve_data=preserve_data,
                                   plan=plan, alternatives=alternatives,
                                   reference_model=reference_model, metric_fn=metric_fn, run_dir=run_dir,
                                   seed=seed, device=device, progress_callback=report,
                                   step_callback=lambda r: bar(f"steps: {r['stage']} round {r['round']}",
                                                               r["step"] + 1, len(pipe.steps())),
                                   run_config=cfg.model_dump(mode="json"), training=cfg.training,
                                   allow_unpaired=cfg.calibration.allow_unpaired)
        out = pipe.compress(wrapper_or_module)
    summary = compression_summary(inner)
    stats: dict[str, Any] = {"plan": plan, "summary": summary, **pipe.get_stage_results(),
                             "calibration": calibration_source,
                             "towers": tower_record(inner, pipe.dense_model, holdout or [])}
    if plan is not None:
        stats.update(_rate_outcome(inner, plan, pipe, compression_rate, scope))
    to_inference(inner)  # what it stores and nothing more; train() makes float parameters again
    out.compression_stats = stats
    return out


def _refuse_unsupported(why: str, **arguments: Any) -> None:
    """The sequential pipeline takes none of these arguments: refuse them by name before any work."""
    unsupported = [name for name, value in arguments.items() if value]
    if unsupported:
        raise CompressionError(f"the sequential pipeline ({why}) does not take {', '.join(unsupported)}; "
                               "pass pipeline='whole' to use them")


def _reference_model(given: Any, cfg: RCCConfig, stages: Sequence[str]) -> Any:
    """DARE's base model (``dare.target: delta``): the one given, else ``compression.dare.reference_model``."""
    if given is None and cfg.compression.dare.reference_model and "dare" in stages:
        given = cfg.compression.dare.reference_model
    if isinstance(given, (str, os.PathLike)):
        return get_model(given, cfg.model.type, cfg.model.dtype)
    return given


def _rate_outcome(inner: nn.Module, plan: dict[str, Any], pipe: CascadePipeline, compression_rate: float,
                  scope: str) -> dict[str, Any]:
    """``achieved_rate`` and, where it differs from the request, a ``rate_note`` saying why."""
    stats: dict[str, Any] = {}
    achieved = achieved_rate(inner, scope)
    stats["achieved_rate"] = achieved
    layered = plan.get("method") == "layers"
    undone = next((r for r in pipe.records if r.get("undone") or r.get("skipped")), None)
    if layered and achieved >= compression_rate - 1e-9 and abs(achieved - plan["predicted_rate"]) < 1e-6:
        if achieved > compression_rate + 0.01:
            stats["rate_note"] = (f"reached {achieved:.4f}, past the requested {compression_rate:.4f}: no "
                                  "storage that fills the budget leaves less calibration output error")
            log.info(stats["rate_note"])
    elif layered and undone is not None and achieved > plan["predicted_rate"]:
        # a plan is a budget: a step undone after it (recovery that did not help) only stores less
        how = f"undone ({undone['undone']})" if undone.get("undone") else f"skipped ({undone['skipped']})"
        stats["rate_note"] = (f"reached {achieved:.4f}, past the planned {plan['predicted_rate']:.4f}: step "
                              f"{undone['step']} ({undone['stage']}) was {how}")
        log.info(stats["rate_note"])
    elif abs(achieved - compression_rate) > 0.01:
        failed = next((r for r in pipe.records if not r.get("passed", True)), None)
        why = "the stages' targets did not translate exactly into stored bytes"
        if failed:
            at = failed.get("error") or f"retention {failed['retention']:.4f} < {failed['threshold']}"
            why = (f"the validation gate stopped step {failed['step']} ({failed['stage']}, round "
                   f"{failed['round']}) at {at}")
        choice = pipe.plan_choice or {}
        if choice.get("why"):
            best = max((v["retention"] for v in choice["candidates"].values() if v.get("retention") is not None),
                       default=None)
            why += f"; {choice['why']}" + (f" (best measured retention {best:.4f})" if best is not None else "")
        stats["rate_note"] = f"reached {achieved:.4f} instead of {compression_rate:.4f}: {why}"
        log.warning(stats["rate_note"])
    return stats
