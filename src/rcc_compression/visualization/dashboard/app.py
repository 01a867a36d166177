"""Streamlit entry point: ``streamlit run app.py -- --runs DIR [--refresh S]`` (what ``rcc dashboard`` runs)."""

from __future__ import annotations

import argparse
import os

from rcc_compression.visualization.dashboard import RUNS_ENV
from rcc_compression.visualization.dashboard.views import render

parser = argparse.ArgumentParser(prog="rcc dashboard")
parser.add_argument("--runs", default=os.environ.get(RUNS_ENV, "runs"))
parser.add_argument("--refresh", type=float, default=2.0)
args, _ = parser.parse_known_args()
render(args.runs, refresh=args.refresh)
