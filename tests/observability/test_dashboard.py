"""The dashboard's page logic under Streamlit's AppTest, on the session's two runs (and a live one)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the dashboard needs streamlit (the observe extra)")

from streamlit.testing.v1 import AppTest  # noqa: E402

from rcc_compression.visualization.dashboard import APP, RUNS_ENV  # noqa: E402
from rcc_compression.visualization.dashboard.views import filter_rows  # noqa: E402
from rcc_compression.visualization.figures import FIGURES  # noqa: E402


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def app(runs_root, small_run, second_run, monkeypatch):
    monkeypatch.setenv(RUNS_ENV, str(runs_root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    return at


def _table_runs(at: AppTest) -> list[str]:
    return list(at.dataframe[0].value["run"])


@pytest.mark.e2e
def test_runs_table_filter_and_sort(app, small_run, second_run):
    app.run()
    assert not app.exception
    assert app.title[0].value == "rcc-compression runs"
    assert sorted(_table_runs(app)) == sorted([small_run.name, second_run.name])
    app.text_input(key="filter_text").input("harder").run()
    assert _table_runs(app) == [second_run.name]
    app.text_input(key="filter_text").input("").run()
    app.selectbox(key="sort_by").select("rate (layers)").run()
    assert _table_runs(app) == [second_run.name, small_run.name]  # highest rate first


@pytest.mark.e2e
def test_run_page_shows_figures_layers_and_is_read_only(app, runs_root, small_run):
    before = _tree(runs_root)
    app.run()
    app.selectbox(key="run_choice").select(small_run.name).run()
    assert not app.exception
    assert len(app.get("image")) >= 8  # the six figures of the run and the layer drill-down's two
    titles = " ".join(m.value for m in app.markdown)
    for name in ("rate_quality", "cascade_trace", "layer_heatmap", "spectra", "weights", "attention"):
        assert f"**{FIGURES[name].title}**" in titles
    assert any(m.label == "cascade steps" for m in app.metric)
    layers = json.loads((small_run / "compressed" / "manifest.json").read_text())["layers"]
    app.selectbox(key="layer_choice").select(list(layers)[-1]).run()
    assert any(m.label == "rank" and m.value == f"{layers[list(layers)[-1]]['rank']} / "
               f"{min(layers[list(layers)[-1]]['in_features'], layers[list(layers)[-1]]['out_features'])}"
               for m in app.metric)
    assert _tree(runs_root) == before


def test_compare_and_search_pages(app, small_run, second_run):
    app.run()
    app.sidebar.radio(key="page").set_value("Compare runs").run()
    assert not app.exception
    table = app.dataframe[-1].value
    assert f"{small_run.name} (compressed)" in table.columns and f"{second_run.name} (compressed)" in table.columns
    app.sidebar.radio(key="page").set_value("Search studies").run()
    assert any("No search study" in i.value for i in app.info)


def test_live_progress_of_a_running_job(tmp_path, monkeypatch):
    run = tmp_path / "live"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running", "host": {}}))
    (run / ".lock").write_text(str(os.getpid()))  # held by a live process
    achieved = {"layers": 4, "dense_dtype": "float32", "dense_bytes": 4000, "stored_bytes": 3000,
                "compression_rate": 0.25, "dense_bytes_fp32": 4000, "compression_rate_vs_fp32": 0.25, "sparsity": 0.3,
                "layers_with_sparse_part": 4, "layers_with_low_rank_part": 0, "mean_rank": 0.0}
    records = [{"record_version": 1, "step": 0, "round": 1, "stage": "dare", "targets": {"pruning_rate": 0.3},
                "achieved": achieved, "metric": 0.97, "retention": 0.97, "threshold": 0.9, "passed": True,
                "seconds": 1.5, "summary": {}}]
    (run / "progress.json").write_text(json.dumps({"format": "rcc-cascade-progress", "next_step": 1, "total_steps": 4,
                                                   "records": records}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "metrics", "series": "train", "step": 7,
                                                   "values": {"loss": 0.125}}) + "\n")
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["status"] == "running" and metrics["cascade steps"] == "1/4"
    assert metrics["gate retention"] == "0.9700"
    assert any("latest loss 0.125" in c.value for c in at.caption)
    (run / ".lock").write_text("999999999")  # its process is gone
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert {m.label: m.value for m in at.metric}["status"] == "interrupted"


def test_filter_rows_keeps_missing_values_last():
    rows = [{"run": "a", "model": "m", "stages": "", "kind": "compress", "status": "ok", "x": None},
            {"run": "b", "model": "m", "stages": "", "kind": "evaluate", "status": "failed: E", "x": 2.0},
            {"run": "c", "model": "n", "stages": "dare", "kind": "compress", "status": "ok", "x": 1.0}]
    assert [r["run"] for r in filter_rows(rows, sort_by="x")] == ["c", "b", "a"]
    assert [r["run"] for r in filter_rows(rows, sort_by="x", descending=True)] == ["b", "c", "a"]
    assert [r["run"] for r in filter_rows(rows, text="dare")] == ["c"]
    assert [r["run"] for r in filter_rows(rows, statuses=["failed"])] == ["b"]


def test_search_page_draws_a_studys_pareto_front(search_dir, monkeypatch):
    monkeypatch.setenv(RUNS_ENV, str(search_dir.parent))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.sidebar.radio(key="page").set_value("Search studies").run()
    assert not at.exception and len(at.get("image")) == 1 and not at.info


@pytest.mark.e2e
def test_run_page_shows_the_figures_rcc_analyze_wrote(tmp_path, small_run, monkeypatch):
    import shutil

    from matplotlib.figure import Figure

    run = tmp_path / "analysed"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("wandb", "tensorboard", "checkpoints"))
    fig = Figure()
    fig.subplots().plot([0, 1])
    (run / "analysis").mkdir()
    fig.savefig(run / "analysis" / "grassmann.png")
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and any(m.value == "**rcc analyze: grassmann**" for m in at.markdown)
