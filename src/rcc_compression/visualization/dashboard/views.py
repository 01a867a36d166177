"""The dashboard's page: runs table, one run (live progress, figures, layers), runs side by side, search studies.

Everything is read from run directories through :mod:`..records`; nothing is written. Figures are
the registry's (:data:`..figures.FIGURES`), rendered to PNG and cached per run state, so a
finished run is drawn once and a running one again whenever its files change.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import streamlit as st

from ...compression.records import step_records
from ..compression_plots import spectra_figure, weight_distribution_figure
from ..figures import FIGURES
from ..records import RunRecords, find_runs, load_run
from ..report import comparison_rows, wide_table

PAGES = ("Run", "Compare runs", "Search studies")


def _stamp(path: Path) -> float:
    """A number that changes whenever the run writes anything the page shows."""
    total = 0.0
    for name in ("run.json", "results.json", "progress.json", "metrics.jsonl", "train_results.json",
                 "search_results.json", "trials.json", "compressed/manifest.json", "figures/views.json"):
        try:
            total += (path / name).stat().st_mtime_ns / 1e9
        except OSError:
            continue
    return total


@st.cache_data(show_spinner=False, max_entries=256)
def _figure_png(path: str, name: str, stamp: float) -> bytes | None:
    spec = FIGURES[name]
    run = load_run(path)
    fig = spec.draw(run) if spec.scope == "run" else spec.draw([run])
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def run_row(run: RunRecords) -> dict[str, Any]:
    """One line of the runs table."""
    res = run.results or {}
    storage = run.storage("compressed")
    gate = res.get("gate", {}).get("retention")
    quality = run.quality("compressed")
    dense = run.quality("dense")
    head = next(iter(quality), None)
    memory = res.get("efficiency", {}).get("compressed", {}).get("memory", {})
    per_bs = res.get("efficiency", {}).get("compressed", {}).get("per_batch_size", {})
    latency = {f"latency ms bs={bs}": per_bs.get(bs, {}).get("latency", {}).get("median_ms") for bs in ("1", "8")}
    return {
        "run": run.name, "kind": run.kind, "status": run.status, "model": run.model,
        "stages": " -> ".join(res.get("stages", []) or []),
        "started": str(run.run.get("start_time") or ""),
        "rate (layers)": storage.get("compression_rate_layers"),
        "stored MB": (storage["stored_bytes_model"] / 1e6) if "stored_bytes_model" in storage else None,
        "resident MB": (memory["resident_bytes"] / 1e6) if "resident_bytes" in memory else None,
        "kernels": ", ".join(f"{k} {v}" for k, v in sorted((res.get("execution_kernels") or {}).items())),
        "gate retention": gate,
        "headline": head or "",
        "dense": dense.get(head) if head else None,
        "compressed": quality.get(head) if head else None,
        **latency,
        "seed": run.run.get("seed"),
    }


def filter_rows(rows: list[dict[str, Any]], text: str = "", kinds: list[str] | None = None,
                statuses: list[str] | None = None, sort_by: str | None = None, descending: bool = False
                ) -> list[dict[str, Any]]:
    """The table's filtering and sorting (text matches run, model or stages; ``None`` values sort last)."""
    text = text.strip().lower()
    out = [r for r in rows if (not text or text in f"{r['run']} {r['model']} {r['stages']}".lower())
           and (not kinds or r["kind"] in kinds)
           and (not statuses or r["status"].split(":")[0] in statuses)]
    if sort_by:
        present = [r for r in out if r.get(sort_by) is not None]
        missing = [r for r in out if r.get(sort_by) is None]
        out = sorted(present, key=lambda r: r[sort_by], reverse=descending) + missing
    return out


