"""The documentation builds strictly and every notebook runs top to bottom."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: mkdocs-material and properdocs print a banner about MkDocs 2 on every build; it is not a warning of ours
QUIET = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def _env() -> dict[str, str]:
    env = {**os.environ, **QUIET}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


@pytest.mark.integration
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install 'rcc-compression[docs]'")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    site = tmp_path / "site"
    config = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "leak_check" in config and "pruning_rate" in config
    # every public module has an API page, found without a list to maintain
    src = ROOT / "src" / "rcc_compression"
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts) or not (path.parent / "__init__.py").is_file():
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert (site / "reference" / "api" / name / "index.html").is_file(), name


@pytest.mark.integration
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="the docs extra is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the docs extra is not installed")
    pytest.importorskip("ipykernel", reason="the docs extra is not installed")
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    work = tmp_path / "work"
    work.mkdir()
    old = dict(os.environ)
    os.environ.update(_env())
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(work)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    left = sorted(p.name for p in work.iterdir() if p.name != ".ipynb_checkpoints")
    assert not left, f"the notebook wrote into its working directory: {left}"


def test_every_config_key_has_a_meaning() -> None:
    """The configuration reference is generated from the models: a key without a description has no meaning there."""
    from pydantic import BaseModel

    from rcc_compression.config import RCCConfig

    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif not field.description:
                missing.append(f"{prefix}{name}")

    walk(RCCConfig, "")
    assert not missing, f"config keys without Field(description=...): {', '.join(missing)}"


def test_sources_cite_pages_and_papers() -> None:
    """Docstrings and docs cite a page of the docs or a paper, never a document that is not in the repository."""
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "docs").rglob("*.md"),
             ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted(files)
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "design document" in line]
    assert not hits, hits


def _pyproject_layers() -> list[list[str]]:
    import tomllib

    contract = next(c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"] if c["id"] == "layers")
    return [[p.strip().strip("()") for p in row.split("|")] for row in contract["layers"] if row != "__main__"]


def test_the_layer_order_is_the_same_in_pyproject_contributing_and_architecture() -> None:
    import re

    layers = _pyproject_layers()
    arch = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = [re.findall(r"`(\w+)`", m) for m in re.findall(r"^\| \d+ \| ([^|]+) \|", arch, flags=re.M)]
    assert [sorted(r for r in row if r != "__main__") for row in rows] == [sorted(r) for r in layers]
    text = " ".join((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8").split())
    sentence = text[text.index("**Layers one way.**"):].split(". ", 1)[0]
    named = re.findall(r"`(\w+)`", sentence)
    assert named == [name for row in layers for name in row], sentence


def _python_snippets() -> list[tuple[str, str]]:
    """Each page's Python snippets, joined in order (a guide's later snippet goes on from its earlier ones)."""
    import re

    out = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        if blocks:
            out.append((str(page.relative_to(ROOT)), "\n".join(blocks)))
    return out


def test_python_snippets_in_the_docs_import_what_they_use() -> None:
    """A snippet a reader copies runs as far as names go: what it uses is imported or defined in it or above it."""
    import json

    ruff = pytest.importorskip("ruff.__main__", reason="ruff is in the dev extra").find_ruff_bin()
    snippets = _python_snippets()
    assert len(snippets) >= 4
    bad = {}
    for where, code in snippets:
        proc = subprocess.run([ruff, "check", "--isolated", "--select", "F821", "--output-format", "json",
                               "--stdin-filename", "snippet.py", "-"], input=code, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode:
            bad[where] = [e["message"] for e in json.loads(proc.stdout or "[]")] or proc.stderr[-500:]
    assert not bad, bad
