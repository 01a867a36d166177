"""Experiment tracking: the config section, the tracker's failure handling, and a run's logs read back from disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from rcc_compression.config import load_config
from rcc_compression.errors import ConfigError
from rcc_compression.jobs.tracking import results_metrics, step_metrics
from rcc_compression.tracking import (
    Backend,
    ExperimentTracker,
    TrackingConfig,
    metric_key,
    read_metrics_file,
    series_points,
)


def _tb_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------------ config
def test_tracking_section_is_typed_and_strict(tmp_path):
    cfg = load_config(None, ["tracking.backends=[file,tensorboard,wandb]", "tracking.project=p",
                             "tracking.run_name=r", "tracking.tags=[a,b]"])
    assert cfg.tracking.backends == ["file", "tensorboard", "wandb"] and cfg.tracking.tags == ["a", "b"]
    assert load_config(None).tracking.backends == ["console", "file"]
    with pytest.raises(ConfigError, match=r"tracking.entity: unknown key 'entity'; allowed keys: backends, project"):
        load_config(None, ["tracking.entity=me"])
    with pytest.raises(ConfigError, match=r"tracking.backends\[0\]: got 'mlflow'; allowed: 'console', 'file'"):
        load_config(None, ["tracking.backends=[mlflow]"])
    (tmp_path / "c.yaml").write_text("tracking:\n  backends: [file, file]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: tracking.backends: backend 'file' listed twice"):
        load_config(tmp_path / "c.yaml")


def test_metric_keys_survive_every_backend():
    key = metric_key("eval/dense", "zero_shot world:colour_shape top1")
    assert key == "eval/dense/zero_shot_world_colour_shape_top1"
    assert metric_key("x", "i2t_R@1") == "x/i2t_R_1"


# ------------------------------------------------------------------------------------ tracker
class _Broken(Backend):
    name = "broken"

    def log(self, series, step, values):
        raise ConnectionError("unreachable")


def test_a_failing_backend_is_switched_off_and_the_run_goes_on(tmp_path, caplog):
    tracker = ExperimentTracker(TrackingConfig(backends=["file"]), tmp_path)
    tracker.backends.insert(0, _Broken())
    with tracker:
        tracker.log_metrics({"a": 1.0}, 0, "s")
        tracker.log_metrics({"a": 2.0}, 1, "s")
    assert tracker.backends == []
    assert series_points(read_metrics_file(tmp_path), "s") == {0: {"a": 1.0}, 1: {"a": 2.0}}
    assert any("broken failed in log" in r.getMessage() for r in caplog.records)


def test_backends_that_need_a_directory_are_skipped_without_one(caplog):
    tracker = ExperimentTracker(TrackingConfig(backends=["console", "file", "wandb"]))
    assert tracker.backend_names == ["console"]
    tracker.log_metrics({"loss": 0.5}, series="train")
    tracker.finish()
    assert sum("needs a run directory" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.e2e
def test_wandb_that_cannot_start_never_fails_the_run(tmp_path, monkeypatch, caplog, wandb_env):
    """An online W&B whose server is unreachable: switched off with a warning, the other backends carry on."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    with ExperimentTracker(TrackingConfig(backends=["file", "wandb"]), tmp_path) as tracker:
        assert tracker.backend_names == ["file"]
        tracker.log_metrics({"a": 1.0}, 0, "s")
    assert any("wandb could not start" in r.getMessage() for r in caplog.records)
    assert series_points(read_metrics_file(tmp_path), "s") == {0: {"a": 1.0}}


def test_torn_metrics_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind":"metrics","series":"s","step":0,"values":{"a":1}}\n{"kind":"met')
    assert series_points(read_metrics_file(tmp_path), "s") == {0: {"a": 1}}


