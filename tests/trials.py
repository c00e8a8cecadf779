"""Reading a search's raw trials.csv in tests (the product's `nas.rundir.read_trials` renames the
latency columns; the tests check the file as written)."""

from __future__ import annotations

import csv
from pathlib import Path


def trial_rows(run_dir: Path, status: str | None = None) -> list[dict]:
    """Every row of RUN_DIR/trials.csv, or only those with `status`."""
    with (Path(run_dir) / "trials.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if status is None or r["status"] == status]


def trained_rows(run_dir: Path, *, once: bool = True) -> list[dict]:
    """The rows of the trials that were trained (infeasible suggestions never are); with `once`, assert
    that no suggestion was trained twice."""
    rows = [r for r in trial_rows(run_dir) if r["status"] != "infeasible"]
    if once:
        suggestions = [int(r["suggestion"]) for r in rows]
        assert len(set(suggestions)) == len(suggestions), f"a suggestion trained twice: {sorted(suggestions)}"
    return rows
