"""Crash safety: ``rcc compress`` killed with SIGKILL at several points resumes to bit-identical weights.

One run, started as a subprocess, is killed from outside while it works (as soon as
``progress.json`` records its second checkpoint). It is then resumed, in child processes forked
from this one, and killed again at exact points of its write sequence (``crash_worker.py``):
half-way through saving a checkpoint, after a checkpoint is whole but before ``progress.json``
points at it, and half-way through the final save of ``compressed/``. The last resume must finish
with exactly the tensors of an uninterrupted run, and leave nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcc_compression.cli import main

WORKER = Path(__file__).with_name("crash_worker.py")
_spec = importlib.util.spec_from_file_location("rcc_crash_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

FAST = ["--model", "tiny-clip", "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=3",
        "--set", "calibration.batch_size=4", "--set", "compression.dare.iterations=2",
        "--set", "compression.dare.fine_tune_epochs=1", "--set", "compression.alphaedit.num_epochs=1",
        "--set", "compression.cascade.validation_threshold=0.0", "--set", "evaluation.benchmarks=[]",
        "--no-eval", "-q"]
STEPS = 6  # 2 rounds x (dare, nullu, alphaedit), a checkpoint after each


def _subprocess(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RCC_TEST_KILL_AT", None)
    return subprocess.Popen([sys.executable, str(WORKER), "compress", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _forked(args: list[str], kill_at: str | None, log: Path) -> tuple[int, str]:
    """Run ``rcc compress ARGS`` in a forked child; its exit status (negative: killed by that signal) and output."""
    child = multiprocessing.get_context("fork").Process(
        target=worker.run_cli, args=(["compress", *args], kill_at, str(log)))
    child.start()
    child.join(180)
    if child.exitcode is None:
        child.kill()
        child.join()
    return child.exitcode, log.read_text() if log.exists() else ""


def _progress(run: Path) -> dict | None:
    try:
        return json.loads((run / "progress.json").read_text())
    except FileNotFoundError:
        return None


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in ("layers", "rest") for k, v in load_file(ckpt / f"{name}.safetensors").items()}


def _leftovers(run: Path) -> list[str]:
    pat = re.compile(r"^\..+\.(partial|old)-\w{8}$|^\..+\.\w{8}\.tmp$")
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if pat.match(p.name))


@pytest.mark.integration
def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path):
    # the uninterrupted reference, in this process (same single thread, same seed)
    ref = tmp_path / "ref"
    assert main(["compress", *FAST, "--output", str(ref)]) == 0
    run = tmp_path / "run"

    # 1. a subprocess killed from outside while it works: as soon as the second checkpoint is recorded
    proc = _subprocess([*FAST, "--output", str(run)])
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        p = _progress(run)
        if p is not None and p["next_step"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.003)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out
    first = _progress(run)
    assert not first["done"] and 2 <= first["next_step"] <= STEPS - 2, first["next_step"]
    a = first["next_step"]
    assert (run / first["checkpoint"] / "manifest.json").is_file()

    # 2. resumed, killed while saving its second checkpoint: tensor files written, manifest not yet
    rc, out = _forked(["--resume", str(run), "-q"], r"/\.step-\d+\.partial-\w+/manifest\.json$:2", tmp_path / "2.log")
    assert rc == -signal.SIGKILL, out
    p = _progress(run)
    assert p["next_step"] == a + 1 and p["checkpoint"] == f"checkpoints/step-{a:05d}"
    partial = [d.name for d in (run / "checkpoints").iterdir() if d.name.startswith(f".step-{a + 1:05d}.partial-")]
    assert len(partial) == 1 and not (run / "checkpoints" / partial[0] / "manifest.json").exists()
    assert (run / "checkpoints" / partial[0] / "layers.safetensors").is_file()
    assert not (run / "checkpoints" / f"step-{a + 1:05d}").exists()

    # 3. resumed, killed after its first checkpoint is whole but before progress.json points at it
    rc, out = _forked(["--resume", str(run), "-q"], r"/progress\.json$:1", tmp_path / "3.log")
    assert rc == -signal.SIGKILL, out
    p = _progress(run)
    assert p["next_step"] == a + 1 and p["checkpoint"] == f"checkpoints/step-{a:05d}"
    assert (run / "checkpoints" / f"step-{a + 1:05d}" / "manifest.json").is_file()
    assert not any(".partial-" in x for x in _leftovers(run))  # the half-written save of 2. was cleared
    assert [x for x in _leftovers(run) if x.startswith(".progress.json.")]  # this kill left a temp file

    # 4. resumed, killed half-way through the final save of compressed/ (the cascade is done)
    rc, out = _forked(["--resume", str(run), "-q"], r"/\.compressed\.partial-\w+/rest\.safetensors$:1",
                      tmp_path / "4.log")
    assert rc == -signal.SIGKILL, out
    p = _progress(run)
    assert p["done"] and not (run / "compressed").exists()
    assert [x for x in _leftovers(run) if x.startswith(".compressed.partial-")]

    # 5. the last resume finishes; the result is the uninterrupted run's, bit for bit
    rc, out = _forked(["--resume", str(run), "-q"], None, tmp_path / "5.log")
    assert rc == 0, out
    got, want = _tensors(run / "compressed"), _tensors(ref / "compressed")
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]
    final = _progress(run)
    assert final["done"] and [r["step"] for r in final["records"]] == list(range(STEPS))
    assert json.loads((run / "compressed" / "manifest.json").read_text())["layers"] == json.loads(
        (ref / "compressed" / "manifest.json").read_text())["layers"]
    assert _leftovers(run) == []
    assert [d.name for d in (run / "checkpoints").iterdir()] == [f"step-{STEPS - 1:05d}"]
    assert json.loads((run / "run.json").read_text())["status"] == "ok"
