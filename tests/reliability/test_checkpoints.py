"""Checkpoint integrity: every file's size and sha256 checked on load, unknown formats refused,
nothing overwritten without ``overwrite``, a full disk leaves the previous checkpoint whole, and
two processes cannot write one run directory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    MLP,
    assert_same_state,
    compressed_mlp,
    fresh_mlp,
    make_batches,
    mlp_section,
    model_state,
)

from rcc_compression.cli import main
from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.storage import load_compressed, read_manifest, save_compressed, verify_files
from rcc_compression.errors import CheckpointError

TINY = ["--model", "tiny-clip", "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=3",
        "--set", "calibration.batch_size=4", "--set", "compression.dare.iterations=1",
        "--set", "compression.dare.fine_tune_epochs=0", "--set", "compression.alphaedit.num_epochs=1",
        "--set", "compression.cascade.validation_threshold=0.0", "--set", "evaluation.benchmarks=[]",
        "--no-eval", "-q"]


def _leftovers(root: Path) -> list[str]:
    pat = re.compile(r"^\..+\.(partial|old)-\w{8}$|^\..+\.\w{8}\.tmp$")
    return sorted(p.name for p in root.rglob("*") if pat.match(p.name))


def _snapshot_dir(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_is_exact(ckpt):
    path, model = ckpt
    loaded = load_compressed(path, model=MLP())
    assert_same_state(model_state(loaded), model_state(model))
    x = make_batches(1)[0]["x"]
    assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- damaged checkpoints
def _truncate(path: Path) -> str:
    f = path / "layers.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-100])
    return f"{path}: file layers.safetensors is truncated ({size - 100} bytes, the manifest records {size})"


def _flip_bit(path: Path) -> str:
    f = path / "rest.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f"{path}: file rest.safetensors is corrupt (sha256 mismatch; truncated or modified)"


def _remove(path: Path) -> str:
    (path / "layers.safetensors").unlink()
    return f"{path}: file layers.safetensors listed in the manifest is missing"


def _no_manifest(path: Path) -> str:
    (path / "manifest.json").unlink()
    return f"{path}: no manifest.json; the save did not finish or this is not a compressed checkpoint"


def _edit_manifest(**fields):
    def edit(path: Path) -> str:
        m = json.loads((path / "manifest.json").read_text())
        m.update(fields)
        (path / "manifest.json").write_text(json.dumps(m))
        return {
            "format_version": f"{path / 'manifest.json'}: unknown format_version 5; this version reads 1, 2, 3, 4",
            "format": f"{path / 'manifest.json'}: not an rcc-compressed manifest (format='safetensors')",
            "files": f"{path / 'manifest.json'}: illegal file path '../../etc/passwd'",
        }[next(iter(fields))]
    return edit


def _malformed_json(path: Path) -> str:
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    return f"{path / 'manifest.json'}: malformed manifest: "


def _not_utf8(path: Path) -> str:
    (path / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    return f"{path / 'manifest.json'}: malformed manifest: not UTF-8 text (invalid start byte at byte 12)"


@pytest.mark.parametrize("damage", [
    _truncate, _flip_bit, _remove, _no_manifest, _edit_manifest(format_version=5), _edit_manifest(format="safetensors"),
    _edit_manifest(files={"../../etc/passwd": {"sha256": "0" * 64}}), _malformed_json, _not_utf8,
], ids=["truncated", "bit-flip", "missing-file", "no-manifest", "format-version-5", "foreign-format",
        "path-escape", "malformed-json", "not-utf8"])
def test_damaged_checkpoint_is_refused_with_a_clear_error(ckpt, damage):
    path, _ = ckpt
    expected = damage(path)
    with pytest.raises(CheckpointError) as err:
        load_compressed(path, model=MLP())
    assert str(err.value).startswith(expected), str(err.value)


def test_damage_is_caught_even_without_hash_verification(ckpt):
    path, _ = ckpt
    f = path / "layers.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: not a valid safetensors file (Error while ")):
        load_compressed(path, model=MLP(), verify=False)


# --------------------------------------------------------------------------- overwrite
def test_saving_into_a_non_empty_directory_needs_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    before = _snapshot_dir(target)
    model = compressed_mlp()
    with pytest.raises(CheckpointError, match=re.escape(
            f"{target}: directory is not empty; pass overwrite=True (--overwrite) to replace it")):
        save_compressed(model, target)
    assert _snapshot_dir(target) == before and _leftovers(tmp_path) == []
    save_compressed(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["layers.safetensors", "manifest.json", "rest.safetensors"]
    assert_same_state(model_state(load_compressed(target, model=MLP())), model_state(model))


def test_cli_refuses_a_non_empty_output_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    before = _snapshot_dir(out)
    assert main(["compress", *TINY, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out}: directory is not empty; pass --overwrite to replace it or --resume"
    assert _snapshot_dir(out) == before


# --------------------------------------------------------------------------- disk full
@pytest.fixture
def disk_fills_up(monkeypatch):
    """``arm(n)``: the n-th safetensors file written from now on gets half its bytes, then ENOSPC."""
    import safetensors.torch as st

    real = st.save_file
    state = {"left": None, "hits": 0}

    def save_file(tensors, filename, metadata=None):
        if state["left"] is not None:
            state["left"] -= 1
            if state["left"] == 0:
                state["hits"] += 1
                data = st.save(tensors, metadata=metadata)
                Path(filename).write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)

    def arm(n: int) -> dict:
        state["left"] = n
        return state

    return arm


def test_disk_full_while_replacing_a_checkpoint_keeps_the_old_one(ckpt, disk_fills_up):
    path, old_model = ckpt
    before = _snapshot_dir(path)
    new_model = compressed_mlp()
    with torch.no_grad():
        new_model.head.a_out = torch.nn.Parameter(torch.full((16,), 2.0))
    state = disk_fills_up(2)  # layers.safetensors is written, rest.safetensors fails half-way
    with pytest.raises(CheckpointError) as err:
        save_compressed(new_model, path, overwrite=True)
    assert state["hits"] == 1
    assert str(err.value) == (f"{path}: could not write the checkpoint: No space left on device; "
                              "the checkpoint already there is unchanged")
    assert _snapshot_dir(path) == before and _leftovers(path.parent) == []
    verify_files(path, read_manifest(path))
    assert_same_state(model_state(load_compressed(path, model=MLP())), model_state(old_model))


def test_disk_full_during_a_run_stops_it_cleanly_and_resume_finishes_it(tmp_path, disk_fills_up):
    reference = fresh_mlp()
    pipe = CascadePipeline(mlp_section(), calibration_data=make_batches(), run_dir=tmp_path / "ref", seed=1)
    pipe.compress(reference)
    run = tmp_path / "run"
    state = disk_fills_up(5)  # the third checkpoint (two files each) fails in its first file
    with pytest.raises(CheckpointError) as err:
        CascadePipeline(mlp_section(), calibration_data=make_batches(), run_dir=run, seed=1).compress(fresh_mlp())
    assert state["hits"] == 1
    assert str(err.value) == (
        f"{run / 'checkpoints' / 'step-00002'}: could not write the checkpoint: No space left on device; nothing "
        f"was saved. The last complete checkpoint, {run / 'checkpoints' / 'step-00001'}, is intact: free space "
        f"and continue with rcc compress --resume {run}")
    progress = json.loads((run / "progress.json").read_text())
    assert progress["checkpoint"] == "checkpoints/step-00001" and progress["next_step"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00001"] and _leftovers(run) == []
    verify_files(run / "checkpoints" / "step-00001", read_manifest(run / "checkpoints" / "step-00001"))
    state["left"] = None  # space freed
    resumed = fresh_mlp()
    CascadePipeline(mlp_section(), calibration_data=make_batches(), run_dir=run, seed=1).compress(resumed, resume=True)
    assert_same_state(model_state(resumed), model_state(reference))


def test_cli_disk_full_is_one_line_and_exit_2(tmp_path, capsys, disk_fills_up):
    run = tmp_path / "run"
    disk_fills_up(3)  # dare's checkpoint is written, nullu's fails
    assert main(["compress", *TINY, "--output", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[transformers]")]
    assert err == [f"error: {run / 'checkpoints' / 'step-00001'}: could not write the checkpoint: No space left on "
                   f"device; nothing was saved. The last complete checkpoint, {run / 'checkpoints' / 'step-00000'}, "
                   f"is intact: free space and continue with rcc compress --resume {run}"]
    assert json.loads((run / "run.json").read_text())["status"].startswith("failed: CheckpointError")


# --------------------------------------------------------------------------- one writer per run directory
def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: tiny-clip}\n")
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running rcc process holds
        os.pwrite(fd, b"4242", 0)
        assert main(["compress", "--resume", str(run), "-q"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {run}: in use by another rcc process (pid 4242); wait for it to finish")
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]
    finally:
        os.close(fd)
