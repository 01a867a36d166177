"""How commands start and end: SIGTERM is recorded and stops what a command started, temporary folders go,
options survive --resume, long waits show progress, bad input leaves nothing behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rcc_compression.cli import main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SLOW_TINY = ["--model", "tiny-clip", "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=4",
             "--set", "calibration.batch_size=4", "--set", "compression.dare.iterations=12",
             "--set", "compression.dare.fine_tune_epochs=0", "--set", "compression.cascade.stages=[dare]",
             "--set", "compression.cascade.validation_threshold=0.0", "--set", "evaluation.benchmarks=[]", "-q"]


def wait_for(predicate, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the process ended first ({proc.returncode}): {out}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def rcc(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rcc_compression", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**ENV, **kw.pop("env", {})}, **kw)


# ------------------------------------------------------------------------------ item 17
@pytest.mark.integration
def test_sigterm_is_recorded_and_resume_keeps_no_eval(tmp_path):
    run = tmp_path / "run"
    proc = rcc("compress", *SLOW_TINY, "--no-eval", "--output", str(run))
    try:
        wait_for(lambda: (run / "progress.json").is_file(), proc=proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped: SIGTERM received" in out
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "terminated: SIGTERM received" and record["end_time"]
    assert record["options"] == {"no_eval": True}
    # --resume without --no-eval: the run was started without evaluation and finishes without it
    assert main(["compress", "--resume", str(run), "-q"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["quality"] == {"dense": {}, "compressed": {}}
    assert results["efficiency"] == {"dense": {}, "compressed": {}} and results["execution_kernels"] == {}
    assert json.loads((run / "run.json").read_text())["status"] == "ok"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.integration
def test_sigterm_to_the_dashboard_stops_its_streamlit_child(tmp_path):
    pytest.importorskip("streamlit")
    from rcc_compression.serving.server import free_port

    port = free_port()
    proc = rcc("dashboard", "--runs", str(tmp_path), "--port", str(port))
    try:
        wait_for(lambda: _children(proc.pid), timeout=60, proc=proc)
        child = _children(proc.pid)[0]
        wait_for(lambda: _listening(port), timeout=120, proc=proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
                 .rsplit(")", 1)[1].split()[0], timeout=20)
        assert not _listening(port), "streamlit still serves after its parent was stopped"
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM


# ------------------------------------------------------------------------------ item 16
def test_train_reference_honours_steps_config_and_set(tmp_path, monkeypatch, capsys):
    import rcc_compression.jobs.reference as reference

    seen = {}

    def fake(kind, out, **kw):
        seen.update(kind=kind, **kw)
        return {"figures": {}}

    monkeypatch.setattr(reference, "train_reference", fake)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  batch_size: 16\n  weight_decay: 0.05\n")
    assert main(["train", "--reference", "clip", "--steps", "3", "--config", str(cfg), "--set",
                 "training.learning_rate=0.01", "--seed", "7", "--output", str(tmp_path / "m"), "-q"]) == 0
    recipe = seen["recipe"]
    assert (seen["steps"], seen["seed"]) == (3, 7)
    assert (recipe.steps, recipe.lr, recipe.batch_size, recipe.weight_decay, recipe.seed) == (3, 0.01, 16, 0.05, 7)
    assert main(["train", "--reference", "clip", "--set", "compression.dare.pruning_rate=0.5",
                 "--output", str(tmp_path / "m")]) == 2
    assert "compression.dare.pruning_rate do not apply to a reference model" in capsys.readouterr().err


def _world_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("rcc-world-*"))


@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_reference_training_leaves_no_world_folder(tmp_path, how, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = rcc("train", "--reference", "clip", "--steps", "3", "--output", str(tmp_path / "m"), "-q",
               env={"TMPDIR": str(tmp)})
    try:
        wait_for(lambda: any(d.is_dir() and any(d.rglob("*.png")) for d in _world_dirs(tmp)), proc=proc)
        assert _world_dirs(tmp)[0].name.startswith(f"rcc-world-{proc.pid}-")
        proc.send_signal(getattr(signal, how))
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    if how == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM and _world_dirs(tmp) == []
        return
    assert _world_dirs(tmp), "SIGKILL runs no clean-up"
    from rcc_compression.utils.runs import process_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with process_tempdir("rcc-world-") as mine:  # the next run removes what the killed one left
        assert _world_dirs(tmp) == [mine]
    assert _world_dirs(tmp) == []


# ------------------------------------------------------------------------------ item 18
def test_world_generation_shows_progress(tmp_path, caplog):
    from rcc_compression.data.world import WorldSpec, ensure_world

    spec = WorldSpec(train=30, val=4, test=4, cls_train_per_class=1, cls_val_per_class=1, cls_test_per_class=1,
                     vqa_train=4, vqa_val=4, vqa_test=4)
    with caplog.at_level(logging.INFO, logger="rcc_compression"):
        ensure_world(0, splits=("train",), cache_dir=tmp_path, spec=spec)
    text = caplog.text
    assert "generating the reference world (train; seed 0)" in text
    assert "world captions/train: 1/30 images" in text and "world captions/train: 30/30 images" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rcc_compression"):
        ensure_world(0, splits=("train",), cache_dir=tmp_path, spec=spec)
    assert "generating" not in caplog.text  # cached: nothing to show


def test_evaluate_with_a_missing_dataset_makes_no_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "-m", "tiny-clip", "-d", str(tmp_path / "no-such-data"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"dataset not found: {tmp_path / 'no-such-data'}: no such file or directory" in err
    assert not (tmp_path / "runs").exists()
    assert main(["evaluate", "-m", "tiny-clip", "-d", "coco", "-q"]) == 2
    assert "set dataset.root or $RCC_DATA_ROOT" in capsys.readouterr().err and not (tmp_path / "runs").exists()
