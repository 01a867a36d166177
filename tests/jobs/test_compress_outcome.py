"""A compress run leads its printed table and results.md with the target, what it reached and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rcc_compression import CompressionPipeline, get_model
from rcc_compression.cli import main

TINY = ["--model", "tiny-clip", "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=4",
        "--set", "calibration.batch_size=4", "--set", "compression.dare.iterations=3",
        "--set", "compression.dare.fine_tune_epochs=0", "--set", "compression.alphaedit.num_epochs=1",
        "--set", "compression.cascade.stages=[dare]", "--set", "evaluation.benchmarks=[]", "--no-eval", "-q"]


def test_early_stop_leads_the_table_and_results_md(tmp_path, capsys):
    run = tmp_path / "run"
    # a tiny random model keeps 0.9 output agreement in round 1 (of 3) of 95 % sparsity, not in round 2
    assert main(["compress", *TINY, "--set", "compression.dare.pruning_rate=0.95",
                 "--set", "compression.cascade.validation_threshold=0.9", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    outcome = results["outcome"]
    assert outcome["status"] == "stopped early" and results["stopped_early"]
    assert outcome["target"] == 0.95 and outcome["measure"] == "sparsity of S"
    assert 0.1 < outcome["reached"] < 0.5 and outcome["why"].startswith("stopped at step 1 of 3 (dare, round 2): gate "
                                                                        "retention")
    assert outcome["why"].endswith("kept step 0, the smallest passing state")
    # the table's first rows are target, reached (with the status) and why; the title says it too
    body = out[out.index("metric"):]
    first = [line for line in body.splitlines() if "│" in line][:3]
    assert "target: sparsity of S" in first[0] and "0.9500" in first[0]
    assert "reached: sparsity of S" in first[1] and "STOPPED EARLY" in first[1]
    assert "STOPPED EARLY" in out.split("metric")[0]
    assert "STOPPED EARLY: target sparsity of S 0.9500 (dare.pruning_rate); reached sparsity of S" in out
    md = (run / "results.md").read_text().splitlines()
    assert md[2].startswith("**STOPPED EARLY: target sparsity of S 0.9500") and "Stopped at step" in md[2]
    assert md[6].startswith("| target: sparsity of S") and "STOPPED EARLY" in md[7]
    assert json.loads((run / "run.json").read_text())["results"]["outcome"]["status"] == "stopped early"


@pytest.mark.e2e
def test_a_met_target_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["compress", *TINY, "--set", "compression.dare.pruning_rate=0.3",
                 "--set", "compression.cascade.validation_threshold=0.0", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    outcome = json.loads((run / "results.json").read_text())["outcome"]
    assert outcome["status"] == "met" and abs(outcome["reached"] - 0.3) <= 0.01
    assert outcome["why"] == "all 3 of 3 steps passed the gate"
    assert "MET: target sparsity of S 0.3000" in out


def readme_pipeline_snippet() -> str:
    """The README's step-by-step ``CompressionPipeline`` lines, verbatim."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("pipe = (CompressionPipeline()")
    end = text.index("pipe.get_stage_results()", start)
    return text[start:end]


@pytest.mark.e2e
def test_readme_pipeline_calibrates_on_the_world_and_runs_every_stage():
    """Like compress_model, the step-by-step pipeline calibrates a bundled model on the world data (not noise):
    the README's example passes every gate and ends with all three stages applied."""
    scope: dict = {"CompressionPipeline": CompressionPipeline, "get_model": get_model}
    exec(readme_pipeline_snippet(), scope)  # noqa: S102 - the README's own lines
    results = scope["pipe"].get_stage_results()
    assert results["calibration"] == "world" and results["gate"] == "measured"
    assert not results["stopped_early"]
    steps = [r for r in results["records"] if "step" in r]
    assert [r["stage"] for r in steps] == ["dare", "nullu", "alphaedit"] * 3 and all(r["passed"] for r in steps)
    assert steps[-1]["achieved"]["compression_rate"] > 0.4


def test_pipeline_on_a_module_without_data_still_warns_and_uses_noise(tiny_clip):
    pipe = CompressionPipeline().add_stage("dare", {"pruning_rate": 0.3, "iterations": 1, "fine_tune_epochs": 0})
    pipe.compress(tiny_clip.model)  # a bare nn.Module: no tokenizer, no world
    assert pipe.get_stage_results()["calibration"] == "synthetic noise"
    wrapped = CompressionPipeline().add_stage("dare", {"pruning_rate": 0.3, "iterations": 1, "fine_tune_epochs": 0})
    wrapped.compress(get_model("tiny-clip"))
    assert wrapped.get_stage_results()["calibration"] == "world"