# ------------------------------------------------------------------------------------ a run, read back
def test_offline_wandb_run_holds_what_results_json_says(small_run, wandb_calls):
    results = json.loads((small_run / "results.json").read_text())
    run = wandb_calls.finished
    assert run["dir"].startswith(str(small_run / "wandb" / "offline-run-")) and run["exit_code"] == 0
    assert list((small_run / "wandb").glob("offline-run-*/run-*.wandb"))  # the run's log, for wandb sync
    expected = results_metrics(results)
    assert set(expected) == {"eval/dense", "eval/compressed"} and len(expected["eval/compressed"]) >= 10
    for series, values in expected.items():
        assert wandb_calls.series(series) == {0: values}
    # every number of the results went in unchanged: quality with its CI, bytes, rate, latency, gate
    comp = wandb_calls.series("eval/compressed")[0]
    key = next(iter(results["quality"]["compressed"]))
    assert comp[metric_key(key)] == results["quality"]["compressed"][key]
    ci = [comp[metric_key(key, "ci_low")], comp[metric_key(key, "ci_high")]]
    assert ci == results["quality_ci"]["compressed"][key]
    storage = results["efficiency"]["compressed"]["storage"]
    assert comp["storage/stored_bytes_model"] == storage["stored_bytes_model"]
    assert comp["storage/compression_rate_layers"] == storage["compression_rate_layers"]
    assert comp["gate_retention"] == results["gate"]["retention"]
    # one point per cascade step, as recorded
    steps = [r for r in results["records"] if "achieved" in r]
    assert wandb_calls.series("cascade") == {r["step"]: step_metrics(r) for r in steps}
    # the resolved config, the summary, and the compressed model as an artifact
    cfg = yaml.safe_load((small_run / "config.yaml").read_text())
    assert run["config"] == cfg and run["tags"] == ["test"] and run["name"] == "small"
    assert run["summary"]["eval/compressed/gate_retention"] == results["gate"]["retention"]
    (art,) = wandb_calls.artifacts
    manifest = json.loads((small_run / "compressed" / "manifest.json").read_text())
    assert art["type"] == "model" and "manifest.json" in art["files"]
    assert set(manifest["files"]) <= set(art["files"])


def test_tensorboard_events_hold_what_results_json_says(small_run):
    results = json.loads((small_run / "results.json").read_text())
    scalars = _tb_scalars(small_run / "tensorboard")
    for series, values in results_metrics(results).items():
        for key, value in values.items():
            (step, got), = scalars[f"{series}/{key}"].items()
            assert step == 0 and math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-9)  # float32 on disk
    for r in (r for r in results["records"] if "achieved" in r):
        assert math.isclose(scalars["cascade/retention"][r["step"]], r["retention"], rel_tol=1e-6)
        assert math.isclose(scalars[f"stage/{r['stage']}/compression_rate"][r["round"]],
                            r["achieved"]["compression_rate"], rel_tol=1e-6)
    assert scalars["system/peak_rss_mb"] and all(v > 0 for v in scalars["system/peak_rss_mb"].values())


def test_file_log_holds_results_exactly_and_training_steps(small_run):
    results = json.loads((small_run / "results.json").read_text())
    lines = read_metrics_file(small_run)
    for series, values in results_metrics(results).items():
        assert series_points(lines, series) == {0: values}
    train = series_points(lines, "train")
    assert train and list(train) == list(range(len(train)))  # one axis across every distillation of the cascade
    assert all(math.isfinite(v["loss"]) and v["lr"] >= 0 for v in train.values()) and train[0]["lr"] > 0
    marks = [e for e in lines if e.get("event") == "cascade_step"]
    assert [m["train_step"] for m in marks] == sorted(m["train_step"] for m in marks)
    assert marks[-1]["train_step"] == len(train)
    phases = [e["phase"] for e in lines if e.get("event") == "phase"]
    assert phases[:4] == ["dense evaluation", "cascade", "inference form", "evaluation"]
    assert lines[-1] == {**lines[-1], "event": "end", "status": "ok"}


def test_evaluate_run_logs_what_results_json_says(tmp_path):
    """``rcc evaluate`` logs every metric and its interval to the configured trackers, exactly as written."""
    from rcc_compression.cli import main
    from rcc_compression.jobs.tracking import evaluation_metrics

    out = tmp_path / "eval"
    rc = main(["evaluate", "-m", "rcc-clip-world", "-b", "zero_shot", "-b", "retrieval", "--max-items", "48",
               "--bootstrap", "20", "-o", str(out), "-q", "--set", "tracking.backends=[file,tensorboard]"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    logged = evaluation_metrics(results)
    assert {"eval/zero_shot/world_colour_shape", "eval/retrieval/world_captions"} <= set(logged)
    top1 = results["results"]["zero_shot"]["world:colour_shape"]["metrics"]["top1"]
    assert logged["eval/zero_shot/world_colour_shape"]["top1"] == top1["value"]
    assert logged["eval/zero_shot/world_colour_shape"]["top1/ci_low"] == top1["ci_low"]
    lines = read_metrics_file(out)
    for series, values in logged.items():
        assert series_points(lines, series) == {0: values}
    scalars = _tb_scalars(out / "tensorboard")
    assert math.isclose(scalars["eval/zero_shot/world_colour_shape/top1"][0], top1["value"], rel_tol=1e-6)
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "ok"
