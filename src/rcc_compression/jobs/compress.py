"""The main job: config -> model -> calibration -> cascade -> storage -> evaluation -> report.

``run_compress`` is what ``rcc compress`` (and ``make demo``) runs; the CLI only parses
arguments and draws progress bars.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..compression.calibration import run_outputs
from ..compression.cascade import compression_summary
from ..compression.dryrun import dry_run_report, stage_formats
from ..compression.layers import to_inference
from ..compression.matching import check_section_patterns
from ..compression.offload import materialize
from ..compression.rate import achieved_rate, alternative_sections, apply_rate
from ..compression.records import last_passed, step_records
from ..compression.storage import save_compressed
from ..compression.towers import tower_record
from ..config import RCCConfig, dump_config
from ..data.calibration import build_calibration_batches, calibration_items, check_paired
from ..evaluation.efficiency import compare_efficiency, measured_storage, parameter_report, storage_report
from ..evaluation.inference import DTYPES, prepare_for_inference
from ..evaluation.suite import HEADLINE_NAMES, benchmark_datasets, evaluate_model
from ..models.registry import get_model, unwrap_model
from ..training.callbacks import TrackingCallback
from ..utils.io import atomic_write_json, atomic_write_text, directory_lock
from ..utils.logging import get_logger
from ..utils.seeding import seed_everything
from ..visualization.compression_plots import metric_label
from ..visualization.plots import plot_rate_curve
from .api import CompressionPipeline, distiller
from .common import calibration_batches, evaluation_datasets, resolve_device
from .data import check_and_record, open_role
from .tracking import cascade_logger, chain, finish_compress_tracking, start_tracker

log = get_logger("jobs")


def compress_data(wrapper: nn.Module, cfg: RCCConfig, run_dir: Path | None, evaluate: bool
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(fit batches, gate batches, data record) of ``rcc compress``, leak-checked.

    The gate's held-out batches come from ``dataset.val`` when it is set, else from the same draw
    as the fit batches. Calibration draws, the val split and every dataset the run evaluates on
    (when it does) are checked for shared images and recorded in ``data.json``.
    """
    cal, seed = cfg.calibration, cfg.experiment.seed
    kw = {"skip_bad": cfg.dataset.skip_bad, "root": cfg.dataset.root}
    from_val = bool(cfg.dataset.val) and cal.holdout_batches > 0
    n_fit = cal.num_batches + (0 if from_val else cal.holdout_batches)
    roles: dict[str, list[Any]] = {}
    if cal.source == "synthetic":
        batches = build_calibration_batches(wrapper, "synthetic", n_fit, cal.batch_size, seed,
                                            allow_unpaired=cal.allow_unpaired)
    else:
        items = calibration_items(wrapper, cal.source, n_fit * cal.batch_size, seed, **kw)
        roles["calibration"] = [items]
        batches = build_calibration_batches(wrapper, cal.source, n_fit, cal.batch_size, seed, items=items, **kw)
    if from_val:
        val = open_role(cfg, wrapper, cfg.dataset.val, "val")
        roles["val"] = [val]
        spec = f"{val.spec}@{val.split}" if "@" not in str(val.spec) else str(val.spec)
        holdout = build_calibration_batches(wrapper, spec, cal.holdout_batches, cal.batch_size, seed, **kw)
        fit = batches
    else:
        n_hold = cal.holdout_batches
        # no holdout: the gate says "not measured" (it never scores the model on the batches it was fitted to)
        fit, holdout = (batches[:-n_hold], batches[-n_hold:]) if n_hold else (batches, [])
    benchmarks = [b for b in cfg.evaluation.benchmarks if b != "efficiency"]
    if evaluate and benchmarks:
        tests = benchmark_datasets(wrapper, benchmarks, evaluation_datasets(cfg), **kw)
        roles["test"] = list({id(ds): ds for _, _, ds in tests}.values())
    record = check_and_record(run_dir, roles, cfg.dataset.leak_check) if roles else {}
    return fit, holdout, record


