"""The search file: a typed, validated YAML declaring what ``rcc search`` varies and optimises.

::

    config: ../experiments/demo.yaml          # the base experiment (relative to this file)
    set:                                      # fixed overrides of any config key
      compression.cascade.target_rate: 0.75
    space:                                    # what varies: ranges and choices of any config key
      compression.nullu.damping: {low: 1.0e-4, high: 0.1, log: true}
      compression.alphaedit.num_epochs: {low: 0, high: 8, step: 2}
      compression.dare.scorer: {choices: [magnitude, wanda]}
      compression.cascade.stages: {permutations_of: [dare, nullu, alphaedit]}
    objectives:                               # one (with constraints) or several (a Pareto front)
      - {metric: retention, direction: maximize}
    constraints: {max_stored_bytes: 400000}
    study: {name: clip-4x, trials: 30, sampler: tpe, pruner: median, seed: 0}
    evaluation: {split: val}

Every key of ``space`` and ``set`` must be a key of the experiment config, and every choice and
both ends of every range are validated by building the experiment config with that value, so a
search never starts with a value a trial would refuse. Errors are one line naming the search
file, the key and what is allowed, like the rest of the configuration.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..config import RCCConfig, load_config, nest_keys
from ..errors import ConfigError
from ..utils.schema import StrictModel

#: metrics a trial reports; ``retention:<metric key>`` and a task metric key are accepted too
TRIAL_METRICS = ("retention", "gate_retention", "stored_bytes", "compression_rate", "latency_ms")
_DIRECTIONS = {"retention": "maximize", "gate_retention": "maximize", "stored_bytes": "minimize",
               "compression_rate": "maximize", "latency_ms": "minimize"}


class ParamSpec(StrictModel):
    """One varied key: ``choices``, ``permutations_of`` (every order of a list), or a ``low``/``high`` range."""

    choices: list[Any] | None = None
    permutations_of: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_form(self) -> ParamSpec:
        forms = [self.choices is not None, self.permutations_of is not None,
                 self.low is not None or self.high is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of: choices, permutations_of, or low and high")
        if forms[2]:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is above high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("a log range takes no step")
        elif self.log or self.step is not None:
            raise ValueError("log and step apply to ranges only")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must not be empty")
        if self.permutations_of is not None and not 1 <= len(self.permutations_of) <= 6:
            raise ValueError("permutations_of takes 1 to 6 items")
        return self

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def options(self) -> list[Any]:
        """The discrete values (choices, permutations, or a stepped range's grid)."""
        if self.choices is not None:
            return list(self.choices)
        if self.permutations_of is not None:
            return [list(p) for p in itertools.permutations(self.permutations_of)]
        if self.step is None:
            raise ValueError("a range without step has no finite set of values")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [self.low + i * self.step for i in range(n)]


class Objective(StrictModel):
    """A metric to optimise: ``retention``, ``gate_retention``, ``stored_bytes``, ``compression_rate``,
    ``latency_ms``, ``retention:<task metric>`` or a task metric key (``zero_shot world:colour_shape top1``)."""

    metric: str
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _direction(self) -> Objective:
        if self.direction is None:
            self.direction = _DIRECTIONS.get(self.metric, "maximize")
        return self


class Constraints(StrictModel):
    """Feasibility limits; a trial over a limit is infeasible (Optuna's constrained TPE/NSGA-II avoid it)."""

    max_stored_bytes: int | None = Field(None, gt=0, description="stored bytes of the compressed model")
    min_compression_rate: float | None = Field(None, ge=0.0, lt=1.0, description="of the compressed layers")
    max_latency_ms: float | None = Field(None, gt=0.0)

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class StudySettings(StrictModel):
    """The Optuna study: name, trial count, sampler, pruner and the distributed-run settings."""

    name: str = Field("rcc-search", min_length=1)
    trials: int = Field(30, ge=1)
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "median"
    seed: int = 0
    startup_trials: int = Field(5, ge=0, description="trials before TPE models and the median pruner act")
    enqueue_base: bool = Field(True, description="trial 0 runs the base config's own values of the searched keys")
    heartbeat_interval: int = Field(10, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(None, ge=1, description="seconds without heartbeat before a trial is stale; "
                                                             "default 3 heartbeats")
    max_retry: int = Field(3, ge=0, description="reruns of a trial whose worker died")
    max_failures: int | None = Field(None, ge=1, description="stop after this many failed trials (default: trials)")
    poll_interval: float = Field(2.0, gt=0, description="seconds a worker waits while others finish the last trials")


class SearchEvaluation(StrictModel):
    """Where trials are measured: a split apart from the test split (no tuning on the test set)."""

    split: Literal["train", "val", "test"] = "val"
    metrics: list[str] | None = Field(None, description="task metric keys averaged into 'retention' (default: all "
                                                        "headline metrics of the configured benchmarks)")
    max_items: int | None = Field(None, ge=1)


class SearchConfig(StrictModel):
    """A validated search file (see the module docstring)."""

    config: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, ParamSpec]
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="retention")], min_length=1)
    constraints: Constraints = Field(default_factory=Constraints)
    study: StudySettings = Field(default_factory=StudySettings)
    evaluation: SearchEvaluation = Field(default_factory=SearchEvaluation)

    #: the search file's path (set by :func:`load_search_config`; not a YAML key)
    source: str = Field("<dict>", exclude=True)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def base_path(self) -> Path | None:
        """The base experiment config, resolved against the search file's directory."""
        if self.config is None:
            return None
        p = Path(self.config).expanduser()
        return p if p.is_absolute() or self.source.startswith("<") else Path(self.source).parent / p


