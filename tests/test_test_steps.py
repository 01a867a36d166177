"""``make test`` (what CI runs) is two steps: the integration tests in one, everything else in the other."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pytest_ini() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def _make_marker(target: str) -> str | None:
    """The ``-m`` expression of a Makefile target's pytest line (None: the target passes none)."""
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert body, f"Makefile has no target {target}"
    args = shlex.split(body.group(1).replace("$(PY)", "python"))
    after = args[args.index("pytest") + 1:]
    return after[after.index("-m") + 1] if "-m" in after else None


def test_ci_runs_make_test_in_two_disjoint_steps() -> None:
    """CI calls ``make test``, whose two steps split pyproject's ``-m`` expression by the integration marker."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert "test-unit ||" in recipe and "test-integration ||" in recipe and "exit $$status" in recipe
    base = shlex.split(_pytest_ini()["addopts"])
    base = base[base.index("-m") + 1]
    assert _make_marker("test-unit") == f"{base} and not integration"
    assert _make_marker("test-integration") == f"integration and {base}"
    assert _make_marker("test-quick") == f"{base} and not integration and not e2e"


def test_the_markers_are_declared_and_there_is_a_timeout() -> None:
    ini = _pytest_ini()
    declared = {m.split(":")[0] for m in ini["markers"]}
    assert {"slow", "gpu", "integration", "e2e"} <= declared
    assert "--strict-markers" in ini["addopts"]  # a misspelt marker is an error, not a silently unselected test
    assert 0 < int(ini["timeout"]) <= 900
