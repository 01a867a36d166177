"""The design document's evaluation call (section 11.2) on the bundled CLIP: what fits runs, the rest is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcc_compression.cli import main
from rcc_compression.data.world import WorldSpec, generate_world
from rcc_compression.evaluation.suite import evaluate_model
from rcc_compression.models import get_model

DESIGN_PAIRS = {("zero_shot", "imagenet"), ("zero_shot", "mscoco"), ("retrieval", "imagenet"), ("retrieval", "mscoco")}


@pytest.fixture(scope="module")
def clip():
    return get_model("rcc-clip-world")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("w")
    generate_world(root, WorldSpec(seed=0, splits=("test",), test=12, cls_test_per_class=1))
    return root


def test_design_call_without_the_datasets_reports_nothing_and_says_why(clip, monkeypatch) -> None:
    monkeypatch.delenv("RCC_DATA_ROOT", raising=False)
    res = evaluate_model(clip, benchmarks=["zero_shot", "retrieval"], datasets=["imagenet", "mscoco"])
    assert res["results"] == {}  # no number for data that was not evaluated
    reasons = {(s["benchmark"], s["dataset"]): s["reason"] for s in res["skipped"]}
    assert set(reasons) == DESIGN_PAIRS
    assert reasons[("zero_shot", "mscoco")] == "zero_shot needs a classification dataset; mscoco is captions"
    assert reasons[("retrieval", "imagenet")] == "retrieval needs a captions dataset; imagenet is classification"
    for pair in (("zero_shot", "imagenet"), ("retrieval", "mscoco")):
        assert reasons[pair].startswith("cannot open: ") and "RCC_DATA_ROOT" in reasons[pair]


def test_design_call_runs_the_pairs_that_fit(clip, world, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RCC_DATA_ROOT", str(tmp_path))  # a data root without imagenet/ or coco/
    res = evaluate_model(clip, benchmarks=["zero_shot", "retrieval"], datasets=["imagenet", "mscoco", str(world)],
                         bootstrap_samples=0, max_items=8)
    ran = {(b, d) for b, per in res["results"].items() for d in per}
    assert ran == {("zero_shot", f"{world}#{p}") for p in ("shape", "colour", "colour_shape")} | {
        ("retrieval", f"{world}#captions")}
    assert {(s["benchmark"], s["dataset"]) for s in res["skipped"]} == DESIGN_PAIRS
    missing = next(s["reason"] for s in res["skipped"] if s["dataset"] == "imagenet" and s["benchmark"] == "zero_shot")
    assert str(tmp_path / "imagenet") in missing and "does not exist" in missing
    assert 0.0 <= res["results"]["zero_shot"][f"{world}#shape"]["metrics"]["top1"]["value"] <= 1.0


def test_cli_with_nothing_to_evaluate_exits_2_with_the_reasons(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("RCC_DATA_ROOT", raising=False)
    assert main(["evaluate", "-m", "rcc-clip-world", "-d", "imagenet", "-d", "mscoco", "-o", str(tmp_path / "e"),
                 "-q"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # checked before the run directory is made: nothing of an evaluation that cannot run is left behind
    assert last.startswith("error: dataset not found: imagenet (a known name: set dataset.root or $RCC_DATA_ROOT")
    assert "mscoco (a known name: set dataset.root or $RCC_DATA_ROOT to the directory that holds coco/)" in last
    assert not (tmp_path / "e").exists()