def _runs_table(runs: list[RunRecords]) -> list[dict[str, Any]]:
    st.subheader("Runs")
    rows = [run_row(r) for r in runs]
    c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
    text = c1.text_input("Filter (run, model, stages)", key="filter_text")
    kinds = c2.multiselect("Kind", sorted({r["kind"] for r in rows}), key="filter_kind")
    statuses = c3.multiselect("Status", sorted({r["status"].split(":")[0] for r in rows}), key="filter_status")
    sort_by = c4.selectbox("Sort by", ["started", "run", "rate (layers)", "stored MB", "resident MB", "gate retention",
                                       "compressed", "latency ms bs=1", "latency ms bs=8"], key="sort_by")
    shown = filter_rows(rows, text, kinds, statuses, sort_by, descending=sort_by in ("started", "rate (layers)",
                                                                                     "gate retention", "compressed"))
    st.dataframe(shown, hide_index=True, key="runs_table")
    st.caption(f"{len(shown)} of {len(rows)} runs")
    return shown


def _live(run: RunRecords, refresh: float = 0.0) -> None:
    """Progress of a running (or the last state of a stopped) job: steps, latest metrics, last write."""
    run = load_run(run.path, None)  # fresh read every refresh
    status = run.status
    prog = run.progress or {}
    if prog.get("format") == "rcc-train-progress":  # a recovery run: optimiser steps
        cols = st.columns(3)
        cols[0].metric("status", status)
        cols[1].metric("training steps", f"{prog.get('step', 0)}/{prog.get('total_steps', '?')}")
        if isinstance(prog.get("loss"), float):
            cols[2].metric("loss", f"{prog['loss']:.5g}")
        if prog.get("total_steps"):
            st.progress(min(prog.get("step", 0) / prog["total_steps"], 1.0),
                        text=f"epoch {prog.get('epoch', 0)} of {prog.get('num_epochs', '?')}")
        return
    records = step_records(prog.get("records", []), where=f"{run.name}: progress")
    total = prog.get("total_steps")
    done = int(prog.get("next_step", len(records)))
    cols = st.columns(4)
    cols[0].metric("status", status)
    cols[1].metric("cascade steps", f"{done}/{total}" if total else str(done))
    if records:
        last = records[-1]
        cols[2].metric("gate retention", "not measured" if last.retention is None else f"{last.retention:.4f}")
        cols[3].metric("rate (layers)", f"{last.achieved.compression_rate:.4f}")
    if total:
        st.progress(min(done / total, 1.0), text=f"cascade step {done} of {total}")
    train = run.series("train")
    if train:
        last_step = max(train)
        loss = train[last_step].get("loss")
        st.caption(f"distillation: {last_step + 1} optimiser steps logged"
                   + (f", latest loss {loss:.5g}" if isinstance(loss, float) and math.isfinite(loss) else ""))
    if status != "running":
        return
    events = [e for e in run.metric_lines() if e.get("kind") == "event" and e.get("event") == "phase"]
    if events:
        st.caption(f"phase: {events[-1].get('phase')}")
    age = run.last_update
    if age is not None:
        st.caption(f"last write {age:.0f} s ago (refreshing every {refresh:g} s)")


def _run_page(runs: list[RunRecords], refresh: float) -> None:
    names = [r.name for r in runs]
    wanted = st.query_params.get("run")  # ?run=NAME links to one run
    choice = st.selectbox("Run", names, index=names.index(wanted) if wanted in names else 0, key="run_choice")
    run = runs[names.index(choice)]
    st.header(run.name)
    st.caption(f"{run.kind} run of {run.model or '?'} in {run.path}")
    if run.status == "running":
        st.fragment(run_every=refresh)(_live)(run, refresh)
    else:
        _live(run)
    tab_fig, tab_layers, tab_table, tab_cfg = st.tabs(["Figures", "Layers", "Results", "Config and record"])
    with tab_fig:
        shown = 0
        for name, spec in FIGURES.items():
            if spec.scope != "run":
                continue
            png = _figure_png(str(run.path), name, _stamp(run.path))
            if png is None:
                continue
            st.markdown(f"**{spec.title}**: {spec.description}")
            st.image(png, caption=spec.title)
            shown += 1
        # figures `rcc analyze` wrote (Grassmann distances, overlaps, sensitivity, embeddings), as they are
        for png in sorted((run.path / "analysis").glob("*.png")):
            st.markdown(f"**rcc analyze: {png.stem.replace('_', ' ')}**")
            st.image(png.read_bytes(), caption=f"analysis/{png.name}")
            shown += 1
        if not shown:
            st.info("This run has no figures yet.")
    with tab_layers:
        _layers(run)
    with tab_table:
        rows = comparison_rows([run])
        if rows:
            header, body = wide_table(rows)
            st.dataframe([dict(zip(header, b, strict=True)) for b in body], hide_index=True)
        else:
            st.info("No results yet.")
    with tab_cfg:
        st.json(run.config, expanded=False)
        st.json({k: v for k, v in run.run.items() if k != "config"}, expanded=False)


