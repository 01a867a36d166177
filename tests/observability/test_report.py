"""``rcc report``: the comparison table of two runs carries exactly their results.json numbers."""

from __future__ import annotations

import csv
import io
import json

import pytest

from rcc_compression.cli import main


def _expected(run_dir) -> dict[tuple[str, str], tuple]:
    """(variant, metric) -> (value, ci_low, ci_high) straight from results.json."""
    res = json.loads((run_dir / "results.json").read_text())
    out: dict[tuple[str, str], tuple] = {}
    for variant in ("dense", "compressed"):
        ci = res["quality_ci"][variant]
        for key, value in res["quality"][variant].items():
            out[(variant, key)] = (value, *ci[key])
        storage = res["efficiency"][variant]["storage"]
        out[(variant, "stored bytes model")] = (storage["stored_bytes_model"], None, None)
        out[(variant, "compression rate layers")] = (storage["compression_rate_layers"], None, None)
        for bs, entry in res["efficiency"][variant]["per_batch_size"].items():
            out[(variant, f"CPU latency ms bs={bs} (median)")] = (entry["latency"]["median_ms"], None, None)
    out[("compressed", "gate retention")] = (res["gate"]["retention"], None, None)
    return out


def _report(capsys, runs, fmt, *extra) -> str:
    assert main(["report", *map(str, runs), "--format", fmt, *extra]) == 0
    return capsys.readouterr().out


def test_json_and_csv_carry_results_numbers_exactly(small_run, second_run, capsys):
    runs = [small_run, second_run]
    rows = json.loads(_report(capsys, runs, "json"))["rows"]
    parsed = list(csv.DictReader(io.StringIO(_report(capsys, runs, "csv"))))
    assert len(parsed) == len(rows)
    for run in runs:
        expected = _expected(run)
        got = {(r["variant"], r["metric"]): (r["value"], r["ci_low"], r["ci_high"])
               for r in rows if r["run"] == run.name}
        for key, value in expected.items():
            assert got[key] == value, key
        from_csv = {(r["variant"], r["metric"]): r for r in parsed if r["run"] == run.name}
        for key, (value, lo, _) in expected.items():
            row = from_csv[key]
            assert float(row["value"]) == value and (lo is None or float(row["ci_low"]) == lo)
    # the harder run is compressed harder; the report does not blur that
    rate = {r["run"]: r["value"] for r in rows
            if r["metric"] == "compression rate layers" and r["variant"] == "compressed"}
    assert rate[second_run.name] > rate[small_run.name]


def test_markdown_table_rounds_the_same_numbers(small_run, second_run, capsys):
    text = _report(capsys, [small_run, second_run], "md")
    header = text.splitlines()[0]
    assert header == (f"| metric | {small_run.name} (dense) | {small_run.name} (compressed) "
                      f"| {second_run.name} (dense) "
                      f"| {second_run.name} (compressed) |")
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines()[2:]}
    for (variant, metric), (value, lo, hi) in _expected(second_run).items():
        if variant != "compressed":
            continue
        cell = lines[metric].strip(" |").split(" | ")[4]
        if isinstance(value, int):
            assert cell == f"{value:,}"
        else:
            assert cell.startswith(f"{value:.4f}") and (lo is None or cell.endswith(f"[{lo:.4f}, {hi:.4f}]"))


@pytest.mark.parametrize("fmt,marker", [("latex", r"\begin{tabular}"), ("html", "<table>")])
def test_paper_formats(small_run, second_run, capsys, fmt, marker, tmp_path):
    out = tmp_path / f"table.{fmt}"
    assert main(["report", str(small_run), str(second_run), "--format", fmt, "--metric", "top1", "-o", str(out)]) == 0
    text = out.read_text()
    assert marker in text and "zero" in text and "latency" not in text
    if fmt == "latex":
        assert r"zero\_shot" in text and text.rstrip().endswith(r"\end{tabular}")


def test_bad_input_is_one_line_and_status_2(tmp_path, small_run, capsys):
    assert main(["report", str(small_run), "--format", "xlsx"]) == 2
    assert "allowed: md, csv, latex, json, html" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
