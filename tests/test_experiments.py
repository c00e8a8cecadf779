"""The experiment files shipped in experiments/ run from a fresh clone, from any directory."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluators.table import TableEvaluator, resolve_table

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MACRO = REPO / "experiments" / "macro_bench.yaml"


def test_macro_bench_searches_the_packaged_table_from_any_directory(tmp_path):
    """`nas search` of experiments/macro_bench.yaml by its absolute path from another directory (the
    README's relative form from the root resolves as every other experiment's in these tests): every trial
    is a look-up in the table shipped inside the package, wherever `nas` runs."""
    cwd, experiment = tmp_path, str(MACRO)
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "nas.cli", "search", experiment, "--set", "num_trials=4",
                        "--set", "top_k=2", "--set", f"output_dir={out}", "--set", "search.algorithm=random"],
                       cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = list(csv.DictReader((out / "macro_bench" / "trials.csv").open()))
    table = TableEvaluator(resolve_table("nas-bench-macro"))
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert len({row["key"] for row in rows}) == 4
    for row in rows:  # the accuracy each trial reports is the table's (percent -> fraction) for its key
        assert float(row["accuracy"]) == pytest.approx(table.evaluate(row["key"])["accuracy"] / 100)