def dry_run(cfg: RCCConfig) -> dict[str, Any]:
    """What ``rcc compress`` would compress, and how, without compressing (``rcc compress --dry-run``).

    Loads the model, and with ``cascade.target_rate`` draws the calibration batches and plans
    exactly as the run does; returns :func:`~rcc_compression.compression.dryrun.dry_run_report`.
    """
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
    wrapper = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
    check_paired(wrapper, cfg.calibration.source, cfg.calibration.allow_unpaired)  # what the run would refuse
    section, plan = cfg.compression.model_copy(deep=True), None
    check_section_patterns(wrapper.model, section)
    if section.cascade.target_rate is not None:
        fit, _, _ = compress_data(wrapper, cfg, None, evaluate=False)
        plan = apply_rate(wrapper.model, section, section.cascade.target_rate, section.cascade.rate_scope,
                          section.cascade.lowrank_share, calibration_data=fit)
    formats = None if (plan or {}).get("method") == "layers" else stage_formats(wrapper.model, section)
    return dry_run_report(wrapper.model, section, plan, formats)


HEADLINE_METRICS = ("top1", "top5", "mean_per_class_recall", "i2t_R@1", "t2i_R@1", "CIDEr", "BLEU-4", "accuracy")


def headline_metrics(result: dict[str, Any], names: tuple[str, ...] = HEADLINE_METRICS) -> dict[str, float]:
    """``{"<benchmark> <dataset> <metric>": value}`` for the headline metrics of an ``evaluate_model`` result."""
    out: dict[str, float] = {}
    for bench, per_dataset in result.get("results", {}).items():
        for spec, res in per_dataset.items():
            for name in names:
                m = res.get("metrics", {}).get(name)
                if isinstance(m, dict) and "value" in m:
                    out[f"{bench} {spec} {name}"] = float(m["value"])
    return out


