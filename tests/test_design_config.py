"""The design document's own configuration loads, and no config key is silently ignored.

The design's files are copied verbatim under ``tests/fixtures/design`` (section 6.1's
``base/compression.yaml`` and section 6.2's experiment with its nested layout).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

import rcc_compression
from rcc_compression.compression.registry import STAGES
from rcc_compression.config import READERS, RCCConfig, dump_config, load_config
from rcc_compression.errors import ConfigError

from .conftest import write

DESIGN = Path(__file__).resolve().parent / "fixtures" / "design" / "experiments" / "clip_full_pipeline.yaml"
PACKAGE = Path(rcc_compression.__file__).resolve().parent


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


# ------------------------------------------------------------------------------- every key is read by someone
def _sections() -> list:
    out = [pytest.param(name, field.annotation, id=name)
           for name, field in RCCConfig.model_fields.items() if name != "compression"]
    compression = RCCConfig.model_fields["compression"].annotation.model_fields
    return [*out, *(pytest.param(f"compression.{k}", compression[k].annotation, id=f"compression.{k}")
                    for k in ("cascade", "towers"))]


def _reads(module: str, key: str) -> bool:
    """Whether ``module`` reads ``key``: an attribute access ``x.key`` or the name as a string (``getattr``)."""
    source = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not source.is_file():
        source = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return any((isinstance(n, ast.Attribute) and n.attr == key and isinstance(n.ctx, ast.Load))
               or (isinstance(n, ast.Constant) and n.value == key) for n in ast.walk(tree))


@pytest.mark.parametrize(("section", "model"), _sections())
def test_every_key_of_a_section_has_a_reader(section, model):
    """Each key is listed in ``config.READERS`` with the modules that read it, and those modules do read it."""
    for key in model.model_fields:
        path = f"{section}.{key}"
        assert path in READERS, f"{path}: no job reads this key; use it or refuse it, and list it in config.READERS"
        readers = READERS[path]
        assert readers, path
        missing = [m for m in readers if not _reads(m, key)]
        assert not missing, f"{path}: listed readers {missing} never read it"
    stale = [p for p in READERS if p.startswith(section + ".") and p[len(section) + 1:] not in model.model_fields]
    assert not stale, f"READERS lists keys that do not exist: {stale}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_key_is_read_by_its_stage(stage):
    """A stage's config keys are read in its module (``targets``/``ignore`` by the shared stage code), or where
    ``config.READERS`` says."""
    cfg_cls, stage_cls = STAGES[stage]
    own = (stage_cls.__module__, cfg_cls.__module__, "rcc_compression.compression.stage")
    for key in cfg_cls.model_fields:
        modules = READERS.get(f"compression.{stage}.{key}", own)
        assert any(_reads(m, key) for m in modules), f"compression.{stage}.{key}: never read by {sorted(modules)}"


# ------------------------------------------------------------------------------- the metrics act on the jobs
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
