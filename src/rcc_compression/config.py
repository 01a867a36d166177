"""Typed configuration: pydantic models, YAML ``inherit``/``override``, and ``--set`` overrides.

A configuration is a YAML mapping with the sections ``experiment``, ``model``, ``dataset``,
``calibration``, ``compression``, ``training``, ``evaluation`` and ``tracking``; the nested layout,
with the other sections inside ``experiment:``, is read the same. Any mapping may carry
``inherit: path`` (or a list of paths, relative to the file; chains allowed, cycles refused) and
``override: {...}`` (deep-merged last). When an inherited file has the section's own key at its
top (``compression:`` inherited from inside ``compression:``) that section is taken. Every key
not known to the schema is refused; every error is one line naming the file, the key path, the
bad value and what is allowed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from .compression.registry import CompressionSection, validate_stage_config
from .errors import ConfigError, DataError
from .evaluation.suite import METRICS, canonical_benchmark, metric_of
from .tracking import TrackingConfig
from .training.settings import TrainingSection
from .utils.schema import KeyPath, StrictModel, error_line, fmt_path, short, show


# ----------------------------------------------------------------------------------- sections
class ExperimentSection(StrictModel):
    """Name, seed and where runs go."""

    name: str = Field("rcc", description="run name; run directories are <output_dir>/<name>-<time>")
    seed: int = Field(0, description="seeds Python, NumPy and torch, data order and calibration draws")
    deterministic: bool = Field(False, description="deterministic kernels (slower on GPU; bit-identical repeats)")
    output_dir: str = Field("runs", description="where run directories are created")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
                        description="auto: CUDA when available, else the CPU")


class ModelSection(StrictModel):
    """Which model to compress: a bundled short name, a local directory or a hub id."""

    name: str = Field("rcc-clip-world", description="bundled name, local Hugging Face directory or hub id")
    type: Literal["clip", "siglip", "blip", "blip_vqa", "llava"] | None = Field(
        None, description="model family; None: from its config")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype the weights load in")


class AugmentSection(StrictModel):
    """Augmentation of the training split (never of val, test or calibration data).

    A random resized crop and brightness/contrast jitter, batched on uint8 tensors; hue is never
    changed and images are flipped only with ``hflip`` (colour words and left/right are labels in
    many caption datasets). In distillation the teacher sees the same augmented images.
    """

    enabled: bool = Field(True, description="augment the training split")
    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.8, 1.0), description="range of the crop's area, as a fraction of the image")
    ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (0.9, 1.1), description="range of the crop's aspect ratio")
    brightness: float = Field(0.1, ge=0, lt=1, description="brightness factor drawn from 1 +- this")
    contrast: float = Field(0.1, ge=0, lt=1, description="contrast factor drawn from 1 +- this")
    hflip: bool = Field(False, description="flip half the images left-right")


class DatasetSection(StrictModel):
    """The data of a run: train, validation and test splits, and how they are loaded.

    Each split is a dataset spec (a path whose format is detected, ``hf:NAME`` or a saved
    Hugging Face dataset, ``world[:PART]``, or a known name under ``root``) read at the split of
    its key, or at ``SPEC@SPLIT``. ``train`` feeds recovery training; ``val`` is evaluated during
    training (the best model is kept) and holds out the compression gate's batches; ``test`` is
    what ``rcc evaluate`` and the end of ``rcc compress`` measure when ``evaluation.datasets`` is
    empty. No image may be in both a training and a held-out split (``leak_check``).
    """

    train: str | None = Field(None, description="training split: SPEC or SPEC@SPLIT")
    val: str | None = Field(None, description="validation split: SPEC or SPEC@SPLIT")
    test: str | None = Field(None, description="test split: SPEC or SPEC@SPLIT")
    root: str | None = Field(None, description="directory of the known names (default $RCC_DATA_ROOT)")
    task: Literal["captions", "classification", "vqa"] | None = Field(
        None, description="which part of a directory holding several formats to read")
    batch_size: int = Field(64, ge=1, description="batch size of the val and test loaders")
    num_workers: int = Field(0, ge=0, description="loader worker processes (0: load in the main process)")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker loads ahead")
    max_tokens: int | None = Field(
        None, ge=1, description="token budget per training batch (items x longest text): variable batch sizes")
    bucket_by_length: bool = Field(True, description="batch training items of similar text length together")
    augment: AugmentSection = Field(default_factory=AugmentSection)
    leak_check: Literal["auto", "content", "path", "off"] = Field(
        "auto", description="how images are compared across splits: pixels, file paths, or not at all")
    cache_dir: str | None = Field(None, description="directory of preprocessed-image caches (uint8 safetensors)")
    skip_bad: bool = Field(False, description="skip and count unreadable items instead of stopping")


class CalibrationSection(StrictModel):
    """Calibration batches for the stages and the validation gate.

    ``source`` is ``synthetic`` (random inputs shaped for the model; no data needed), or a
    dataset name or path the data layer understands. ``holdout_batches`` of them are kept apart
    for the gate.
    """

    source: str = Field("synthetic", description="synthetic, world, or a dataset SPEC[@SPLIT] (its train split "
                        "by default)")
    num_batches: int = Field(8, ge=1, description="batches the stages fit on")
    batch_size: int = Field(16, ge=1, description="items per calibration batch")
    holdout_batches: int = Field(2, ge=0, description="batches held out for the validation gate (from dataset.val "
                                 "when it is set)")
    preserve_source: str | None = Field(None, description="alphaedit closed_form: data whose outputs must not move")
    allow_unpaired: bool = Field(False, description="let a model that calibrates on image-text pairs (SigLIP, LLaVA) "
                                 "calibrate on synthetic noise or on batches without images")


class EvaluationSection(StrictModel):
    """What a run measures: benchmarks on datasets, and the metrics reported.

    ``benchmarks`` (``zero_shot``, ``retrieval`` alias ``image_text_retrieval``, ``captioning``,
    ``vqa``, ``efficiency``) run on ``datasets`` (names as ``rcc evaluate -d``; empty: the world).
    ``metrics`` names what is measured: ``accuracy`` (zero_shot, vqa), ``retrieval`` (recall@K),
    ``captioning`` (CIDEr, BLEU, ...) and ``efficiency`` (stored size, latency and FLOPs, dense vs
    compressed). Left out (``None``), it is what the benchmarks measure, and ``rcc compress`` adds
    efficiency; given, it must agree with ``benchmarks`` both ways, and ``efficiency`` in it is what
    makes ``rcc compress`` profile and ``rcc evaluate`` run the efficiency benchmark.
    """

    benchmarks: list[str] = Field(default_factory=lambda: ["zero_shot", "retrieval"],
                                  description="zero_shot, retrieval, captioning, vqa, efficiency")
    datasets: list[str] = Field(default_factory=list, description="dataset specs to evaluate on (SPEC[@SPLIT], "
                                "test split by default), besides dataset.test; neither set: the world")
    metrics: list[str] | None = Field(None, description="accuracy, retrieval, captioning, efficiency; "
                                                        "None: what the benchmarks measure")
    batch_size: int = Field(64, ge=1, description="evaluation batch size")
    bootstrap_samples: int = Field(1000, ge=0, description="bootstrap resamples per metric (0: point estimates)")

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks(cls, v: list[str]) -> list[str]:
        try:
            return list(dict.fromkeys(canonical_benchmark(b) for b in v))
        except DataError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return None
        bad = [m for m in v if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric {bad[0]!r}; allowed: {', '.join(METRICS)}")
        benchmarks = info.data.get("benchmarks")
        if benchmarks is None:  # benchmarks failed validation: that error is reported
            return v
        for b in benchmarks:
            if metric_of(b) not in v:
                raise ValueError(f"benchmark {b} measures {metric_of(b)}, which evaluation.metrics leaves out: "
                                 f"add {metric_of(b)} or drop {b} from evaluation.benchmarks")
        for m in v:
            if m != "efficiency" and not set(METRICS[m]) & set(benchmarks):
                raise ValueError(f"metric {m}: no benchmark measures it ({', '.join(METRICS[m])}) in "
                                 f"evaluation.benchmarks {benchmarks}")
        return list(dict.fromkeys(v))

    def measures(self) -> list[str]:
        """The metrics this run measures (``metrics``, or the benchmarks' plus efficiency)."""
        if self.metrics is not None:
            return list(self.metrics)
        wanted = {metric_of(b) for b in self.benchmarks} | {"efficiency"}
        return [m for m in METRICS if m in wanted]


class InferenceSection(StrictModel):
    """How the compressed model runs once compressed (timed, evaluated, saved for serving).

    Every compressed layer is put in its inference form (it holds what its checkpoint stores);
    ``dtype`` is its compute dtype (``auto``: the fastest of float32 and, where the device runs it,
    bfloat16, among those whose outputs on the holdout keep the gate's threshold); ``kernels`` is
    ``fastest`` (each layer's fastest execution kernel, the layers holding at most ``max_held`` times
    their stored bytes) or ``memory`` (only kernels that hold nothing beyond the stored form).
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype: auto (measured), float32, bfloat16 or float16")
    kernels: Literal["fastest", "memory"] = Field(
        "fastest", description="fastest: by latency, within max_held; memory: nothing held beyond the stored form")
    max_held: float = Field(
        1.1, ge=1.0, description="fastest: the compressed layers hold at most this multiple of their stored bytes "
                                 "(kernels' decoded copies included)")


class RCCConfig(StrictModel):
    """The whole configuration of a run."""

    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    model: ModelSection = Field(default_factory=ModelSection)
    dataset: DatasetSection = Field(default_factory=DatasetSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    compression: CompressionSection = Field(default_factory=CompressionSection)  # type: ignore[valid-type]
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# ------------------------------------------------------------------------------ YAML loading
_DIRECTIVES = ("inherit", "override")
#: deeper mappings than this are refused (a YAML alias can make a mapping contain itself)
MAX_DEPTH = 32


def _why(exc: Exception) -> str:
    """The reason of an OS or value error without the (possibly huge) file name it carries."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return show(" ".join(text.split()))


def _read_yaml(path: Path, origin: str | None) -> Any:
    where = f" (inherited from {show(origin)})" if origin else ""
    name = show(path)
    try:
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
    except (OSError, ValueError) as exc:  # a name too long, an embedded NUL
        raise ConfigError(f"config error: {name}: cannot use this path: {_why(exc)}{where}") from None
    if not exists:
        raise ConfigError(f"config error: {name}: file not found{where}")
    if is_dir:
        raise ConfigError(f"config error: {name}: is a directory, expected a YAML file{where}")
    if not is_file:
        raise ConfigError(f"config error: {name}: not a regular file, expected a YAML file{where}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config error: {name}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"config error: {name}: cannot read: {_why(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config error: {name}:{line} YAML syntax error: {' '.join(problem.split())}") from None
    except RecursionError:
        raise ConfigError(f"config error: {name}: YAML nested too deeply") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise ConfigError(f"config error: {name}: YAML value error: {' '.join(str(exc).split())[:200]}") from None
    if data is None:
        raise ConfigError(f"config error: {name}: file is empty, expected a mapping of sections")
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {name}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, dprov: dict, src: Mapping, sprov: Mapping, prefix: KeyPath) -> None:
    """Deep-merge ``src`` into ``dst`` (in place); provenance follows the winning values."""
    for key, value in src.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], dprov, value, sprov, path)
            continue
        for p in [p for p in dprov if p[: len(path)] == path]:
            del dprov[p]
        dst[key] = copy.deepcopy(value)
        for p, f in sprov.items():
            if p[: len(path)] == path:
                dprov[p] = f


#: sections that may also sit inside ``experiment:`` (the nested layout of docs/guides/compress-your-model.md)
NESTABLE = ("model", "dataset", "calibration", "compression", "training", "evaluation", "tracking")


class _Loader:
    def __init__(self) -> None:
        self.cache: dict[Path, tuple[dict, dict]] = {}
        #: file -> the sections it nests under ``experiment:`` (to name keys as the file spells them)
        self.nested: dict[str, set[str]] = {}

    def unnest(self, raw: dict, file: str) -> dict:
        """The nested layout (sections inside ``experiment:``) as the flat one.

        A section given both inside ``experiment:`` and at the top of one file is refused.
        """
        exp = raw.get("experiment")
        inner = [k for k in NESTABLE if isinstance(exp, dict) and k in exp]
        if not inner:
            return raw
        twice = [k for k in inner if k in raw]
        if twice:
            raise ConfigError(f"config error: {show(file)}: experiment.{twice[0]} and {twice[0]}: the section is given "
                              f"twice (inside experiment, as in the nested layout, and at the top level); "
                              f"keep one")
        out = {k: v for k, v in raw.items() if k != "experiment"}
        out["experiment"] = {k: v for k, v in exp.items() if k not in inner}
        out.update({k: exp[k] for k in inner})
        self.nested.setdefault(file, set()).update(inner)
        return out

    def rename(self, path: KeyPath, file: str) -> KeyPath:
        """``path`` as ``file`` spells it: ``experiment.model.name`` where the file nests the section."""
        return ("experiment", *path) if path and path[0] in self.nested.get(file, ()) else path

    def load_file(self, path: Path, stack: tuple[Path, ...], origin: str | None = None) -> tuple[dict, dict]:
        try:
            path = path.resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL in the name, a symlink loop
            raise ConfigError(f"config error: {show(path)}: cannot use this path: {_why(exc)}") from None
        if path in stack:
            chain = " -> ".join(show(p.name) for p in (*stack, path))
            raise ConfigError(f"config error: {show(stack[-1])}: inherit: cycle {chain}; remove one of these inherits")
        if path in self.cache:
            return copy.deepcopy(self.cache[path][0]), dict(self.cache[path][1])
        raw = self.unnest(_read_yaml(path, origin), str(path))
        data, prov = self.resolve(raw, path, (), (*stack, path))
        self.cache[path] = (copy.deepcopy(data), dict(prov))
        return data, prov

    def resolve(self, node: dict, file: Path, kp: KeyPath, stack: tuple[Path, ...]) -> tuple[dict, dict]:
        out: dict = {}
        prov: dict[KeyPath, str] = {}
        if len(kp) > MAX_DEPTH:
            raise ConfigError(f"config error: {show(file)}: {show(fmt_path(kp[:4]))}...: nested too deeply "
                              f"(more than {MAX_DEPTH} levels; does a YAML alias refer to itself?)")
        if "inherit" in node:
            parents = node["inherit"]
            parents = [parents] if isinstance(parents, str) else parents
            if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
                raise ConfigError(
                    f"config error: {show(file)}: {fmt_path((*kp, 'inherit'))}: expected a path or a list of paths, "
                    f"got {short(node['inherit'])}"
                )
            for rel in parents:
                try:
                    target = (file.parent / os.path.expanduser(rel)).resolve()
                except (OSError, ValueError, RuntimeError) as exc:
                    raise ConfigError(f"config error: {show(file)}: {fmt_path((*kp, 'inherit'))}: cannot use path "
                                      f"{short(rel)}: {_why(exc)}") from None
                doc, dprov = self.load_file(target, stack, origin=f"{file}: {fmt_path((*kp, 'inherit'))}")
                if kp and isinstance(doc.get(kp[-1]), dict):
                    sub = doc[kp[-1]]
                    sprov = {(*kp, *p[1:]): f for p, f in dprov.items() if p[:1] == (kp[-1],)}
                else:
                    sub, sprov = doc, {(*kp, *p): f for p, f in dprov.items()}
                _merge(out, prov, sub, sprov, kp)
        for key, value in node.items():
            if key in _DIRECTIVES:
                continue
            if not isinstance(key, str):
                raise ConfigError(f"config error: {show(file)}: {fmt_path(kp)}: keys must be strings, "
                                  f"got {short(key)}")
            path = (*kp, key)
            if isinstance(value, dict):
                sub, sprov = self.resolve(value, file, path, stack)
                _merge(out, prov, {key: sub}, sprov, kp)
            else:
                _merge(out, prov, {key: value}, {path: str(file)}, kp)
        if "override" in node:
            ov = node["override"]
            if not isinstance(ov, dict):
                raise ConfigError(
                    f"config error: {show(file)}: {fmt_path((*kp, 'override'))}: expected a mapping, got {short(ov)}"
                )
            sub, sprov = self.resolve(ov, file, kp, stack)
            _merge(out, prov, sub, sprov, kp)
        return out, prov


def parse_set(item: str) -> tuple[KeyPath, Any]:
    """Parse one ``key.path=value`` override; the value is read as YAML (typed)."""
    if "=" not in item:
        raise ConfigError(f"config error: --set {short(item)}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"config error: --set {short(item)}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):
        value = raw
    except RecursionError:
        raise ConfigError(f"config error: --set {short(item)}: value nested too deeply") from None
    return tuple(key.split(".")), value


def nest_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys (as ``--set`` takes them) as a config mapping: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _apply_set(data: dict, prov: dict, path: KeyPath, value: Any) -> None:
    node = data
    for i, p in enumerate(path[:-1]):
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            if nxt is not None:
                raise ConfigError(f"config error: --set: {fmt_path(path[: i + 1])} is not a mapping ({short(nxt)})")
            nxt = node[p] = {}
        node = nxt
    _merge(node, prov, {path[-1]: value}, {path: "--set"}, path[:-1])


def validate_config(
    data: Mapping[str, Any], prov: Mapping[KeyPath, str] | None = None, source: str = "<dict>",
    rename: Callable[[KeyPath, str], KeyPath] | None = None,
) -> RCCConfig:
    """Validate a plain mapping into :class:`RCCConfig`, raising a one-line :class:`ConfigError`."""
    try:
        return RCCConfig.model_validate(dict(data))
    except ValidationError as exc:
        errors = exc.errors()
        line = error_line(errors[0], prov or {}, source, RCCConfig, rename=rename)
        if len(errors) > 1:
            line += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        raise ConfigError(line) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> RCCConfig:
    """Load, resolve and validate a configuration.

    ``path`` is a YAML file (``None``: defaults only); ``data`` an optional mapping merged on top
    (as if it were a file); ``overrides`` are ``key.path=value`` strings applied last.
    """
    merged: dict = {}
    prov: dict[KeyPath, str] = {}
    source = "<defaults>"
    loader = _Loader()
    if path is not None:
        source = str(Path(path))
        merged, prov = loader.load_file(Path(path), ())
    if data is not None:
        sub, sprov = loader.resolve(loader.unnest(dict(data), "<dict>"), Path.cwd() / "<dict>", (), ())
        _merge(merged, prov, sub, {k: "<dict>" for k in sprov}, ())
    for item in overrides:
        key, value = parse_set(item)
        _apply_set(merged, prov, key, value)
    return validate_config(merged, prov, source, loader.rename)


def dump_config(cfg: RCCConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain JSON/YAML-able data."""
    return cfg.model_dump(mode="json")


__all__ = [
    "CalibrationSection", "CompressionSection", "DatasetSection", "EvaluationSection", "ExperimentSection",
    "ModelSection", "RCCConfig", "TrainingSection", "dump_config", "load_config", "parse_set",
    "validate_config", "validate_stage_config",
]
