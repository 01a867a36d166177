"""The design document's own configuration loads, and no config key is silently ignored.

The design's files are copied verbatim under ``tests/fixtures/design`` (section 6.1's
``base/compression.yaml`` and section 6.2's experiment with its nested layout).
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rcc_compression.config import RCCConfig, dump_config, load_config
from rcc_compression.errors import ConfigError
from rcc_compression.utils.runs import RunRecord

from .conftest import write

DESIGN = Path(__file__).resolve().parent / "fixtures" / "design" / "experiments" / "clip_full_pipeline.yaml"


# ------------------------------------------------------------------------------------ the design's own file
def test_design_experiment_file_loads_as_written():
    c = load_config(DESIGN)
    assert c.experiment.name == "clip_rcc_full"
    assert (c.model.name, c.model.type) == ("openai/clip-vit-base-patch32", "clip")
    assert (c.dataset.train, c.dataset.val, c.dataset.test) == ("conceptual_captions", "mscoco", "imagenet")
    d = c.compression.dare
    assert (d.pruning_rate, d.iterations, d.pruning_schedule, d.fine_tune_epochs) == (0.95, 10, "linear", 5)
    n, a = c.compression.nullu, c.compression.alphaedit
    assert (n.rank_reduction, n.energy_threshold, n.decomposition_method) == (0.5, 0.95, "svd")
    assert (a.learning_rate, a.num_epochs, a.importance_metric) == (0.001, 10, "gradient")
    assert c.compression.cascade.stages == ["dare", "nullu", "alphaedit"]
    assert (c.training.batch_size, c.training.learning_rate, c.training.num_epochs) == (256, 1e-4, 20)
    assert c.evaluation.metrics == ["accuracy", "retrieval", "efficiency"]
    assert c.evaluation.benchmarks == ["zero_shot", "retrieval"]  # image_text_retrieval is retrieval's alias


def test_nested_and_flat_layouts_are_the_same_config(tmp_path):
    nested = load_config(DESIGN)
    flat = dict(dump_config(nested))
    again = load_config(write(tmp_path / "flat.yaml", yaml.safe_dump(flat)))
    assert dump_config(again) == dump_config(nested)


def test_nested_section_errors_name_the_key_as_written(tmp_path):
    bad = write(tmp_path / "e.yaml", "experiment:\n  name: x\n  model:\n    nmae: y\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"config error: {bad}: experiment.model.nmae: unknown key 'nmae'; allowed keys:")


def test_a_section_given_twice_is_refused(tmp_path):
    both = write(tmp_path / "e.yaml", "experiment:\n  model: {name: a}\nmodel: {name: b}\n")
    with pytest.raises(ConfigError, match=r"experiment\.model and model: the section is given twice"):
        load_config(both)


def test_overrides_reach_a_nested_file():
    c = load_config(DESIGN, ["model.name=tiny-clip", "training.num_epochs=1"])
    assert (c.model.name, c.model.type, c.training.num_epochs) == ("tiny-clip", "clip", 1)


# ------------------------------------------------------------------------------------------ evaluation keys
def test_unknown_benchmark_is_refused_with_the_allowed_names():
    with pytest.raises(ConfigError, match=r"evaluation\.benchmarks: unknown benchmark 'zeroshot'; allowed: "
                                          r"zero_shot, retrieval \(alias image_text_retrieval\)"):
        load_config(None, ["evaluation.benchmarks=[zeroshot]"])


@pytest.mark.parametrize(("metrics", "benchmarks", "expected"), [
    ("[accuracy, speed]", "[zero_shot]", r"unknown metric 'speed'; allowed: accuracy, retrieval, captioning, "
                                         r"efficiency"),
    ("[accuracy]", "[zero_shot, retrieval]", r"benchmark retrieval measures retrieval, which evaluation\.metrics "
                                             r"leaves out"),
    ("[accuracy, captioning]", "[zero_shot]", r"metric captioning: no benchmark measures it \(captioning\)"),
])
def test_metrics_and_benchmarks_must_agree(metrics, benchmarks, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"evaluation.metrics={metrics}", f"evaluation.benchmarks={benchmarks}"])


def test_metrics_default_to_what_the_benchmarks_measure():
    c = load_config(None, ["evaluation.benchmarks=[captioning]"])
    assert c.evaluation.metrics is None and c.evaluation.measures() == ["captioning", "efficiency"]
    c = load_config(None, ["evaluation.metrics=[accuracy]", "evaluation.benchmarks=[zero_shot]"])
    assert c.evaluation.measures() == ["accuracy"]  # no efficiency profile asked for


# ------------------------------------------------------------------ every key reaches the run's record
#: keys whose non-default value the generator below cannot invent (other keys' constraints, cross-checks)
OTHER_VALUES: dict[str, Any] = {
    "experiment.device": "cpu",
    "model.name": "tiny-clip",
    "compression.cascade.stages": ["nullu", "dare"],
    "evaluation.benchmarks": ["retrieval"],
    "evaluation.metrics": ["accuracy", "retrieval"],
    "training.monitor": "val_agreement",
    "training.privacy": {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 0.5, "noise_multiplier": 1.1,
                         "accountant": "prv"},
    "compression.dare.nm": "2:4",
    "compression.quant.layers": {"fc1": {"bits": 4, "factor_bits": 8, "group_size": 32, "symmetric": False,
                                         "activations": "int8"}},
    "compression.nullu.layers": [1],
}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field))
    return out


def _number(kind: type, default: Any, metadata: list) -> Any:
    lo = next((m.ge if hasattr(m, "ge") else m.gt for m in metadata if hasattr(m, "ge") or hasattr(m, "gt")), None)
    hi = next((m.le if hasattr(m, "le") else m.lt for m in metadata if hasattr(m, "le") or hasattr(m, "lt")), None)
    cands = [0.3, 0.6, 0.05, 2.0, 7.0] if kind is float else [3, 1, 2, 5, 17, 2048]
    ok = [c for c in cands if c != default and (lo is None or c > lo) and (hi is None or c < hi)]
    return kind(ok[0])


def _other(ann: Any, default: Any, metadata: list) -> Any:
    """A valid value of a field's type that differs from ``default``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _other(inner[0], default, metadata)
    if origin is Literal:
        return next(a for a in args if a != default)
    if origin is typing.Annotated:
        return _other(args[0], default, [*metadata, *args[1].metadata])
    if origin in (list, tuple):
        if origin is tuple:  # a fixed-length tuple of bounded numbers: each one moved inside its bounds
            return [_number(float, d, typing.get_args(a)[1].metadata) for a, d in zip(args, default, strict=True)]
        item = _other(args[0], None, [])
        return [item] if default != [item] else [_other(args[0], item, [])]
    if origin is dict:
        return {"fc1": _other(args[1], None, [])}
    if ann is bool:
        return not default
    if ann in (int, float):
        return _number(ann, default, metadata)
    if ann is str:
        return "other-value"
    raise AssertionError(f"no non-default value for {ann}")


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.e2e
def test_every_key_set_reaches_the_run_record(tmp_path):
    """Each key of every section and stage, set to a value other than its default, is what the run's resolved
    record (``config.yaml``, ``run.json``) holds and what a run resumed from that record reads back.

    A key the schema drops, renames or resets on its way to the record (so a resumed or reproduced run would
    silently use the default) fails here, naming the key.
    """
    keys = _leaves(RCCConfig)
    assert len(keys) > 150 and any(k.startswith("compression.quant.") for k, _ in keys)
    wrong = []
    for path, field in keys:
        value = OTHER_VALUES.get(path)
        if value is None:
            value = _other(field.annotation, field.get_default(call_default_factory=True), field.metadata)
        try:
            cfg = load_config(None, [f"{path}={json.dumps(value)}"])
        except ConfigError as exc:
            wrong.append(f"{path}={value!r}: refused ({exc})")
            continue
        if _plain(_get(cfg, path)) != _plain(value):
            wrong.append(f"{path}: set {value!r}, resolved {_get(cfg, path)!r}")
            continue
        run_dir = tmp_path / path
        RunRecord(run_dir, dump_config(cfg), cfg.experiment.seed, command="rcc compress")
        recorded = json.loads((run_dir / "run.json").read_text())["config"]
        again = load_config(run_dir / "config.yaml")
        node = recorded
        for part in path.split("."):
            node = node[part]
        if _plain(node) != _plain(value) or _plain(_get(again, path)) != _plain(value):
            wrong.append(f"{path}: set {value!r}; run.json holds {node!r}, config.yaml reads back "
                         f"{_get(again, path)!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.e2e
def test_a_run_records_the_values_it_ran_with(small_compressed_run):
    """A real ``rcc compress`` run: the non-default keys it was given are in its ``config.yaml``, ``run.json``
    and the checkpoint's manifest, and each stage's record shows the targets it compressed to."""
    run, sets = small_compressed_run
    recorded = json.loads((run / "run.json").read_text())["config"]
    manifest = json.loads((run / "compressed" / "manifest.json").read_text())
    again = load_config(run / "config.yaml")
    for key, value in sets.items():
        node, mnode = recorded, manifest["config"]
        for part in key.split("."):
            node, mnode = node[part], mnode[part]
        assert _plain(node) == _plain(mnode) == _plain(_get(again, key)) == _plain(value), key
    steps = [r for r in manifest["stages"] if r.get("stage") == "dare"]
    assert steps and steps[-1]["targets"]["pruning_rate"] == sets["compression.dare.pruning_rate"]


# ------------------------------------------------------------------------------- the metrics act on the jobs
@pytest.mark.e2e
def test_compress_measures_what_the_metrics_name(tmp_path):
    """``metrics: [accuracy]`` reports zero-shot accuracy and skips the efficiency profile; the default adds it."""
    from rcc_compression.jobs.compress import run_compress

    base = ["model.name=tiny-clip", "calibration.source=synthetic", "calibration.num_batches=2",
            "calibration.batch_size=4", "compression.cascade.stages=[dare]", "compression.dare.iterations=1",
            "compression.dare.fine_tune_epochs=0", "compression.cascade.validation_threshold=0.0",
            "evaluation.benchmarks=[zero_shot]", "evaluation.datasets=[world:shape]", "evaluation.batch_size=64"]
    only = run_compress(load_config(None, [*base, "evaluation.metrics=[accuracy]"]), tmp_path / "a")
    assert set(only["quality"]["dense"]) == {"zero_shot world:shape top1"}
    assert only["efficiency"] == {"dense": {}, "compressed": {}} and not only["execution_kernels"]
    default = run_compress(load_config(None, base), tmp_path / "b")
    assert default["efficiency"]["compressed"]["storage"]["compression_rate_layers"] > 0
    # what it holds loaded, how fast at batch 1 and 8, on which kernels and in which dtype, measured
    comp = default["efficiency"]["compressed"]
    assert comp["memory"]["resident_bytes"] > 0 and comp["memory"]["inference_form_layers"] > 0
    assert set(comp["per_batch_size"]) == {"1", "8"} == set(default["efficiency"]["dense"]["per_batch_size"])
    assert default["inference"]["dtype"] in default["inference"]["tried"] and default["execution_kernels"]
    table = (tmp_path / "b" / "results.md").read_text()
    for row in ("resident MB (tensors held, loaded)", "CPU latency bs=1", "CPU latency bs=8",
                "inference kernels (compressed layers)", "compute dtype (measured"):
        assert row in table, row


def test_evaluate_runs_the_efficiency_metric_and_the_alias(tmp_path, capsys):
    from rcc_compression.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", "-m", "tiny-clip", "--set", "evaluation.benchmarks=[image_text_retrieval]",
                 "--set", "evaluation.metrics=[retrieval, efficiency]", "-d", "world", "--max-items", "8",
                 "--bootstrap", "0", "-o", str(out), "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"retrieval", "efficiency"}
