"""The ``rcc`` command line (Typer). One thin function per subcommand; the work lives in the library.

Every command takes ``-v``/``-q``; bad input (config, model name, data) prints one line and exits
with status 2. ``main(argv)`` runs the app in-process, which is how the tests call it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import CheckpointError, ConfigError, EvaluationError, RCCError
from .utils.progress import progress_bar


def _value_names(command: Any, ctx: Any) -> None:
    """What an option's help shows as its value: nothing for a flag or a counter (Typer would print ``<bool>``,
    ``<int>``), the item type for a repeatable option (not ``<list[str]>``)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is None or getattr(param, "metavar", None) is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif getattr(param, "multiple", False) or param.nargs != 1:
            item = param.display_type(ctx).replace("<list[", "<").replace("]>", ">")
            if isinstance(param, typer.core.TyperArgument):  # NAME... and the item type, each in its column
                param.metavar = param.name.upper()
                param.display_type_rich = lambda ctx, item=item: item
            else:
                param.metavar = item


class _Group(typer.core.TyperGroup):
    """Commands whose ``--help`` names each option's value plainly (:func:`_value_names`)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _value_names(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _value_names(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
    name="rcc",
    help="Recursive cascade compression of vision-language models (CLIP, BLIP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                      help="More log output (-v: the step log, -vv: debug).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set compression.dare.pruning_rate=0.95"),
]


def _verbosity(verbose: int, quiet: bool) -> int:
    return -1 if quiet else verbose


def _overrides(sets: list[str] | None, model: str | None, seed: int | None) -> list[str]:
    """``--set`` items plus the ``--model``/``--seed`` shortcuts (which win, being last)."""
    out = list(sets or [])
    if model is not None:
        out.append(f"model.name={model}")
    if seed is not None:
        out.append(f"experiment.seed={seed}")
    return out


@app.command()
def info() -> None:
    """Version, bundled models, and the compute device."""
    import torch

    from .models.registry import BUNDLED
    from .models.tiny import TINY_MODELS

    typer.echo(f"rcc-compression {__version__}")
    typer.echo(f"torch {torch.__version__}; cuda: {torch.cuda.is_available()}")
    typer.echo(f"bundled models: {', '.join(sorted(BUNDLED)) or 'none'}")
    typer.echo(f"tiny test models: {', '.join(TINY_MODELS)}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Resolve a config (inherit, override, --set), validate it, and print it as YAML."""
    import yaml

    from .config import dump_config, load_config

    cfg = load_config(config, set_ or [])
    typer.echo(yaml.safe_dump(dump_config(cfg), sort_keys=False), nl=False)


