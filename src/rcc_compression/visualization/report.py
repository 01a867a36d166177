"""Comparison tables of runs (``rcc report``): metrics with CIs, bytes, rate, latency; md, csv, LaTeX, JSON, HTML.

:func:`comparison_rows` turns run directories into tidy rows ``(run, variant, metric, value,
ci_low, ci_high)`` taken verbatim from each run's ``results.json`` (a compress run has a ``dense``
and a ``compressed`` variant, an evaluation run one variant named after its model, a recovery run
``before`` and ``after``). CSV and JSON carry the numbers exactly; the Markdown, LaTeX and HTML
tables round them for reading (4 decimals; bytes and counts as integers).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from typing import Any

from .records import RunRecords

FORMATS = ("md", "csv", "latex", "json", "html")
COLUMNS = ("run", "variant", "metric", "value", "ci_low", "ci_high")


def _row(run: str, variant: str, metric: str, value: Any, lo: Any = None, hi: Any = None) -> dict[str, Any]:
    return {"run": run, "variant": variant, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi}


def _compress_rows(run: RunRecords) -> list[dict[str, Any]]:
    res = run.results or {}
    rows: list[dict[str, Any]] = []
    for variant in ("dense", "compressed"):
        ci = run.quality_ci(variant)
        for key, value in res.get("quality", {}).get(variant, {}).items():
            lo, hi = (ci.get(key) or [None, None])[:2]
            rows.append(_row(run.name, variant, key, value, lo, hi))
    gate = res.get("gate", {})
    if gate.get("retention") is not None:
        rows.append(_row(run.name, "compressed", "gate retention", gate["retention"]))
    for variant in ("dense", "compressed"):
        eff = res.get("efficiency", {}).get(variant) or {}
        storage = eff.get("storage", {})
        for key in ("stored_bytes_model", "stored_bytes_layers", "compression_rate_layers", "compression_rate_model"):
            # the dense model has no compressed layers: its "layers" bytes are 0 by construction, not a figure
            if key in storage and not (variant == "dense" and key == "stored_bytes_layers"):
                rows.append(_row(run.name, variant, key.replace("_", " "), storage[key]))
        params = eff.get("parameters", {})
        if "stored" in params:
            rows.append(_row(run.name, variant, "parameters stored", params["stored"]))
        memory = eff.get("memory", {})
        if "resident_bytes" in memory:
            rows.append(_row(run.name, variant, "resident bytes (tensors held, loaded)", memory["resident_bytes"]))
        for bs, entry in eff.get("per_batch_size", {}).items():
            lat = entry.get("latency", {})
            if "median_ms" in lat:
                where = "CPU" if eff.get("device") == "cpu" else str(eff.get("device", ""))
                rows.append(_row(run.name, variant, f"{where} latency ms bs={bs} (median)".strip(), lat["median_ms"]))
    inference = res.get("inference") or {}
    if inference.get("tried"):
        mix = ", ".join(f"{k} {v}" for k, v in sorted((inference.get("kernels") or {}).items()))
        rows.append(_row(run.name, "compressed", "compute dtype", str(inference.get("dtype"))))
        rows.append(_row(run.name, "compressed", "inference kernels", mix))
    return rows


def _evaluate_rows(run: RunRecords) -> list[dict[str, Any]]:
    res = run.results or {}
    variant = str(res.get("model") or "model")
    rows: list[dict[str, Any]] = []
    for bench, per_ds in res.get("results", {}).items():
        for ds, entry in per_ds.items():
            if bench == "efficiency":
                prof = entry.get("profile", {})
                if "stored" in prof.get("parameters", {}):
                    rows.append(_row(run.name, variant, "parameters stored", prof["parameters"]["stored"]))
                for bs, e in prof.get("per_batch_size", {}).items():
                    if "median_ms" in e.get("latency", {}):
                        rows.append(_row(run.name, variant, f"latency ms bs={bs} (median)", e["latency"]["median_ms"]))
                continue
            groups = [("", entry.get("metrics", {}))]
            groups += [(f" ({k.split('_', 1)[1]})", v) for k, v in entry.items() if k.startswith("metrics_")]
            for suffix, metrics in groups:
                for name, m in metrics.items():
                    if isinstance(m, dict) and "value" in m:
                        rows.append(_row(run.name, variant, f"{bench} {ds} {name}{suffix}", m["value"],
                                         m.get("ci_low"), m.get("ci_high")))
    return rows


def _train_rows(run: RunRecords) -> list[dict[str, Any]]:
    res = run.train_results or {}
    rows = []
    for variant in ("before", "after"):
        for key, value in (res.get(variant) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append(_row(run.name, variant, key, value))
    if "steps" in res:
        rows.append(_row(run.name, "after", "training steps", res["steps"]))
    return rows


def comparison_rows(runs: Sequence[RunRecords], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Tidy rows of every run's figures, verbatim from its results; ``metrics`` keeps rows containing any of them."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        kind = run.kind
        if kind == "train":
            rows += _train_rows(run)
        elif kind == "compress" or "quality" in (run.results or {}):
            rows += _compress_rows(run)
        else:
            rows += _evaluate_rows(run)
    if metrics:
        rows = [r for r in rows if any(m in r["metric"] for m in metrics)]
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(run, variant) columns in order of appearance."""
    return list(dict.fromkeys((r["run"], r["variant"]) for r in rows))


def _fmt(value: Any, lo: Any = None, hi: Any = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    v = float(value)
    text = f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4f}"
    if lo is not None and hi is not None:
        text += f" [{float(lo):.4f}, {float(hi):.4f}]"
    return text


def wide_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the reading table: one row per metric, one column per (run, variant)."""
    cols = _columns(rows)
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    cell = {(r["metric"], r["run"], r["variant"]): _fmt(r["value"], r["ci_low"], r["ci_high"]) for r in rows}
    header = ["metric"] + [f"{run} ({variant})" for run, variant in cols]
    body = [[m] + [cell.get((m, run, variant), "-") for run, variant in cols] for m in metrics]
    return header, body


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in text)


def render(rows: Sequence[dict[str, Any]], fmt: str, runs: Sequence[RunRecords] = ()) -> str:
    """The table in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "json":
        meta = [{"run": r.name, "path": str(r.path), "kind": r.kind, "model": r.model,
                 "stages": (r.results or {}).get("stages")} for r in runs]
        return json.dumps({"runs": meta, "rows": list(rows)}, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                             for k in COLUMNS})
        return buf.getvalue()
    header, body = wide_table(rows)
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>rcc report</title>\n"
            "<style>table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 8px}td{text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{trs}\n</tbody>\n</table>\n"
            "</body></html>\n")