def _field_at(key: str) -> Any:
    """The pydantic field info of a dotted config key, or ``None`` when the key does not exist."""
    from pydantic import BaseModel

    model: Any = RCCConfig
    field = None
    for p in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or p not in model.model_fields:
            return None
        field = model.model_fields[p]
        model = field.annotation
    return field


def _numeric_kind(field: Any) -> str | None:
    """``int`` or ``float`` for numeric fields (optional allowed), else ``None``."""
    import typing

    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) in (
        typing.Union, getattr(__import__("types"), "UnionType", None)) else [ann]
    if any(a is float for a in args):
        return "float"
    if any(a is int for a in args) and not any(a is bool for a in args):
        return "int"
    return None


def config_for(search: SearchConfig, params: Mapping[str, Any]) -> RCCConfig:
    """The experiment config of one trial: base file, then ``set``, then the trial's ``params``."""
    data = nest_keys({**search.set, **params})
    return load_config(search.base_path(), data=data)


def _check(search: SearchConfig, where: str, overrides: Mapping[str, Any]) -> None:
    try:
        config_for(search, overrides)
    except ConfigError as exc:
        msg = str(exc).removeprefix("config error: ").removeprefix("<dict>: ")
        raise ConfigError(f"config error: {search.source}: {where}: {msg}") from None


