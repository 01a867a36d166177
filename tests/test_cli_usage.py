"""CLI usage errors: Click's usage line and message on stderr, exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rcc_compression
from rcc_compression.cli import main

SRC = Path(rcc_compression.__file__).resolve().parents[1]  # the package this suite imports, for the subprocess

CASES = [
    (["evaluate", "--no-such-flag"], "Usage: rcc evaluate", "No such option: --no-such-flag"),
    (["compres"], "Usage: rcc", "No such command 'compres'"),
    (["train", "--from"], "Usage: rcc train", "Option '--from' requires an argument"),
    (["world", "generate"], "Usage: rcc world generate", "Missing option '--out'"),
    (["compress", "--seed", "abc"], "Usage: rcc compress", "Invalid value for '--seed'"),
    (["evaluate", "--bootstrap", "many"], "Usage: rcc evaluate", "Invalid value for '--bootstrap'"),
    (["world", "generate", "--out", "x", "extra"], "Usage: rcc world generate", "Got unexpected extra argument"),
    (["world", "train-reference", "--kind"], "Usage: rcc world train-reference",
     "Option '--kind' requires an argument"),
    (["world", "nope"], "Usage: rcc world", "No such command 'nope'"),
]


@pytest.mark.parametrize(("argv", "usage", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_usage_error_in_process(capsys, argv, usage, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert usage in err and message in err
    assert "Traceback" not in err


@pytest.mark.e2e
@pytest.mark.parametrize(("argv", "usage", "message"), CASES[:4], ids=[" ".join(c[0]) for c in CASES[:4]])
def test_usage_error_as_a_command(argv, usage, message):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "rcc_compression", *argv], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert usage in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr and not res.stdout