@app.command()
def compress(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, directory or hub id.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run directory.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue an interrupted run directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty run directory.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Overrides experiment.seed.")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip quality and efficiency evaluation.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Compress nothing: print every Linear layer with its tower, the pattern that selected or "
                          "excluded it, and its planned format and bytes (with --output: also dry_run.json there).",
    )] = False,
    encrypt: Annotated[bool, typer.Option(
        "--encrypt", help="Encrypt the checkpoints (AES-256-GCM); the key comes from RCC_CHECKPOINT_KEY or --key-file.",
    )] = False,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="File with the 32-byte key (64 hex digits, base64 or raw bytes); implies --encrypt.",
    )] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Compress a model through the configured cascade and print dense vs compressed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .config import dump_config, load_config
    from .jobs.common import checkpoint_key, prepare_run_dir
    from .jobs.compress import outcome_sentence, run_compress, summary_rows
    from .jobs.compress_sequential import run_compress_sequential
    from .jobs.sequential import choose_pipeline, resumed_pipeline
    from .utils.io import directory_lock
    from .utils.logging import console as new_console
    from .utils.logging import setup_logging
    from .utils.runs import RunRecord, new_run_dir

    sets = _overrides(set_, model, seed)
    if dry_run:
        _dry_run(load_config(config, sets), output, verbose, quiet)
        return
    if resume is not None:
        if config is not None or sets:
            raise typer.BadParameter("--resume takes the run's own config; drop --config/--set/--model/--seed")
        cfg_file = resume / "config.yaml"
        if not cfg_file.is_file():
            raise CheckpointError(f"{resume}: not a run directory (no config.yaml)")
        cfg = load_config(cfg_file)
        key = checkpoint_key(encrypt, key_file, resume)
        run_dir = resume
        no_eval = no_eval or _recorded_no_eval(resume)  # a run started with --no-eval resumes without it too
    else:
        cfg = load_config(config, sets)
        key = checkpoint_key(encrypt, key_file)
        run_dir = prepare_run_dir(output, overwrite, False) if output else new_run_dir(
            cfg.experiment.output_dir, cfg.experiment.name)
    run_lock = contextlib.ExitStack()  # held before anything is written: one process per run directory
    run_lock.enter_context(directory_lock(run_dir))
    setup_logging(_verbosity(verbose, quiet), run_dir, default=logging.WARNING)  # the step log: run.log, or -v
    console = new_console(stderr=True, quiet=quiet)
    with run_lock, RunRecord(run_dir, dump_config(cfg), cfg.experiment.seed) as record, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:
        if key is not None:
            record.update(encrypted=True)
        record.update(options={"no_eval": no_eval})
        steps = bar.add_task("cascade steps", total=None)
        layers = bar.add_task("layers", total=None)

        def on_layer(what: str, done: int, total: int) -> None:
            bar.update(layers, description=what[:60], completed=done, total=total)

        def on_step(rec: dict) -> None:
            bar.update(steps, advance=1, description=f"step {rec['step'] + 1}: {rec['stage']} round {rec['round']}")

        chosen = (resumed_pipeline(run_dir) if resume is not None
                  else choose_pipeline(cfg.model.name, cfg.compression.cascade.pipeline, cfg))
        record.update(pipeline={"name": chosen.name, "why": chosen.why})
        if chosen.name == "sequential":  # a block at a time: the bar shows each block's time and peak memory
            results = run_compress_sequential(cfg, run_dir, chosen, resume=resume is not None, progress=on_layer,
                                              evaluate=not no_eval, encrypt_key=key)
        else:
            results = run_compress(cfg, run_dir, resume=resume is not None, progress=on_layer,
                                   step_callback=on_step, evaluate=not no_eval, encrypt_key=key)
        record.update(results={"stopped_early": results["stopped_early"], "gate": results["gate"],
                               "quality": results["quality"], "outcome": results["outcome"]})
    outcome = results["outcome"]
    table = Table(title=f"{cfg.model.name}: dense vs compressed ({' -> '.join(results['stages'])})"
                        + ("" if outcome["status"] == "met" else f" [bold red]{outcome['status'].upper()}[/]"))
    for col, just in (("metric", "left"), ("dense", "right"), ("compressed", "right"), ("compressed/dense", "right")):
        table.add_column(col, justify=just)
    for row in summary_rows(results):
        table.add_row(*row)
    new_console(width=max(new_console().width, 110)).print(table)
    typer.secho(outcome_sentence(outcome), fg=None if outcome["status"] == "met" else typer.colors.YELLOW, bold=True,
                color=sys.stdout.isatty())
    typer.echo(f"run directory: {run_dir}")


def _dry_run(cfg: Any, output: Path | None, verbose: int, quiet: bool) -> None:
    from .compression.dryrun import format_report
    from .jobs.compress import dry_run
    from .utils.io import atomic_write_json
    from .utils.logging import setup_logging

    setup_logging(_verbosity(verbose, quiet))
    report = dry_run(cfg)
    typer.echo(format_report(report), nl=False)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output / "dry_run.json", report)
        typer.echo(f"written to {output / 'dry_run.json'}")


