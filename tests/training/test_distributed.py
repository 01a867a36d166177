"""Two processes under torchrun (gloo) train like one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcc_compression.training.distributed import BatchesDataset, DistInfo, make_loader
from rcc_compression.utils.io import load_safetensors

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_distributed_sampler_splits_the_global_batch() -> None:
    data = [{"x": torch.arange(8).float()[i * 4:(i + 1) * 4, None]} for i in range(2)]
    ds = BatchesDataset(data)
    single = [b["x"].flatten().tolist() for b in make_loader(ds, 4, DistInfo(), seed=3)]
    ranks = [[b["x"].flatten().tolist() for b in make_loader(ds, 2, DistInfo(r, r, 2), seed=3)] for r in range(2)]
    for step, whole in enumerate(single):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(whole)
        assert not set(ranks[0][step]) & set(ranks[1][step])


def _worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_two_processes_match_one(tmp_path: Path) -> None:
    _worker().run(tmp_path / "one")  # the same code the two processes run, in this process, world size 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --max-restarts: torchrun's own restart of the worker group; a worker has been seen to abort at start-up
    # ("terminate called without an active exception") about once in ten runs on a loaded machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(WORKER), str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 6  # 3 epochs x 2 steps of 16 samples
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < 0.8 * one["losses"][0]
    w1 = load_safetensors(tmp_path / "one" / "weights.safetensors")
    w2 = load_safetensors(tmp_path / "two" / "weights.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "ck" / "last" / "trainer_state.json").is_file()  # rank 0 checkpointed
    assert not list((tmp_path / "two" / "ck").glob(".*"))  # and nobody left a half-written one
