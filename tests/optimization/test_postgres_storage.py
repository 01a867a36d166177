"""``rcc search --storage postgresql://...`` with the URL as the README and docker-compose write it (no driver
named): the installed driver (psycopg 3, else psycopg2) is chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rcc_compression.cli import main
from rcc_compression.optimization.search import storage_url

from .conftest import write_search


def test_plain_postgresql_url_names_an_installed_driver(tmp_path: Path) -> None:
    url = storage_url("postgresql://user@db/rcc", tmp_path)
    assert url.startswith(("postgresql+psycopg://", "postgresql+psycopg2://")) and url.endswith("user@db/rcc")


@pytest.mark.integration
def test_search_on_the_documented_url_form(postgres_url: str, tmp_path: Path) -> None:
    plain = "postgresql://" + postgres_url.split("://", 1)[1]  # as the docs show it: no +driver
    spec = write_search(tmp_path / "spec", {"compression.dare.pruning_rate": {"low": 0.2, "high": 0.8}},
                        {"name": "docs-url", "trials": 1, "pruner": "none", "startup_trials": 1})
    out = tmp_path / "search"
    assert main(["search", "--config", str(spec), "--storage", plain, "--output", str(out), "-q"]) == 0
    rows = json.loads((out / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["COMPLETE"]