def _layers(run: RunRecords) -> None:
    """Per-layer drill-down: the table of compressed layers, then one layer's spectrum and weights."""
    rows = run.layer_table()
    if not rows:
        st.info("No compressed model in this run.")
        return
    st.dataframe(rows, hide_index=True)
    layer = st.selectbox("Layer", [r["layer"] for r in rows], key="layer_choice")
    row = next(r for r in rows if r["layer"] == layer)
    cols = st.columns(4)
    cols[0].metric("sparsity of S", f"{row['sparsity']:.3f}" if row["sparsity"] is not None else "-")
    cols[1].metric("rank", f"{row['rank']} / {row['full_rank']}")
    cols[2].metric("bits", str(row["bits"]) if row["bits"] is not None else "not quantized")
    if row.get("dense_bytes"):
        cols[3].metric("stored / dense", f"{row['stored_bytes'] / row['dense_bytes']:.3f}")
    for fig in (spectra_figure(run, [layer]), weight_distribution_figure(run, [layer])):
        if fig is not None:
            st.image(_png(fig))


def _compare_page(runs: list[RunRecords]) -> None:
    names = [r.name for r in runs]
    chosen = st.multiselect("Runs to compare", names, default=names[:2], key="compare_runs")
    picked = [runs[names.index(n)] for n in chosen]
    if not picked:
        st.info("Pick two or more runs.")
        return
    rows = comparison_rows(picked)
    if rows:
        header, body = wide_table(rows)
        st.dataframe([dict(zip(header, b, strict=True)) for b in body], hide_index=True)
    fig = FIGURES["rate_quality_runs"].draw(picked)
    if fig is not None:
        st.image(_png(fig), caption="quality against compression rate, across runs")
    cols = st.columns(len(picked))
    for col, run in zip(cols, picked, strict=True):
        with col:
            st.markdown(f"**{run.name}**")
            png = _figure_png(str(run.path), "layer_heatmap", _stamp(run.path))
            if png is not None:
                st.image(png)


def _search_page(runs: list[RunRecords]) -> None:
    studies = [r for r in runs if r.kind == "study"]
    if not studies:
        st.info("No search study among these runs.")
        return
    names = [r.name for r in studies]
    run = studies[names.index(st.selectbox("Study", names, key="study_choice"))]
    shown = 0
    for name, spec in FIGURES.items():
        if spec.scope == "run":
            png = _figure_png(str(run.path), name, _stamp(run.path))
            if png is not None:
                st.image(png, caption=spec.title)
                shown += 1
    if not shown:
        st.info("Nothing to draw for this study.")
    st.json(run.search or {}, expanded=False)


def render(runs_dir: str, refresh: float = 2.0) -> None:
    """The whole page for the runs under ``runs_dir``."""
    st.set_page_config(page_title="rcc dashboard", layout="wide")
    st.title("rcc-compression runs")
    root = Path(runs_dir)
    st.caption(f"runs under {root.resolve()} (read only)")
    page = st.sidebar.radio("Page", PAGES, key="page")
    if st.sidebar.button("Reload runs"):
        st.cache_data.clear()
    runs = [load_run(p, root) for p in find_runs(root)]
    if not runs:
        st.warning(f"No runs found under {root}.")
        return
    shown = _runs_table(runs)
    visible = [r for r in runs if r.name in {row["run"] for row in shown}] or runs
    if page == "Run":
        _run_page(visible, refresh)
    elif page == "Compare runs":
        _compare_page(visible)
    else:
        _search_page(runs)