def validate_search(search: SearchConfig) -> SearchConfig:
    """Check every key and value against the experiment schema; resolve integer ranges. Raises ConfigError."""
    src = search.source
    base = search.base_path()
    if base is not None and not base.is_file():
        raise ConfigError(f"config error: {src}: config: {base}: file not found")
    for key in [*search.set, *search.space]:
        if _field_at(key) is None:
            raise ConfigError(f"config error: {src}: {key}: not a key of the experiment config")
    overlap = set(search.set) & set(search.space)
    if overlap:
        raise ConfigError(f"config error: {src}: {sorted(overlap)[0]}: in both set and space; keep one")
    _check(search, "set", {})
    for key, spec in search.space.items():
        if spec.is_range:
            kind = _numeric_kind(_field_at(key))
            if kind is None:
                raise ConfigError(f"config error: {src}: space.{key}: a range needs a numeric key; use choices")
            if kind == "int":
                if not (float(spec.low).is_integer() and float(spec.high).is_integer()) or (
                        spec.step is not None and not float(spec.step).is_integer()):
                    raise ConfigError(f"config error: {src}: space.{key}: an integer key needs integer low, high "
                                      f"and step; got {spec.low}, {spec.high}, {spec.step}")
            for end in ("low", "high"):
                value = getattr(spec, end)
                _check(search, f"space.{key}.{end}", {key: int(value) if kind == "int" else value})
        else:
            for i, value in enumerate(spec.options()):
                _check(search, f"space.{key}.{'choices' if spec.choices is not None else 'permutations_of'}[{i}]",
                       {key: value})
    cfg = config_for(search, {})
    task_metric = any(o.metric not in ("gate_retention", "stored_bytes", "compression_rate", "latency_ms")
                      for o in search.objectives)
    if task_metric and not cfg.evaluation.benchmarks:
        raise ConfigError(f"config error: {src}: objectives: a task metric needs evaluation.benchmarks in the "
                          "experiment config; or optimise gate_retention")
    if search.multi_objective and search.study.pruner != "none":
        raise ConfigError(f"config error: {src}: study.pruner: Optuna prunes single-objective studies only; "
                          "set pruner: none for several objectives")
    names = [o.metric for o in search.objectives]
    if len(set(names)) != len(names):
        raise ConfigError(f"config error: {src}: objectives: {names}: each metric once")
    if search.study.sampler == "grid":
        bad = [k for k, s in search.space.items() if s.is_range and s.step is None and _numeric_kind(
            _field_at(k)) == "float"]
        if bad:
            raise ConfigError(f"config error: {src}: space.{bad[0]}: grid search needs a step (or choices) for "
                              "every float range")
    return search


def load_search_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Read and validate a search file; ``overrides`` (``{"study.trials": 30}``) are applied first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path}: YAML syntax error: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping with a 'space' key")
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    try:
        search = SearchConfig.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "function" in p)))
        msg = " ".join(err["msg"].removeprefix("Value error, ").split())
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"config error: {path}: {loc or '<root>'}: {msg}; got {str(err.get('input'))[:120]}{more}"
                          ) from None
    return validate_search(search)


# ----------------------------------------------------------------------------- Optuna encoding
def encode_choice(value: Any) -> Any:
    """An Optuna categorical value: scalars as they are, lists and mappings as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, separators=(",", ":"))


def decode_choice(spec: ParamSpec, value: Any) -> Any:
    """The config value of an encoded categorical choice."""
    for option in spec.options():
        if encode_choice(option) == value:
            return option
    raise ValueError(f"{value!r} is not one of the choices")


def distributions(search: SearchConfig) -> dict[str, Any]:
    """Optuna distributions of the search space, keyed by config key."""
    import optuna

    out: dict[str, Any] = {}
    for key, spec in search.space.items():
        if spec.is_range:
            if _numeric_kind(_field_at(key)) == "int":
                out[key] = optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                                                step=int(spec.step or 1))
            else:
                out[key] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        else:
            out[key] = optuna.distributions.CategoricalDistribution([encode_choice(v) for v in spec.options()])
    return out


def grid(search: SearchConfig) -> dict[str, list[Any]]:
    """Optuna ``GridSampler`` search space (encoded values)."""
    out: dict[str, list[Any]] = {}
    for key, spec in search.space.items():
        if spec.is_range and _numeric_kind(_field_at(key)) == "int":
            out[key] = list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))
        else:
            out[key] = [encode_choice(v) for v in spec.options()]
    return out


def trial_params(search: SearchConfig, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Config values of an Optuna trial's (encoded) parameters."""
    out: dict[str, Any] = {}
    for key, spec in search.space.items():
        if key not in raw:
            continue
        out[key] = raw[key] if spec.is_range else decode_choice(spec, raw[key])
    return out


def base_params(search: SearchConfig) -> dict[str, Any] | None:
    """Encoded values the base config has for every searched key, or ``None`` when one lies outside the space."""
    cfg = config_for(search, {}).model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, spec in search.space.items():
        node: Any = cfg
        for p in key.split("."):
            node = node[p]
        if spec.is_range:
            if node is None or not spec.low <= node <= spec.high:
                return None
            out[key] = node
        else:
            enc = encode_choice(node)
            if enc not in [encode_choice(v) for v in spec.options()]:
                return None
            out[key] = enc
    return out
