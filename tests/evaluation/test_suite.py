"""The suite end to end on tiny models and a tiny world: structure, CIs, skips, files, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rcc_compression.cli import main
from rcc_compression.data.world import WorldSpec, generate_world
from rcc_compression.evaluation.suite import evaluate_model, expand_datasets, flat_metrics, results_table
from rcc_compression.jobs.evaluate import run_suite


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("w")
    generate_world(root, WorldSpec(seed=0, splits=("test",), test=12, cls_test_per_class=1, vqa_test=12))
    return root


def _all_estimates(res: dict) -> list[dict]:
    out = []
    for per_ds in res["results"].values():
        for r in per_ds.values():
            for key, metrics in r.items():
                if key.startswith("metrics"):
                    out += [m for m in metrics.values() if isinstance(m, dict)]
    return out


def test_clip_benchmarks_on_the_world(world: Path, tiny_clip) -> None:
    res = evaluate_model(tiny_clip, ["zero_shot", "retrieval", "captioning"], [str(world)], bootstrap_samples=50)
    zs = res["results"]["zero_shot"]
    assert set(zs) == {f"{world}#shape", f"{world}#colour", f"{world}#colour_shape"}
    cs = zs[f"{world}#colour_shape"]
    assert cs["num_classes"] == 64 and cs["items"] == 64 and cs["items_unseen"] == 16 and cs["templates"] == "world"
    assert zs[f"{world}#colour"]["templates"] == "world_colour"
    rt = res["results"]["retrieval"][f"{world}#captions"]
    assert rt["images"] == 12 and rt["texts"] == 60
    assert res["skipped"] == [{"benchmark": "captioning", "dataset": "*",
                               "reason": "captioning needs a captioning model (BLIP captioning, LLaVA); this is clip"}]
    ests = _all_estimates(res)
    assert len(ests) > 20 and all(e["ci_low"] <= e["value"] <= e["ci_high"] and e["samples"] == 50 for e in ests)
    flat = flat_metrics(res)
    assert flat[f"zero_shot/{world}#colour_shape/top1"] == cs["metrics"]["top1"]["value"]
    assert flat[f"zero_shot/{world}#colour_shape/top1/unseen"] == cs["metrics_unseen"]["top1"]["value"]
    assert len(flat) == len(ests) and all(isinstance(v, float) for v in flat.values())
    table = results_table(res)
    assert "| zero_shot |" in table and "top1 (unseen)" in table and "captioning needs a captioning model" in table


@pytest.mark.e2e
def test_blip_captioning_and_vqa(world: Path, tiny_blip, tiny_blip_vqa) -> None:
    res = evaluate_model(tiny_blip, ["captioning", "vqa"], [str(world)], bootstrap_samples=20, num_beams=1,
                         max_length=6, max_items=5)
    cap = res["results"]["captioning"][f"{world}#captions"]
    assert cap["images"] == 5 and {"BLEU-4", "CIDEr", "ROUGE-L"} <= set(cap["metrics"])
    assert res["skipped"][0]["benchmark"] == "vqa"
    res = evaluate_model(tiny_blip_vqa, ["vqa"], [str(world)], bootstrap_samples=20)
    vqa = res["results"]["vqa"][f"{world}#vqa"]
    assert vqa["questions"] == 12 and 0.0 <= vqa["metrics"]["accuracy"]["value"] <= 1.0


def test_wrong_dataset_kind_is_skipped_with_reason(world: Path, tiny_clip) -> None:
    res = evaluate_model(
        tiny_clip, ["zero_shot"], [str(world / "captions" / "dataset_world.json")], bootstrap_samples=0
    )
    assert res["results"] == {} and "needs a classification dataset" in res["skipped"][0]["reason"]


def test_expand_datasets() -> None:
    assert expand_datasets("zero_shot", ["world"]) == ["world:shape", "world:colour", "world:colour_shape"]
    assert expand_datasets("vqa", ["world", "/data/vqa"]) == ["world:vqa", "/data/vqa"]


def test_run_suite_writes_json_table_and_record(world: Path, tmp_path: Path, tiny_clip) -> None:
    out = tmp_path / "eval"
    res = run_suite(tiny_clip, out, ["retrieval"], [str(world)], seed=3, bootstrap_samples=10)
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(json.dumps(res["results"]))
    assert (out / "results.md").read_text() == results_table(res)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "ok" and run["seed"] == 3 and run["results_file"] == "results.json"


@pytest.mark.e2e
def test_cli_generate_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wdir = tmp_path / "w"
    assert main(["world", "generate", "--out", str(wdir), "--splits", "test", "--test", "6", "-q"]) == 0
    assert json.loads((wdir / "world.json").read_text())["spec"]["test"] == 6
    out = tmp_path / "ev"
    code = main(["evaluate", "-m", "tiny-clip", "-d", str(wdir), "-b", "retrieval", "--bootstrap", "5", "-o", str(out)])
    assert code == 0 and (out / "results.json").is_file()
    assert "| retrieval |" in capsys.readouterr().out
    assert main(["evaluate", "-m", "tiny-clip", "-d", str(tmp_path / "none"), "-o", str(tmp_path / "e2")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["evaluate", "-m", "tiny-clip", "-b", "nonsense", "-o", str(tmp_path / "e3")]) == 2
