"""``rcc search`` on SQLite with a tiny CLIP: validation, exact trial counts, pruning, grid, Pareto fronts,
and a best config that ``rcc compress --config`` reproduces bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from rcc_compression.cli import main
from rcc_compression.errors import ConfigError
from rcc_compression.optimization.search import Search, pareto_mask
from rcc_compression.optimization.space import base_params, config_for, load_search_config

from .conftest import write_search

SEARCH_FILES = sorted((Path(__file__).resolve().parents[2] / "config" / "search").glob("*.yaml"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_search_file_is_validated_against_the_config_schema(search_dir: Path) -> None:
    def err(space: dict, **kw) -> str:
        with pytest.raises(ConfigError) as exc:
            load_search_config(write_search(search_dir, space, {"trials": 2}, **kw))
        return str(exc.value)

    msg = err({"compression.dare.pruning_rat": {"low": 0.1, "high": 0.5}})
    assert "search.yaml" in msg and "compression.dare.pruning_rat: not a key" in msg
    msg = err({"compression.dare.scorer": {"choices": ["magnitude", "bogus"]}})
    assert "space.compression.dare.scorer.choices[1]" in msg and "magnitude" in msg
    msg = err({"compression.dare.pruning_rate": {"low": 0.1, "high": 1.5}})
    assert "space.compression.dare.pruning_rate.high" in msg
    assert "numeric key" in err({"compression.dare.scorer": {"low": 1, "high": 2}})
    assert "integer" in err({"compression.dare.iterations": {"low": 1, "high": 2.5}})
    assert "exactly one of" in err({"compression.dare.scorer": {"choices": ["wanda"], "low": 1, "high": 2}})
    assert "permutations_of[0]" in err({"compression.cascade.stages": {"permutations_of": ["dare", "nulu"]}})
    assert "prunes single-objective" in err({"compression.dare.pruning_rate": {"low": 0.1, "high": 0.5}},
                                            objectives=[{"metric": "gate_retention"}, {"metric": "stored_bytes"}])
    assert "evaluation.benchmarks" in err({"compression.dare.pruning_rate": {"low": 0.1, "high": 0.5}},
                                          objectives=[{"metric": "retention"}])
    ok = load_search_config(write_search(search_dir, {"compression.cascade.stages": {"permutations_of": [
        "dare", "nullu"]}}, {"trials": 2}))
    assert ok.space["compression.cascade.stages"].options() == [["dare", "nullu"], ["nullu", "dare"]]


@pytest.mark.e2e
def test_cli_search_and_best_config_reproduces_exactly(search_dir: Path, tmp_path: Path) -> None:
    spec = write_search(search_dir / "spec", {
        "compression.dare.pruning_rate": {"low": 0.2, "high": 0.8},
        "compression.dare.scorer": {"choices": ["magnitude", "random"]},
        "compression.cascade.stages": {"permutations_of": ["dare", "nullu"]},
    }, {"name": "cli", "trials": 5, "pruner": "none", "startup_trials": 1})
    out = tmp_path / "search"
    assert main(["search", "--config", str(spec), "--trials", "3", "--output", str(out), "-q"]) == 0
    rows = json.loads((out / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3  # --trials overrides the file's 5
    assert rows[0]["base_config"] and rows[0]["params"]["compression.dare.pruning_rate"] == 0.5
    assert (out / "trials.csv").read_text().count("\n") == 4
    for name in ("pareto.json", "pareto.csv", "pareto.png", "best.yaml", "summary.md", "run.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "search_results.json").read_text())
    best = report["best"]
    assert best["metrics"]["gate_retention"] == max(r["metrics"]["gate_retention"] for r in rows)
    # rerunning the same command finds the study complete and adds nothing
    assert main(["search", "--config", str(spec), "--trials", "3", "--output", str(out), "-q"]) == 0
    assert len(json.loads((out / "trials.json").read_text())) == 3
    # the best trial's config reproduces the trial exactly
    again = tmp_path / "again"
    assert main(["compress", "--config", str(out / "best.yaml"), "-o", str(again), "--no-eval", "-q"]) == 0
    trial_dir = Path(best["trial_dir"])
    assert _sha(again / "compressed" / "layers.safetensors") == _sha(trial_dir / "compressed" / "layers.safetensors")
    res = json.loads((again / "results.json").read_text())
    assert res["gate"]["retention"] == best["metrics"]["gate_retention"]
    assert yaml.safe_load((again / "config.yaml").read_text()) == yaml.safe_load((out / "best.yaml").read_text())


@pytest.mark.e2e
def test_median_pruner_stops_a_bad_trial_on_the_gate_metric(search_dir: Path) -> None:
    spec = load_search_config(write_search(search_dir, {"compression.dare.pruning_rate": {"low": 0.1, "high": 0.97}},
                                           {"name": "prune", "trials": 3, "pruner": "median", "startup_trials": 2,
                                            "enqueue_base": False}))
    s = Search(spec, search_dir / "out")
    for rate in (0.3, 0.35, 0.97):
        s.study.enqueue_trial({"compression.dare.pruning_rate": rate})
    report = s.run()
    trials = s.study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert all(t.intermediate_values for t in trials)  # gate retention reported after cascade steps
    bad = trials[2]
    assert bad.user_attrs["pruned_at"]["step"] == 0  # stopped after its first step ...
    assert not (Path(bad.user_attrs["trial_dir"]) / "compressed").exists()  # ... before the cascade finished
    assert report["counts"] == {"COMPLETE": 2, "PRUNED": 1}


@pytest.mark.e2e
def test_grid_search_visits_every_point_once(search_dir: Path) -> None:
    spec = load_search_config(write_search(search_dir, {
        "compression.dare.scorer": {"choices": ["magnitude", "random"]},
        "compression.dare.pruning_rate": {"low": 0.3, "high": 0.5, "step": 0.2},
    }, {"name": "grid", "trials": 10, "sampler": "grid", "pruner": "none"}))
    s = Search(spec, search_dir / "out")
    assert s.target == 4  # the grid has 4 points; asking for 10 runs each once
    s.run()
    done = [t.params for t in s.study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 4
    assert {(p["compression.dare.scorer"], round(p["compression.dare.pruning_rate"], 6)) for p in done} == {
        ("magnitude", 0.3), ("magnitude", 0.5), ("random", 0.3), ("random", 0.5)}


@pytest.mark.e2e
def test_multi_objective_front_and_byte_constraint(search_dir: Path) -> None:
    spec = load_search_config(write_search(
        search_dir, {"compression.dare.pruning_rate": {"low": 0.2, "high": 0.9}},
        {"name": "mo", "trials": 4, "sampler": "nsga2", "pruner": "none"},
        objectives=[{"metric": "gate_retention"}, {"metric": "stored_bytes"}],
        constraints={"max_stored_bytes": 10**9}))
    report = Search(spec, search_dir / "out").run()
    assert report["counts"] == {"COMPLETE": 4}
    front = report["pareto"]["trials"]
    rows = json.loads((search_dir / "out" / "trials.json").read_text())
    points = [[r["metrics"]["gate_retention"], r["metrics"]["stored_bytes"]] for r in rows]
    mask = pareto_mask(points, ["maximize", "minimize"])
    assert sorted(p["number"] for p in front) == sorted(r["number"] for r, m in zip(rows, mask, strict=True) if m)
    assert all(r["feasible"] and r["constraint"]["max_stored_bytes"] < 0 for r in rows)
    assert report["best"]["number"] in {p["number"] for p in front}


def test_pareto_mask() -> None:
    pts = [[0.9, 100], [0.8, 50], [0.85, 120], [0.9, 100]]
    assert pareto_mask(pts, ["maximize", "minimize"]) == [True, True, False, True]


@pytest.mark.e2e
def test_hyperband_pruner_and_the_optimize_call(search_dir: Path) -> None:
    import optuna

    from rcc_compression.optimization.search import make_pruner, optimize

    spec = load_search_config(write_search(search_dir, {"compression.dare.pruning_rate": {"low": 0.2, "high": 0.8}},
                                           {"name": "hb", "trials": 2, "pruner": "hyperband"}))
    assert isinstance(make_pruner(spec), optuna.pruners.HyperbandPruner)
    report = optimize(spec, search_dir / "out")
    assert sum(report["counts"].get(k, 0) for k in ("COMPLETE", "PRUNED")) == 2


@pytest.mark.parametrize("path", SEARCH_FILES, ids=[p.stem for p in SEARCH_FILES])
def test_shipped_search_files_validate_and_start_from_their_base(path: Path) -> None:
    search = load_search_config(path)
    assert base_params(search) is not None  # trial 0 runs the base recipe: the best is judged against it
    cfg = config_for(search, {})
    assert cfg.model.name == "rcc-clip-world" and cfg.compression.cascade.target_rate == 0.75