def quality_metrics(wrapper: nn.Module, cfg: RCCConfig) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Headline numbers of the metrics the config measures (``evaluation.metrics``) and their bootstrap CIs.

    Both are empty when no benchmark runs; the CIs (``[low, high]``) are empty with ``bootstrap_samples: 0``.
    """
    ev = cfg.evaluation
    benchmarks = [b for b in ev.benchmarks if b != "efficiency"]  # efficiency is compared dense vs compressed
    if not benchmarks:
        return {}, {}
    names = tuple(n for m in ev.measures() for n in HEADLINE_NAMES.get(m, ()))
    res = evaluate_model(wrapper, benchmarks=benchmarks, datasets=evaluation_datasets(cfg),
                         batch_size=ev.batch_size, bootstrap_samples=ev.bootstrap_samples, seed=cfg.experiment.seed)
    values = headline_metrics(res, names)
    cis: dict[str, list[float]] = {}
    if ev.bootstrap_samples:
        for bench, per_dataset in res.get("results", {}).items():
            for spec, r in per_dataset.items():
                for name in names:
                    m = r.get("metrics", {}).get(name)
                    if isinstance(m, dict) and "ci_low" in m:
                        cis[f"{bench} {spec} {name}"] = [float(m["ci_low"]), float(m["ci_high"])]
    return values, cis


def run_compress(
    cfg: RCCConfig,
    run_dir: Path,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    step_callback: Callable[[dict[str, Any]], None] | None = None,
    evaluate: bool = True,
    encrypt_key: bytes | None = None,
) -> dict[str, Any]:
    """Compress ``cfg.model`` with ``cfg.compression`` into ``run_dir``; returns the results dict.

    The run directory is locked for the whole job; with ``encrypt_key`` every checkpoint (the
    cascade's and ``compressed/``) is encrypted.
    """
    with directory_lock(run_dir):
        return _run_compress(cfg, run_dir, resume, progress, step_callback, evaluate, encrypt_key)


def _run_compress(
    cfg: RCCConfig,
    run_dir: Path,
    resume: bool,
    progress: Callable[[str, int, int], None] | None,
    step_callback: Callable[[dict[str, Any]], None] | None,
    evaluate: bool,
    encrypt_key: bytes | None,
) -> dict[str, Any]:
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
    device = resolve_device(cfg.experiment.device)
    wrapper = get_model(cfg.model.name, cfg.model.type, cfg.model.dtype, seed=cfg.experiment.seed)
    wrapper.to(device)
    check_section_patterns(wrapper.model, cfg.compression)  # refused before calibration data is drawn
    fit, holdout, _ = compress_data(wrapper, cfg, run_dir, evaluate)
    preserve = calibration_batches(wrapper, cfg, cfg.calibration.preserve_source) if (
        cfg.calibration.preserve_source) else None
    section, plan, alternatives = cfg.compression, None, {}
    if section.cascade.target_rate is not None:
        section = section.model_copy(deep=True)
        plan = apply_rate(wrapper.model, section, section.cascade.target_rate, section.cascade.rate_scope,
                          section.cascade.lowrank_share, calibration_data=fit)
        alternatives = alternative_sections(cfg.compression, plan, calibrated=bool(fit))
        log.info("planned for rate %.4f: %s", section.cascade.target_rate,
                 {k: v for k, v in plan.items() if k in ("pruning_rate", "param_budget", "lowrank_share", "stages",
                                                         "predicted_rate", "predicted_error")})
    resolved = dump_config(cfg) | {"compression": section.model_dump(mode="json")}
    reference = None
    if "dare" in section.cascade.stages and section.dare.target == "delta" and section.dare.reference_model:
        # published DARE works on the deltas of a fine-tune against the base it came from
        reference = get_model(section.dare.reference_model, cfg.model.type, cfg.model.dtype,
                              seed=cfg.experiment.seed).to(device)
    with start_tracker(cfg, run_dir, resolved) as tracker:
        tracker.log_event("phase", phase="dense evaluation")
        dense_quality, dense_ci = quality_metrics(wrapper, cfg) if evaluate else ({}, {})
        tracker.log_event("phase", phase="cascade")
        pipe = CompressionPipeline(
            section, calibration_data=fit, holdout_data=holdout, preserve_data=preserve, run_dir=run_dir,
            reference_model=reference, seed=cfg.experiment.seed, device=device, progress_callback=progress,
            step_callback=chain(step_callback, cascade_logger(tracker)), run_config=resolved,
            encrypt_key=encrypt_key, training=cfg.training, plan=plan, alternatives=alternatives,
            allow_unpaired=cfg.calibration.allow_unpaired,
            distill=distiller(cfg.training, [TrackingCallback(tracker)]) if tracker.enabled else None,
        )
        pipe.compress(wrapper, resume=resume)
        tracker.log_event("phase", phase="inference form")
        # timed with its weights resident: an offloaded teacher reads them from files on every call
        dense = materialize(pipe.dense_model)
        timed = evaluate and "efficiency" in cfg.evaluation.measures()
        served, inference = inference_step(wrapper, dense, cfg, fit, holdout, timed)
        out_dir = run_dir / "compressed"
        manifest = save_compressed(wrapper, out_dir, config=resolved, records=pipe.records, overwrite=True,
                                   encrypt_key=encrypt_key, extra={"inference": {"dtype": inference["dtype"]}})
        tracker.log_event("phase", phase="evaluation")
        comp_quality, comp_ci = quality_metrics(served, cfg) if evaluate else ({}, {})
        effs: dict[str, Any] = {}
        if timed:
            probe = holdout[0] if holdout else fit[0]  # inputs for timing: any batch will do
            models = {"dense": dense, "compressed": served}
            if inference["dtype"] != "float32":  # the dense model in the same compute dtype, for a fair ratio
                models[f"dense {inference['dtype']}"] = copy.deepcopy(dense).to(DTYPES[inference["dtype"]])
            effs = compare_efficiency(models, probe)
            # what is stored is the saved model's (the served one may be a copy in another compute dtype)
            effs["compressed"].update(storage=storage_report(wrapper), parameters=parameter_report(wrapper))
        results = {
            "model": cfg.model.name,
            "stages": section.cascade.stages,
            "stopped_early": pipe.stopped_early,
            "outcome": compress_outcome(section, pipe, wrapper),
            "records": pipe.records,
            "quality": {"dense": dense_quality, "compressed": comp_quality},
            "quality_ci": {"dense": dense_ci, "compressed": comp_ci},
            "efficiency": {k: effs.get(k, {}) for k in ("dense", "compressed", *effs)},
            "plan": plan,
            "plan_choice": pipe.plan_choice,
            "inference": inference,
            "towers": tower_record(wrapper.model, pipe.dense_model, holdout),
            "execution_kernels": inference["kernels"],
            "stored_bytes_measured": measured_storage(out_dir),
            "stored_bytes_reported": manifest["stored_bytes"],
            "gate": {"retention": last.retention if (last := last_passed(pipe.records)) is not None else None,
                     "threshold": cfg.compression.cascade.validation_threshold,
                     "measured": pipe.gate_note or "yes"},
        }
        atomic_write_json(run_dir / "results.json", results)
        atomic_write_text(run_dir / "results.md", results_table_markdown(results))
        if evaluate:
            plot_rate_curve(pipe.records, run_dir / "rate_curve.png", dense_quality, comp_quality,
                            title=f"{cfg.model.name}: quality vs compression rate")
            finish_compress_tracking(tracker, cfg, run_dir, results, pipe, wrapper, holdout[0] if holdout else None)
        else:
            finish_compress_tracking(tracker, cfg, run_dir, results)
        return results


def inference_step(wrapper: nn.Module, dense: nn.Module, cfg: RCCConfig, fit: list[dict[str, Any]],
                   holdout: list[dict[str, Any]], measure: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The compressed model in its inference form, dtype and kernels chosen by measurement
    (:func:`~rcc_compression.evaluation.inference.prepare_for_inference`, judged on the holdout by the
    gate's agreement with the dense model and threshold); returns the model to evaluate and serve, and
    the record. ``wrapper`` itself keeps its dtype (it is what is saved). Without ``measure`` (``--no-eval``,
    or no efficiency metric) the model only takes its inference form: dtype as stored, kernels not chosen."""
    if not measure:
        to_inference(unwrap_model(wrapper))
        dtype = str(next(unwrap_model(wrapper).parameters()).dtype).removeprefix("torch.")
        return wrapper, {"dtype": dtype, "kernels": {}, "tried": {}, "note": "not measured (no evaluation)"}
    probe = holdout[0] if holdout else fit[0]
    teacher = run_outputs(dense, holdout) if holdout else None
    return prepare_for_inference(wrapper, probe, cfg.inference.dtype, cfg.inference.kernels, holdout or None,
                                 teacher, cfg.compression.cascade.validation_threshold,
                                 max_held=cfg.inference.max_held)


def compress_outcome(section: Any, pipe: CompressionPipeline, model: nn.Module) -> dict[str, Any]:
    """What the run aimed at, what it reached and why: the first thing its table and ``results.md`` say.

    The target is ``cascade.target_rate`` (a compression rate) when set, else dare's final
    ``pruning_rate`` (the sparsity of S) when dare runs, else the layers' compression rate with
    the stages' final targets as text. ``status`` is ``met``, ``missed`` or ``stopped early``;
    ``why`` names the step the gate stopped (and its retention) or says that every step passed.
    """
    inner = unwrap_model(model)
    summary = compression_summary(inner)
    cascade = section.cascade
    measure, target, source = "compression rate (layers)", None, "the stages' final targets"
    if cascade.target_rate is not None:
        measure, target = f"compression rate ({cascade.rate_scope})", float(cascade.target_rate)
        source, reached = "cascade.target_rate", achieved_rate(inner, cascade.rate_scope)
    elif "dare" in cascade.stages and section.dare.pruning_rate > 0:
        measure, target, source = "sparsity of S", float(section.dare.pruning_rate), "dare.pruning_rate"
        reached = summary["sparsity"] if summary["sparsity"] is not None else 1.0  # no S left: all of it pruned
    else:
        reached = summary["compression_rate"]
        source = "; ".join(f"{st.name} {st.target_description(1.0, pipe.schedule)}" for st in pipe.stages)
    steps = step_records(pipe.records)
    total = len(pipe.steps())
    failed = next((r for r in steps if not r.passed), None)
    if failed is not None:
        at = failed.error or (f"gate retention {failed.retention:.4f} < threshold {failed.threshold:.4f}"
                              if failed.retention is not None else "gate not measured")
        back = failed.rolled_back_to_step if failed.rolled_back_to_step is not None else -1
        kept = f"kept step {back}, the smallest passing state" if back >= 0 else "kept the starting model"
        why = f"stopped at step {failed.step} of {total} ({failed.stage}, round {failed.round}): {at}; {kept}"
        status = "stopped early"
    else:
        why = f"all {len(steps)} of {total} steps passed the gate"
        undone = [r for r in steps if r.undone]
        if undone:
            why += f" ({len(undone)} recovery step(s) undone: they made the gate's metric worse)"
        skipped = [r for r in steps if r.skipped]
        if skipped:
            why += f" ({len(skipped)} recovery step(s) skipped: the model passed with margin)"
        if pipe.plan_choice and pipe.plan_choice["chosen"] != "per-layer plan":
            why += f"; the holdout kept the {pipe.plan_choice['chosen']} plan over the per-layer plan"
        status = "met" if target is None or abs(reached - target) <= 0.01 or reached > target else "missed"
        if status == "missed":
            why += f"; the stages' targets did not translate exactly into {measure}"
    return {"measure": measure, "target": target, "target_source": source, "reached": float(reached),
            "compression_rate_layers": float(summary["compression_rate"]), "status": status, "why": why,
            "steps_run": len(steps), "steps_total": total, "stopped_early": bool(pipe.stopped_early)}


def outcome_sentence(outcome: dict[str, Any]) -> str:
    """One line: target, reached, status and why (printed after the table and at the top of ``results.md``)."""
    target = (f"target {outcome['measure']} {outcome['target']:.4f} ({outcome['target_source']})"
              if outcome["target"] is not None else f"target: {outcome['target_source']}")
    reached = f"reached {outcome['measure']} {outcome['reached']:.4f}"
    if not outcome["measure"].startswith("compression rate"):
        reached += f" (compression rate of the layers {outcome['compression_rate_layers']:.4f})"
    return f"{outcome['status'].upper()}: {target}; {reached}. {outcome['why'][:1].upper()}{outcome['why'][1:]}."


def outcome_rows(outcome: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """The table's first rows: the target, what was reached (and the status), why."""
    if not outcome:
        return []
    target = f"{outcome['target']:.4f}" if outcome["target"] is not None else outcome["target_source"]
    return [(f"target: {outcome['measure']}", "-", target, "-"),
            (f"reached: {outcome['measure']}", "0.0000", f"{outcome['reached']:.4f}", outcome["status"].upper()),
            ("why", "-", outcome["why"], "-")]


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, dense, compressed, compressed/dense) rows for the final table, led by the outcome rows."""
    rows: list[tuple[str, str, str, str]] = outcome_rows(results.get("outcome"))
    qd, qc = results["quality"]["dense"], results["quality"]["compressed"]
    for name in qd:
        if name in qc:
            d, c = qd[name], qc[name]
            rows.append((metric_label(name, short=False), f"{d:.4f}", f"{c:.4f}", f"{c / d:.3f}" if d else "-"))
    gate = results["gate"]["retention"]
    if gate is not None:
        rows.append(("output agreement (gate)", "1.0000", f"{gate:.4f}", f"{gate:.3f}"))
    ed, ec = results["efficiency"]["dense"], results["efficiency"]["compressed"]
    if ed and ec:
        pd_, pc = ed["parameters"], ec["parameters"]
        rows.append(("numbers stored (any bit width)", f"{pd_['stored']:,}", f"{pc['stored']:,}",
                     f"{pc['stored'] / pd_['stored']:.3f}"))
        sd, sc = ed["storage"], ec["storage"]
        rows.append(("stored MB (model)", f"{sd['stored_bytes_model'] / 1e6:.3f}",
                     f"{sc['stored_bytes_model'] / 1e6:.3f}",
                     f"{sc['stored_bytes_model'] / sd['stored_bytes_model']:.3f}"))
        rows.append(("compression rate (layers)", "0.0000", f"{sc['compression_rate_layers']:.4f}", "-"))
        rows.append(("compression rate (model)", "0.0000", f"{sc['compression_rate_model']:.4f}", "-"))
        md, mc = ed.get("memory", {}), ec.get("memory", {})
        if "resident_bytes" in md and "resident_bytes" in mc:
            rows.append(("resident MB (tensors held, loaded)", f"{md['resident_bytes'] / 1e6:.3f}",
                         f"{mc['resident_bytes'] / 1e6:.3f}", f"{mc['resident_bytes'] / md['resident_bytes']:.3f}"))
        inference = results.get("inference") or {}
        same = results["efficiency"].get(f"dense {inference.get('dtype')}") or {}
        where = "CPU latency" if ed["device"] == "cpu" else "latency"
        for bs in ed["per_batch_size"]:
            ld = ed["per_batch_size"][bs]["latency"]["median_ms"]
            lc = ec["per_batch_size"][bs]["latency"]["median_ms"]
            rows.append((f"{where} bs={bs} (ms, median)", f"{ld:.2f}", f"{lc:.2f}", f"{lc / ld:.3f}"))
            if bs in same.get("per_batch_size", {}):
                ls = same["per_batch_size"][bs]["latency"]["median_ms"]
                rows.append((f"{where} bs={bs}, dense in {inference['dtype']}", f"{ls:.2f}", f"{lc:.2f}",
                             f"{lc / ls:.3f}"))
            fd = ed["per_batch_size"][bs]["flops"]["dense_flops"]
            fs = ec["per_batch_size"][bs]["flops"]["sparsity_aware_flops"]
            rows.append((f"GFLOPs bs={bs} (sparsity-aware)", f"{fd / 1e9:.4f}", f"{fs / 1e9:.4f}", f"{fs / fd:.3f}"))
    for tower, t in (results.get("towers") or {}).items():
        if not t.get("compressed_layers"):
            continue
        d, c = t["dense_bytes"], t["stored_bytes"]
        rows.append((f"stored MB, {tower} tower ({t['compressed_layers']} layers compressed)", f"{d / 1e6:.3f}",
                     f"{c / 1e6:.3f}", f"{c / d:.3f}" if d else "-"))
        if "agreement_alone" in t:
            rows.append((f"output agreement, only the {tower} tower compressed", "1.0000",
                         f"{t['agreement_alone']:.4f}", f"{t['agreement_alone']:.3f}"))
    inference = results.get("inference") or {}
    if inference.get("tried"):
        rows.append(("compute dtype (measured: " + ", ".join(inference["tried"]) + ")", "float32",
                     inference["dtype"], "-"))
    kernels = results.get("execution_kernels")
    if kernels:
        rows.append(("inference kernels (compressed layers)", "dense", ", ".join(f"{k} {v}" for k, v in
                                                                                sorted(kernels.items())), "-"))
    return rows


def results_table_markdown(results: dict[str, Any]) -> str:
    """The final table as markdown."""
    lines = [f"# {results['model']}: dense vs compressed ({' -> '.join(results['stages'])})", ""]
    if results.get("outcome"):
        lines += [f"**{outcome_sentence(results['outcome'])}**", ""]
    lines += ["| metric | dense | compressed | compressed/dense |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(results)]
    if results.get("stopped_early") and not results.get("outcome"):  # results written before the outcome block
        failed = next((r for r in step_records(results["records"]) if not r.passed), None)
        if failed:
            why = failed.error or (f"retention {failed.retention:.4f}" if failed.retention is not None
                                   else "an unmeasured gate")
            lines += ["", f"The validation gate stopped step {failed.step} ({failed.stage}, round "
                          f"{failed.round}) at {why}; the model went back to the smallest passing state."]
    return "\n".join(lines) + "\n"
