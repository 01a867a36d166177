"""Step records: written in their typed, versioned form, read back validated, and a bad one refused by name."""

from __future__ import annotations

import json

import pytest

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.records import RECORD_VERSION, StepRecord, last_passed, step_records
from rcc_compression.config import load_config
from rcc_compression.errors import CheckpointError

from .conftest import batches_for


def _section(rounds: int = 2):
    return load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.6, "iterations": rounds, "fine_tune_epochs": 0, "targets": ["^fc"]},
        "nullu": {"rank_reduction": 0.5, "energy_threshold": None, "targets": ["^fc"]},
        "cascade": {"stages": ["dare", "nullu"], "validation_threshold": 0.0}}}).compression


def test_records_are_typed_versioned_and_read_back_equal(mlp, tmp_path):
    pipe = CascadePipeline(_section(), calibration_data=batches_for(24, 4), run_dir=tmp_path / "run", seed=1)
    pipe.compress(mlp)
    assert all(r["record_version"] == RECORD_VERSION for r in pipe.records)
    on_disk = json.loads((tmp_path / "run" / "progress.json").read_text())["records"]
    steps = step_records(on_disk, where="progress.json")
    assert [s.step for s in steps] == [0, 1, 2, 3] and all(isinstance(s, StepRecord) for s in steps)
    assert [s.as_json() for s in steps] == on_disk  # nothing lost or added on the way through the types
    last = last_passed(on_disk)
    assert last == steps[-1]
    assert last.achieved.stored_bytes < last.achieved.dense_bytes and 0 < last.achieved.compression_rate < 1
    # a re-check and a rollback mark are records but not steps
    pipe.validate_stage("nullu")
    pipe.rollback_to_stage("dare")
    assert len(step_records(pipe.records)) == 4


@pytest.mark.parametrize(("change", "expected"), [
    (lambda r: r["achieved"].update(stored_bytes="many"), r"record 1 \(step 1\): achieved.stored_bytes"),
    (lambda r: r.update(passed=None), r"record 1 \(step 1\): passed"),
    (lambda r: r.update(record_version=RECORD_VERSION + 1), r"written by a newer rcc-compression"),
    (lambda r: r.update(retentoin=0.9), r"record 1 \(step 1\): retentoin: Extra inputs"),
])
def test_a_bad_record_in_progress_json_is_refused_by_name(mlp, tmp_path, change, expected):
    """Resuming from a ``progress.json`` whose step record was edited (a wrong type, a future version, an unknown
    field) stops with the file, the record and the field, instead of running on what it cannot read."""
    from rcc_compression.compression.cascade import PROGRESS_FILE

    run = tmp_path / "run"

    def stop_after_2(rec):
        if rec["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        CascadePipeline(_section(), calibration_data=batches_for(24, 4), run_dir=run, seed=1,
                        step_callback=stop_after_2).compress(mlp)
    progress = json.loads((run / PROGRESS_FILE).read_text())
    change(progress["records"][1])
    (run / PROGRESS_FILE).write_text(json.dumps(progress))
    with pytest.raises(CheckpointError, match=expected) as err:
        CascadePipeline(_section(), calibration_data=batches_for(24, 4), run_dir=run, seed=1).compress(
            type(mlp)(), resume=True)
    assert str(run / PROGRESS_FILE) in str(err.value)


def test_records_written_before_the_version_field_read_as_version_1(mlp):
    pipe = CascadePipeline(_section(rounds=1), calibration_data=batches_for(24, 4), seed=1)
    pipe.compress(mlp)
    old = [{k: v for k, v in r.items() if k != "record_version"} for r in pipe.records]
    assert [s.record_version for s in step_records(old)] == [1, 1]


def test_a_bad_step_record_in_a_manifest_is_refused_by_name(mlp, tmp_path):
    """The manifest's ``stages`` are read back typed: a checkpoint whose step record was edited does not load."""
    from rcc_compression.compression.storage import MANIFEST, load_compressed, read_manifest, save_compressed

    pipe = CascadePipeline(_section(rounds=1), calibration_data=batches_for(24, 4), seed=1)
    pipe.compress(mlp)
    save_compressed(mlp, tmp_path / "ckpt", records=pipe.records + [{"stage": "train", "steps": 3}])
    steps = step_records(read_manifest(tmp_path / "ckpt")["stages"])
    assert [s.as_json() for s in steps] == pipe.records  # the training record is kept, not a step
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    manifest["stages"][0]["achieved"]["compression_rate"] = "high"
    (tmp_path / "ckpt" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json: stages: record 0 \(step 0\): achieved.compression_rate"):
        load_compressed(tmp_path / "ckpt", model=type(mlp)())
