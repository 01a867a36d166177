"""The figures the docs print are the ones their commands make.

The dense figures of the bundled CLIP are checked against its ``reference.json`` (which
``tests/models/test_reference.py`` re-measures); the README's ``make demo`` table is re-made by
running the demo (``slow``: about a minute) and compared row by row, the rows that follow from timings
aside (they are the machine's, not the code's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "src" / "rcc_compression" / "models" / "reference" / "rcc-clip-world" / "reference.json"


def _rows(markdown: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell."""
    out = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def _demo_table() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## What `make demo` shows"):]
    return section[:section.index("\n## ")]


def test_the_dense_figures_in_the_docs_are_the_reference_models() -> None:
    fig = json.loads(REFERENCE.read_text())["figures"]
    dense = {"zero-shot top-1 (world:shape)": fig["zero_shot_shape_top1"],
             "zero-shot top-1 (world:colour)": fig["zero_shot_colour_top1"],
             "zero-shot top-1 (world:colour_shape)": fig["zero_shot_colour_shape_top1"],
             "retrieval R@1 image->text (world:captions)": fig["retrieval_i2t_R@1"],
             "retrieval R@1 text->image (world:captions)": fig["retrieval_t2i_R@1"]}
    rows = _rows(_demo_table())
    for name, value in dense.items():
        assert rows[name][0] == f"{value:.4f}", (name, rows[name])
    analysis = " ".join((ROOT / "docs" / "analysis.md").read_text(encoding="utf-8").split())
    assert (f"Dense: top-1 {fig['zero_shot_colour_shape_top1']:.4f}, image-to-text R@1 {fig['retrieval_i2t_R@1']:.4f}, "
            f"text-to-image R@1 {fig['retrieval_t2i_R@1']:.4f}") in analysis
    for m in re.finditer(r"\(dense (\d\.\d{4}), (\d+) items\)", analysis):
        assert float(m.group(1)) in {round(v, 4) for v in dense.values()}, m.group(0)


@pytest.mark.slow
def test_the_readme_demo_table_is_what_make_demo_prints(tmp_path: Path) -> None:
    from rcc_compression.cli import main

    assert main(["compress", "--config", str(ROOT / "config" / "experiments" / "demo.yaml"), "--output",
                 str(tmp_path / "demo")]) == 0
    made = _rows((tmp_path / "demo" / "results.md").read_text(encoding="utf-8"))
    shown = _rows(_demo_table())
    # timings, and what follows from them (kernels chosen by speed, the bytes their copies hold), are the machine's
    timed = ("latency", "kernels", "resident", "GFLOPs", "compute dtype")
    dtype = next(name for name in shown if name.startswith("compute dtype"))
    assert made[dtype][:2] == shown[dtype][:2], "this machine measured another compute dtype; the quality rows differ"
    compared = [name for name in shown if name in made and not any(t in name for t in timed)]
    assert len(compared) >= 10, compared
    for name in compared:
        assert shown[name][:2] == made[name][:2], (name, shown[name], made[name])
