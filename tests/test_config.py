"""Configuration: inherit chains, override merge, cycles, unknown keys, wrong types, --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcc_compression.config import load_config, parse_set
from rcc_compression.errors import ConfigError

from .conftest import write

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_design_documents():
    c = load_config(None)
    d, n, a, k = c.compression.dare, c.compression.nullu, c.compression.alphaedit, c.compression.cascade
    assert (d.pruning_rate, d.iterations, d.pruning_schedule, d.fine_tune_epochs) == (0.9, 10, "linear", 5)
    assert (n.rank_reduction, n.energy_threshold, n.decomposition_method) == (0.5, 0.95, "svd")
    assert (a.learning_rate, a.num_epochs, a.importance_metric) == (0.001, 10, "gradient")
    assert (k.stages, k.checkpoint_frequency, k.validation_threshold) == (["dare", "nullu", "alphaedit"], 1, 0.95)


def test_inherit_chain_and_override_merge(tmp_path):
    write(tmp_path / "base/c.yaml", "compression:\n  dare:\n    pruning_rate: 0.5\n    iterations: 3\n")
    write(tmp_path / "base/b.yaml", "inherit: c.yaml\ncompression:\n  dare:\n    iterations: 4\n")
    exp = write(tmp_path / "exp/a.yaml", """
inherit: ../base/b.yaml
experiment: {name: a}
compression:
  inherit: ../base/c.yaml
  override:
    nullu: {rank_reduction: 0.25}
    dare: {scorer: wanda}
""")
    c = load_config(exp)
    # b overrides c's iterations, the section-level inherit of c re-applies c's value, override wins last
    assert c.compression.dare.pruning_rate == 0.5
    assert c.compression.dare.iterations == 3
    assert c.compression.dare.scorer == "wanda"
    assert c.compression.nullu.rank_reduction == 0.25
    assert c.compression.nullu.energy_threshold == 0.95  # untouched default
    assert c.experiment.name == "a"


def test_cycle_is_detected(tmp_path):
    write(tmp_path / "x.yaml", "inherit: y.yaml\n")
    write(tmp_path / "y.yaml", "inherit: x.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle x\.yaml -> y\.yaml -> x\.yaml"):
        load_config(tmp_path / "x.yaml")


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    f = write(tmp_path / "c.yaml", "compression:\n  dare:\n    prune_rate: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "compression.dare.prune_rate" in msg
    assert "allowed keys:" in msg and "pruning_rate" in msg


def test_wrong_type_and_range_and_literal(tmp_path):
    f = write(tmp_path / "c.yaml", "compression:\n  dare:\n    pruning_rate: lots\n")
    with pytest.raises(ConfigError, match=r"compression\.dare\.pruning_rate: expected a number \(float\), got 'lots'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"--set: compression\.dare\.pruning_rate: .*less than 1"):
        load_config(None, ["compression.dare.pruning_rate=1.5"])
    with pytest.raises(ConfigError, match=r"greater than or equal to 0"):
        load_config(None, ["compression.dare.pruning_rate=-0.1"])
    with pytest.raises(ConfigError, match=r"allowed: 'linear' or 'cubic'"):
        load_config(None, ["compression.dare.pruning_schedule=exp"])
    with pytest.raises(ConfigError, match=r"unknown stage 'prune'; allowed: dare, nullu, alphaedit, quant"):
        load_config(None, ["compression.cascade.stages=[dare, prune]"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="file is empty"):
        load_config(write(tmp_path / "empty.yaml", "\n"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 2, column 4: YAML syntax error"):
        load_config(write(tmp_path / "bad.yaml", "a: 1\nb: : 2\n"))
    with pytest.raises(ConfigError, match="inherited from"):
        load_config(write(tmp_path / "i.yaml", "inherit: nowhere.yaml\n"))


def test_set_values_are_typed():
    assert parse_set("a.b=0.95") == (("a", "b"), 0.95)
    assert parse_set("a=true") == (("a",), True)
    assert parse_set("a=[dare, nullu]") == (("a",), ["dare", "nullu"])
    assert parse_set("a=null") == (("a",), None)
    c = load_config(None, ["compression.dare.pruning_rate=0.95", "training.learning_rate=1e-4"])
    assert c.compression.dare.pruning_rate == 0.95 and c.training.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_set("novalue")


@pytest.mark.parametrize("name", ["clip_dare_cascade", "blip_full_pipeline", "ablation_studies", "demo"])
def test_shipped_experiments_validate(name):
    c = load_config(ROOT / "config" / "experiments" / f"{name}.yaml")
    assert c.experiment.name


def test_nest_keys_builds_the_mapping_set_would():
    from rcc_compression.config import load_config, nest_keys

    flat = {"compression.cascade.target_rate": 0.75, "compression.dare.pruning_rate": 0.3, "experiment.seed": 4}
    assert nest_keys(flat) == {"compression": {"cascade": {"target_rate": 0.75}, "dare": {"pruning_rate": 0.3}},
                               "experiment": {"seed": 4}}
    assert load_config(None, data=nest_keys(flat)) == load_config(None, [f"{k}={v}" for k, v in flat.items()])
