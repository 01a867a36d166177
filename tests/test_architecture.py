"""The import layers hold: the import-linter contract of pyproject.toml, and no import hidden in a function.

The contract runs on the package this suite imports (``src/`` or the installed tree), and on a copy
with one upward import planted, so the check is known to fail when the layers are broken.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rcc_compression
from rcc_compression.compression.cascade import CascadePipeline as EngineCascade

PACKAGE = Path(rcc_compression.__file__).resolve().parent
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
LINT = ("import sys; from importlinter.cli import lint_imports_command; "
        "sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())")


def _lint(package_parent: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", LINT, "--config", str(PYPROJECT), "--no-cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_import_contract_is_kept(tmp_path: Path) -> None:
    """``lint-imports`` (the layers and the no-cycle contracts) passes on this package."""
    res = _lint(PACKAGE.parent, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.integration
def test_import_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The same check fails, naming the import, when the engine imports the training layer."""
    copy = tmp_path / "tree" / "rcc_compression"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.json"))
    stage = copy / "compression" / "stage.py"
    stage.write_text(stage.read_text() + "\n\ndef _upward() -> None:\n    from ..training import recovery  # noqa\n")
    res = _lint(copy.parent, tmp_path)
    assert res.returncode != 0
    assert "rcc_compression.compression.stage -> rcc_compression.training.recovery" in res.stdout


def _function_level_internal_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("rcc_compression")):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("rcc_compression") for a in node.names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.names[0].name}")
    return found


def test_no_package_import_hides_in_a_function() -> None:
    """Modules import each other at the top, where the contract sees the layering.

    The one exception is the CLI, the top layer: nothing imports it, so its deferred imports cannot
    hide a circle; they keep ``rcc --help`` from loading torch. Function-level imports of heavy or
    optional third-party packages are allowed everywhere.
    """
    found = [hit for f in sorted(PACKAGE.rglob("*.py")) if f.name != "cli.py" or f.parent != PACKAGE
             for hit in _function_level_internal_imports(f)]
    assert not found, "function-level imports of the package:\n" + "\n".join(found)


def test_public_pipeline_distils() -> None:
    """``rcc_compression.CompressionPipeline`` is the engine's ``CascadePipeline`` with the distiller wired in;
    one class bears each name."""
    from rcc_compression import CompressionPipeline
    from rcc_compression.training.recovery import finetune_on_batches

    assert issubclass(CompressionPipeline, EngineCascade) and CompressionPipeline is not EngineCascade
    assert not hasattr(rcc_compression, "CascadePipeline")
    pipe = CompressionPipeline()
    assert pipe.distill is not None and pipe.distill.func is finetune_on_batches


def test_the_stated_line_length_and_function_length_hold_without_exceptions() -> None:
    """ruff's line length (pyproject) has no ``noqa`` escapes, and no function is over 120 lines (split into steps)."""
    import tomllib

    limit = tomllib.loads(PYPROJECT.read_text())["tool"]["ruff"]["line-length"]
    escape = "noqa: " + "E501"
    roots = [PACKAGE, PYPROJECT.parent / "tests", PYPROJECT.parent / "benchmarks"]
    long_lines, long_functions = [], []
    for f in sorted(p for root in roots if root.is_dir() for p in root.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        long_lines += [f"{f.name}:{i}" for i, line in enumerate(text.splitlines(), 1)
                       if len(line) > limit or escape in line]
        if f.is_relative_to(PACKAGE):
            long_functions += [f"{f.name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
                               for n in ast.walk(ast.parse(text))
                               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                               and n.end_lineno - n.lineno + 1 > 120]
    assert not long_lines, long_lines
    assert not long_functions, long_functions