def _recorded_no_eval(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` was started with ``--no-eval`` (its ``run.json`` says so)."""
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    options = record.get("options") if isinstance(record, dict) else None
    return bool(options.get("no_eval")) if isinstance(options, dict) else False


@app.command()
def train(
    source: Annotated[
        Path | None, typer.Option("--from", "-f", help="Compressed run directory (or checkpoint) to recover."),
    ] = None,
    reference: Annotated[
        str | None, typer.Option("--reference", help="Train a reference model instead: clip, blip or llava."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run directory (--reference: model directory)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoints/last.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty run directory.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Overrides experiment.seed.")] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Training data: SPEC[@SPLIT] (sets dataset.train)."),
    ] = None,
    val: Annotated[
        str | None, typer.Option("--val", help="Validation data: SPEC[@SPLIT] (sets dataset.val)."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimiser steps (sets training.max_steps).")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Passes over the data (sets training.num_epochs)."),
    ] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Recovery fine-tuning: distil a compressed model from its dense model; save a new compressed checkpoint.

    Without --config the compressed run's own config is used. Runs data-parallel under torchrun.

    With --reference clip|blip it trains a bundled-style reference model on the world instead, as
    `rcc world train-reference` does (that command also takes the world, time budget and steps).
    """
    from .config import load_config
    from .jobs.train import resolve_source, train_job

    if (source is None) == (reference is None):
        raise ConfigError("rcc train: give exactly one of --from RUN_DIR (recovery) or --reference clip|blip")
    if reference is not None:
        if output is None:
            raise ConfigError("rcc train --reference: --output DIR (the model directory to write) is required")
        if data is not None or val is not None or epochs is not None or resume or overwrite:
            raise ConfigError("rcc train --reference trains on the world it generates; it takes --output, --steps, "
                              "--seed, --config and --set (not --data, --val, --epochs, --resume, --overwrite)")
        overrides = _reference_overrides(config, set_, steps, seed)
        _train_reference(reference, output, None, overrides.get("seed", 0), 20.0, overrides.get("steps"),
                         verbose, quiet, overrides)
        return
    sets = _overrides(set_, None, seed)
    for key, value in (("dataset.train", data), ("dataset.val", val), ("training.max_steps", steps),
                       ("training.num_epochs", epochs)):
        if value is not None:
            sets.append(f"{key}={value}")
    cfg = load_config(config, sets) if config is not None else load_config(None, sets, data=resolve_source(source)[1])
    run_dir, results = train_job(cfg, source, output, resume, overwrite, _verbosity(verbose, quiet), not quiet)
    if results is None:  # not rank 0 of a torchrun group
        return
    for key in ("val_loss", "val_agreement"):
        if key in results["before"]:
            typer.echo(f"{key}: {results['before'][key]:.5f} -> {results['after'][key]:.5f}")
    private = results.get("privacy")
    if private:
        typer.echo(f"privacy: epsilon {private['epsilon_spent']:.3f} of {private['epsilon_budget']:g} spent "
                   f"(delta {private['delta']:g}), {private['steps']} steps at noise multiplier "
                   f"{private['noise_multiplier']:.3f}" + (f"; {private['stopped']}" if private["stopped"] else ""))
    typer.echo(f"run directory: {run_dir}")


#: the config keys ``rcc train --reference`` honours, and the recipe fields they set
REFERENCE_KEYS = {"training.max_steps": "steps", "training.learning_rate": "lr", "training.batch_size": "batch_size",
                  "training.weight_decay": "weight_decay", "training.warmup_steps": "warmup",
                  "experiment.seed": "seed"}


def _reference_overrides(config: Path | None, sets: list[str] | None, steps: int | None, seed: int | None
                         ) -> dict[str, Any]:
    """Recipe fields from --config (its keys that differ from the defaults), --set and --steps/--seed (last wins).

    Only the keys of :data:`REFERENCE_KEYS` mean something for a reference model; any other key a
    user sets is refused (not silently ignored).
    """
    from .config import dump_config, load_config

    def flat(d: dict[str, Any], pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    defaults = flat(dump_config(load_config(None)))
    chosen = {k: v for k, v in flat(dump_config(load_config(config))).items() if defaults.get(k) != v} if config else {}
    for item in sets or []:
        key = item.partition("=")[0].strip()
        chosen[key] = flat(dump_config(load_config(config, [item])))[key] if key in defaults else None
    unknown = sorted(k for k in chosen if k not in REFERENCE_KEYS and not k.startswith("experiment.name"))
    if unknown:
        raise ConfigError(f"rcc train --reference: {', '.join(unknown)} do not apply to a reference model; it "
                          f"honours {', '.join(REFERENCE_KEYS)} (--steps and --seed set the first and last)")
    out = {REFERENCE_KEYS[k]: v for k, v in chosen.items() if k in REFERENCE_KEYS and v is not None}
    out.update({k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None})
    return out


def _train_reference(kind: str, out: Path, world: Path | None, seed: int, minutes: float, steps: int | None,
                     verbose: int, quiet: bool, overrides: dict[str, Any] | None = None) -> None:
    from .jobs.reference import train_reference
    from .utils.logging import setup_logging

    if kind not in ("clip", "blip", "llava"):
        raise ConfigError(f"reference kind: got {kind!r}; allowed: clip, blip, llava")
    setup_logging(_verbosity(verbose, quiet), out)
    recipe = None
    if overrides:
        from dataclasses import replace

        from .jobs.reference import default_recipe

        recipe = replace(default_recipe(kind, seed), **overrides)
    record = train_reference(kind, out, world_dir=world, seed=seed, time_budget_s=minutes * 60, steps=steps,
                             progress=not quiet, recipe=recipe)
    for name, value in record["figures"].items():
        typer.echo(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    typer.echo(f"model written to {out}")


world_app = typer.Typer(cls=_Group, help="The reference world: generate it; train the bundled reference models on it.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


data_app = typer.Typer(cls=_Group, help="Datasets: anonymise a copy; write or check a manifest of file digests.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("anonymize")
def data_anonymize(
    spec: Annotated[str, typer.Argument(help="Dataset: a directory or file of any supported format, world, hf:NAME.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the anonymised copy into.")],
    entities: Annotated[
        str | None,
        typer.Option("--entities", help="Comma-separated Presidio entity types "
                     "(default: names, places, e-mails, phones, cards, IBANs, IPs)."),
    ] = None,
    nlp_model: Annotated[str, typer.Option("--nlp-model", help="spaCy pipeline for names and places; 'none': "
                                           "patterns and the capitalised-name heuristic only.")] = "en_core_web_sm",
    keep_faces: Annotated[bool, typer.Option("--keep-faces", help="Do not blur faces.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Copy a dataset with personal data removed from its texts, metadata from its images and faces blurred."""
    from .data.anonymize import DEFAULT_ENTITIES, REPORT_NAME, anonymize_dataset
    from .utils.logging import setup_logging

    setup_logging(_verbosity(verbose, quiet))
    wanted = tuple(e.strip() for e in entities.split(",") if e.strip()) if entities else DEFAULT_ENTITIES
    with _progress(quiet) as report:
        result = anonymize_dataset(spec, output, entities=wanted, nlp_model=None if nlp_model == "none" else nlp_model,
                                   blur_faces=not keep_faces, overwrite=overwrite, progress=report)
    text, images = result["text"], result["images"]
    replaced = ", ".join(f"{k} {v}" for k, v in text["replaced"].items()) or "none"
    typer.echo(f"texts: {text['texts_changed']} of {text['texts_scanned']} changed; replaced: {replaced} "
               f"({text['engine']})")
    removed = ", ".join(f"{k} {v}" for k, v in images["metadata_removed"].items()) or "none"
    typer.echo(f"images: {images['images']} rewritten; metadata removed: {removed}; faces blurred: "
               f"{images['faces_blurred']} in {images['images_with_faces']} image(s)")
    typer.echo(f"report: {Path(output) / REPORT_NAME}")


@data_app.command("manifest")
def data_manifest(
    root: Annotated[Path, typer.Argument(help="Dataset root directory.")],
    check: Annotated[bool, typer.Option("--check", help="Compare the files with the manifest instead.")] = False,
) -> None:
    """Write ROOT/rcc-manifest.json (sha256 of every file), or --check the files against it."""
    from .data.secure import MANIFEST_NAME, manifest_mismatches, write_manifest
    from .errors import DataError

    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if not check:
        manifest = write_manifest(root)
        typer.echo(f"{root / MANIFEST_NAME}: {len(manifest['files'])} files")
        return
    if not (root / MANIFEST_NAME).is_file():
        raise DataError(f"{root}: no {MANIFEST_NAME} to check against (write one with: rcc data manifest {root})")
    diff = manifest_mismatches(root)
    bad = {k: v for k, v in diff.items() if v}
    if bad:
        raise DataError(f"{root}: differs from its manifest: " + "; ".join(
            f"{k} {len(v)} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in bad.items()))
    typer.echo(f"{root}: every file matches {MANIFEST_NAME}")


@world_app.command("generate")
def world_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the world into.")],
    seed: Annotated[int, typer.Option("--seed", help="World seed (the bundled models use 0).")] = 0,
    splits: Annotated[str, typer.Option("--splits", help="Comma-separated splits to write.")] = "train,val,test",
    train: Annotated[int | None, typer.Option("--train", help="Caption scenes in train.")] = None,
    val: Annotated[int | None, typer.Option("--val", help="Caption scenes in val.")] = None,
    test: Annotated[int | None, typer.Option("--test", help="Caption scenes in test.")] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Write the reference world: captions (Karpathy json), class folders, VQA questions."""
    from .data.world import WorldSpec, generate_world
    from .utils.logging import setup_logging

    setup_logging(_verbosity(verbose, quiet))
    spec = WorldSpec(seed=seed, splits=tuple(s.strip() for s in splits.split(",") if s.strip()))
    for name, value in (("train", train), ("val", val), ("test", test)):
        if value is not None:
            setattr(spec, name, value)
    with _progress(quiet) as report:
        info = generate_world(out, spec, progress=report)
    typer.echo(f"world v{info['version']} seed {seed} written to {out} (splits: {', '.join(spec.splits)}; "
               f"{len(info['held_out_pairs'])} colour-shape pairs held out of training)")


@world_app.command("train-reference")
def world_train_reference(
    kind: Annotated[str, typer.Option("--kind", help="clip, blip or llava.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (Hugging Face layout).")],
    world: Annotated[Path | None, typer.Option("--world", help="A generated world (default: generate one).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="World and training seed.")] = 0,
    minutes: Annotated[float, typer.Option("--minutes", help="Wall-clock budget for training.")] = 20.0,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimiser steps (default: the recipe's).")] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Train the tiny reference CLIP or BLIP on the world's train split and record its test figures."""
    _train_reference(kind, out, world, seed, minutes, steps, verbose, quiet)


@app.command()
def evaluate(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, directory or hub id.")] = None,
    benchmark: Annotated[
        list[str] | None,
        typer.Option("--benchmark", "-b",
            help="zero_shot, retrieval, captioning, vqa, efficiency (repeatable)."),
    ] = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", "-d", help="world, a path, hf:NAME or a known name (repeatable)."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run directory for results.json/.md.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "test",
    bootstrap: Annotated[int | None, typer.Option("--bootstrap", help="Bootstrap resamples per metric.")] = None,
    max_items: Annotated[int | None, typer.Option("--max-items", help="Evaluate a seeded subset.")] = None,
    templates: Annotated[str | None, typer.Option("--templates", help="Prompt template set for zero-shot.")] = None,
    world_seed: Annotated[int | None, typer.Option("--world-seed", help="Seed of the reference world.")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip (and count) unreadable items.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Overrides experiment.seed.")] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Evaluate a model: every metric with a bootstrap 95 % CI, into results.json and results.md."""
    from .config import load_config
    from .evaluation.suite import results_table
    from .jobs.common import evaluation_datasets
    from .jobs.evaluate import check_datasets_exist, evaluate_job
    from .utils.logging import setup_logging
    from .utils.runs import new_run_dir

    sets = _overrides(set_, model, seed)
    if benchmark:  # exactly these benchmarks: they say what is measured
        sets += [f"evaluation.benchmarks={json.dumps(benchmark)}", "evaluation.metrics=null"]
    cfg = load_config(config, sets)
    ev = cfg.evaluation
    benchmarks = ev.benchmarks + (["efficiency"] if "efficiency" in (ev.metrics or ()) and
                                  "efficiency" not in ev.benchmarks else [])
    datasets = dataset or evaluation_datasets(cfg)
    check_datasets_exist(datasets, cfg.dataset.root)  # a missing dataset makes no run directory
    run_dir = output or new_run_dir(cfg.experiment.output_dir, "evaluate")
    setup_logging(_verbosity(verbose, quiet), run_dir)
    results = evaluate_job(
        cfg, run_dir, benchmarks=benchmarks, datasets=datasets,
        split=split, batch_size=ev.batch_size,
        bootstrap_samples=ev.bootstrap_samples if bootstrap is None else bootstrap, max_items=max_items,
        templates=templates, world_seed=world_seed, skip_bad=skip_bad or cfg.dataset.skip_bad,
        root=cfg.dataset.root, progress=not quiet,
    )
    if not quiet:
        typer.echo(results_table(results), nl=False)
    typer.echo(f"run directory: {run_dir}")
    if not results.get("results"):
        reasons = "; ".join(f"{s['benchmark']} on {s['dataset']}: {s['reason']}" for s in results.get("skipped", []))
        raise EvaluationError(f"no benchmark ran ({reasons or 'nothing selected'}); see {run_dir / 'results.md'}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (compress, evaluate or train runs).")],
    format_: Annotated[str, typer.Option("--format", "-f", help="md, csv, latex, json or html.")] = "md",
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="Keep metrics containing this text (repeatable)."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """A comparison table of runs: metrics with 95 % CIs, bytes, rate, latency, as in their results files."""
    from .utils.io import atomic_write_text
    from .visualization.records import is_run_dir, load_run
    from .visualization.report import FORMATS, comparison_rows, render

    if format_ not in FORMATS:
        raise ConfigError(f"rcc report --format: got {format_!r}; allowed: {', '.join(FORMATS)}")
    missing = [str(r) for r in runs if not is_run_dir(r)]
    if missing:
        raise ConfigError(f"rcc report: not a run directory (no run.json, results.json or progress.json): "
                          f"{', '.join(missing)}")
    records = [load_run(r) for r in runs]
    text = render(comparison_rows(records, metric), format_, records)
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        typer.echo(f"written to {output}")


@app.command()
def dashboard(
    runs: Annotated[Path, typer.Option("--runs", help="Directory of run directories.")] = Path("runs"),
    host: Annotated[str, typer.Option("--host", help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8501,
    refresh: Annotated[float, typer.Option("--refresh", help="Seconds between refreshes of a running job.")] = 2.0,
) -> None:
    """Serve the Streamlit dashboard over the runs in RUNS (it only reads them)."""
    from .visualization.dashboard import launch

    if not runs.is_dir():
        raise ConfigError(f"rcc dashboard --runs: {runs} is not a directory")
    raise typer.Exit(launch(runs, host, port, refresh))


@app.command()
def serve(
    sources: Annotated[
        list[str],
        typer.Argument(help="Compressed checkpoint, run or model directory, bundled name; NAME=DIR names it."),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    keys: Annotated[
        Path | None, typer.Option("--keys", help="API key file (hashes; make one with `rcc keys add`)."),
    ] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (loopback only).")] = False,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Key of encrypted checkpoints (else RCC_CHECKPOINT_KEY)."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Items per dynamic batch.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="Wait budget for a batch to fill.")] = 5.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Request timeout in seconds.")] = 30.0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch intra-op threads.")] = None,
    key_out: Annotated[
        Path | None,
        typer.Option("--key-out",
            help="Write the generated API key to FILE (mode 0600) instead of showing it on the terminal."),
    ] = None,
    allow_download: Annotated[
        bool,
        typer.Option("--allow-download",
            help="Let a source that is not bundled or local be fetched from the Hugging Face hub."),
    ] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Serve models over HTTP: embeddings, similarity, zero-shot (CLIP), captions and VQA (BLIP).

    Without --keys a key is generated: shown once on the terminal, or written to --key-out FILE;
    with standard output redirected (a log) --key-out or --keys is required.
    """
    from .serving.inputs import ServeLimits
    from .serving.server import run_server
    from .utils.crypto import load_key
    from .utils.logging import setup_logging

    setup_logging(_verbosity(verbose, quiet))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    run_server(list(sources), host, port, str(keys) if keys else None, no_auth, load_key(key_file),
               ServeLimits(request_timeout_s=timeout), max_batch, batch_wait_ms, echo=lambda s: typer.echo(s),
               key_out=str(key_out) if key_out else None, allow_download=allow_download)


@app.command("export")
def export_cmd(
    source: Annotated[
        str, typer.Argument(help="Compressed checkpoint, run directory, model directory or bundled name."),
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx (compression kept) or hf (dense Hugging Face)."),
    ] = "onnx",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory to write (default: SOURCE-onnx / SOURCE-hf)."),
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Key of an encrypted checkpoint (else RCC_CHECKPOINT_KEY)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the ONNX Runtime check against PyTorch."),
    ] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Export a model: ONNX with low-rank layers as two MatMuls and S in its compact encoding, or dense HF."""
    from .compression.export import export_model
    from .utils.crypto import load_key
    from .utils.logging import setup_logging

    setup_logging(_verbosity(verbose, quiet))
    out = output or Path(f"{Path(source).name}-{fmt}")
    s = export_model(source, out, fmt, load_key(key_file), overwrite, not no_verify)
    for name, rec in s.get("graphs", {}).items():
        diff = rec.get("max_abs_diff")
        typer.echo(f"{name}: max |ONNX Runtime - PyTorch| = {diff:.2e}" if diff is not None else f"{name}: not checked")
    line = f"wrote {s['output']} ({s['bytes']:,} bytes of {'ONNX' if fmt == 'onnx' else 'safetensors'})"
    if "checkpoint_bytes" in s:
        line += f"; the compressed checkpoint's tensors: {s['checkpoint_bytes']:,} bytes"
    typer.echo(line)


keys_app = typer.Typer(cls=_Group, help="API keys of the model server (the key file stores hashes only).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    file: Annotated[Path, typer.Argument(help="Key file (created if missing).")],
    key_id: Annotated[str, typer.Option("--id", help="A name for the key.")],
    models: Annotated[str, typer.Option("--models", help="Comma-separated model names the key may use, or '*'.")] = "*",
) -> None:
    """Make a new API key: print it once, store only its SHA-256 in FILE."""
    from .serving.auth import KeyStore

    store = KeyStore.load(file) if file.exists() else KeyStore()
    key = store.add(key_id, [m.strip() for m in models.split(",") if m.strip()])
    store.save(file)
    typer.echo(key)


@app.command()
def search(
    config: Annotated[Path, typer.Option("--config", "-c", help="Search file (YAML: base config, space, objectives).")],
    trials: Annotated[
        int | None, typer.Option("--trials", "-n", help="Finished trials the study needs (overrides study.trials)."),
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="sqlite:///PATH or postgresql://... (default: OUTPUT/study.db)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study name (overrides study.name); workers sharing it share trials."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Search directory (trials, reports).")] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Hyper-parameter search with Optuna: run this command on as many machines as you like with one --storage."""
    from .optimization.search import Search
    from .optimization.space import load_search_config
    from .utils.logging import setup_logging
    from .utils.runs import RunRecord, new_run_dir

    overrides = {k: v for k, v in (("study.trials", trials), ("study.name", study)) if v is not None}
    spec = load_search_config(config, overrides)
    out = output or new_run_dir("runs", f"search-{spec.study.name}")
    setup_logging(_verbosity(verbose, quiet), out)
    resolved = spec.model_dump(mode="json") | {"config": str(spec.base_path().resolve()) if spec.config else None}
    with RunRecord(out, resolved, spec.study.seed) as record, _progress(quiet) as report:
        result = Search(spec, out, storage=storage, progress=report).run()
        record.update(results={"counts": result["counts"], "best": result["best"] and result["best"]["number"]})
    typer.echo((out / "summary.md").read_text(encoding="utf-8"), nl=False)
    typer.echo(f"search directory: {out}")


def _study(kind: str, config: Path | None, set_: list[str] | None, model: str | None, seeds: int, rate: float | None,
           variants: Path | None, metric: list[str] | None, split: str, output: Path | None, resume: Path | None,
           overwrite: bool, verbose: int, quiet: bool, subsets: bool = True) -> None:
    """Shared body of ``rcc ablate`` and ``rcc order``."""
    from .config import load_config
    from .jobs.common import prepare_run_dir
    from .jobs.studies import StudySpec, load_variants, make_spec, run_study
    from .utils.logging import setup_logging
    from .utils.runs import RunRecord, new_run_dir

    if resume is not None:
        if config is not None or set_ or model or rate is not None or variants is not None:
            raise typer.BadParameter("--resume takes the study's own specification; drop the other options")
        spec_file = resume / "study.json"
        if not spec_file.is_file():
            raise CheckpointError(f"{resume}: not a study directory (no study.json)")
        import json

        spec = StudySpec.from_json(json.loads(spec_file.read_text(encoding="utf-8")))
        run_dir = resume
    else:
        sets = _overrides(set_, model, None)
        if rate is not None:
            sets.append(f"compression.cascade.target_rate={rate}")
        cfg = load_config(config, sets)
        spec = make_spec(kind, cfg, seeds, load_variants(variants) if variants else (), split, metric, subsets)
        run_dir = prepare_run_dir(output, overwrite, False) if output else new_run_dir(
            cfg.experiment.output_dir, f"{kind}-{cfg.experiment.name}")
    setup_logging(_verbosity(verbose, quiet), run_dir)
    with RunRecord(run_dir, spec.base, spec.seeds[0]) as record, _progress(quiet) as report:
        results = run_study(spec, run_dir, resume=resume is not None, progress=report)
        record.update(results={"rows": len(results["rows"]), "comparisons": results["comparisons"]})
    typer.echo((run_dir / "results.md").read_text(encoding="utf-8"), nl=False)
    typer.echo(f"study directory: {run_dir}")


SeedsOpt = Annotated[int, typer.Option("--seeds", help="Seeds per variant (experiment.seed, +1, ...).")]
RateOpt = Annotated[float | None, typer.Option("--rate", help="Compression rate every variant is planned to "
                                                                "(sets compression.cascade.target_rate).")]
VariantsOpt = Annotated[Path | None, typer.Option("--variants", help="YAML of named variants: "
                                                                      "{variants: {name: {config.key: value}}}.")]
MetricOpt = Annotated[list[str] | None, typer.Option("--metric", help="Metric key to report (repeatable).")]
SplitOpt = Annotated[str, typer.Option("--split", help="Evaluation split of the table.")]
StudyOut = Annotated[Path | None, typer.Option("--output", "-o", help="Study directory.")]
StudyResume = Annotated[Path | None, typer.Option("--resume", help="Continue an interrupted study directory.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty study directory.")]


@app.command()
def ablate(config: ConfigOpt = None, set_: SetOpt = None,
           model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, directory or hub id.")] = None,
           seeds: SeedsOpt = 3, rate: RateOpt = None, variants: VariantsOpt = None, metric: MetricOpt = None,
           split: SplitOpt = "test", output: StudyOut = None, resume: StudyResume = None,
           overwrite: OverwriteOpt = False,
           no_subsets: Annotated[
               bool, typer.Option("--no-subsets", help="Only the named variants against the config."),
           ] = False,
           verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Every subset of the stages (and named variants) at equal stored bytes over seeds, vs the full cascade."""
    _study("ablate", config, set_, model, seeds, rate, variants, metric, split, output, resume, overwrite, verbose,
           quiet, subsets=not no_subsets)


@app.command()
def order(config: ConfigOpt = None, set_: SetOpt = None,
          model: Annotated[str | None, typer.Option("--model", "-m", help="Model name, directory or hub id.")] = None,
          seeds: SeedsOpt = 3, rate: RateOpt = None, variants: VariantsOpt = None, metric: MetricOpt = None,
          split: SplitOpt = "test", output: StudyOut = None, resume: StudyResume = None,
          overwrite: OverwriteOpt = False, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Every order of the cascade's stages at equal stored bytes over seeds, vs the configured order."""
    _study("order", config, set_, model, seeds, rate, variants, metric, split, output, resume, overwrite, verbose,
           quiet)


@app.command()
def analyze(
    run: Annotated[Path, typer.Argument(help="A finished rcc compress run directory.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Report directory (default RUN/analysis)."),
    ] = None,
    part: Annotated[
        list[str] | None,
        typer.Option("--part",
            help="subspace, nullspace, sensitivity, embeddings (repeatable; default all)."),
    ] = None,
    against: Annotated[
        Path | None, typer.Option("--against", help="Another run of the same model: compare their subspaces."),
    ] = None,
    energy: Annotated[
        float, typer.Option("--energy", help="Spectral energy of the compared dominant subspaces."),
    ] = 0.9,
    embedding: Annotated[
        list[str] | None, typer.Option("--embedding", help="tsne, umap (repeatable; default both)."),
    ] = None,
    max_items: Annotated[int, typer.Option("--max-items", help="Test images in the embedding maps.")] = 512,
    layer: Annotated[
        list[str] | None, typer.Option("--layer", help="Layers for sensitivity (repeatable; default all compressed)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo parts already written.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Subspace, null-space, sensitivity and embedding reports of a compressed run (JSON, CSV, Markdown, figures)."""
    from .jobs.analyze import METHODS, PARTS, run_analyze
    from .utils.logging import setup_logging

    out = output or run / "analysis"
    setup_logging(_verbosity(verbose, quiet), out)
    with _progress(quiet) as report:
        run_analyze(run, out, part or PARTS, against, energy, methods=embedding or METHODS, max_items=max_items,
                    sensitivity_layers=layer, overwrite=overwrite, progress=report)
    typer.echo((out / "report.md").read_text(encoding="utf-8"), nl=False)
    typer.echo(f"analysis directory: {out}")


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar fed by ``report(stage, done, total)`` callbacks."""
    with progress_bar(not quiet) as report:
        yield report


#: Click's base exception, from Typer's public ``BadParameter`` (Typer may ship its own copy of Click)
_CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit status.

    Bad input (config, model, data: :class:`RCCError`) prints one line; a usage error (unknown
    option or command, missing or bad argument) prints Click's usage line and message. Both exit 2.
    """
    from .utils.runs import Terminated, terminate_gracefully

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with terminate_gracefully():  # SIGTERM unwinds: run.json records it, children stop, temp folders go
            app(args=args, prog_name="rcc", standalone_mode=False)
    except Terminated as exc:
        typer.echo(f"stopped: {exc}", err=True)
        return 128 + exc.signum
    except RCCError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except _CLICK_ERROR as exc:  # usage errors: the usage line and the message, as Click prints them
        if hasattr(exc, "ctx") and exc.ctx is None:  # raised by the option parser before the context existed
            exc.ctx = _context_of(args)
        exc.show()
        return int(exc.exit_code)
    return 0


def _context_of(args: Sequence[str]) -> Any:
    """A Click context of the (sub)command ``args`` name, for its usage line."""
    cmd, path = typer.main.get_command(app), ["rcc"]
    for token in args:
        sub = getattr(cmd, "commands", {}).get(token)
        if sub is None:
            break
        cmd, path = sub, [*path, token]
    return cmd.make_context(" ".join(path), [], resilient_parsing=True)


def _alias(command: str) -> int:
    return main([command, *sys.argv[1:]])


def compress_main() -> int:
    """``rcc-compress``: an alias of ``rcc compress`` (README, "Command line")."""
    return _alias("compress")


def evaluate_main() -> int:
    """``rcc-evaluate``: alias of ``rcc evaluate``."""
    return _alias("evaluate")


def train_main() -> int:
    """``rcc-train``: alias of ``rcc train``."""
    return _alias("train")
