"""A finished Tune experiment -> the rows of trials.csv (written with pareto.json and winners.json by
`nas.rundir.write_results`, which the batched search shares)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.messages import last_line
from nas.rundir import SUGGESTION, TRIAL_COLUMNS, Experiment, read_infeasible, result_columns
from search_spaces.errors import NasError


def collect_trials(grid, exp: Experiment) -> list[dict[str, Any]]:
    """One row per trial (Tune's results) plus one per infeasible candidate."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or Path(r.path).name
        key = m.get("key") or _key_from_config(exp, r.config)
        status = "failed" if r.error else m.get("status", "failed")
        if status == "running":
            status = "stopped"  # ended early by the scheduler
        row = {c: m.get(c, "") for c in TRIAL_COLUMNS}
        row.update({"trial_id": trial_id, "key": key, "status": status,
                    SUGGESTION: m.get(SUGGESTION) or (r.config or {}).get(SUGGESTION, ""),
                    "error": last_line(str(r.error)) if r.error else m.get("error", ""),
                    "checkpoint": r.checkpoint.path if r.checkpoint else ""})
        row.update({k: v for k, v in m.items() if k.startswith("latency_ms")})
        if not row["params"] and key:
            row.update(result_columns(exp.objective.costs(exp.space.decode(key))))
        rows.append(row)
    rows.sort(key=lambda r: (r[SUGGESTION] == "", r[SUGGESTION] if r[SUGGESTION] != "" else 0))
    for rec in read_infeasible(exp.run_dir):
        if rec.pop("proposed", False):
            rows.append({**{c: "" for c in TRIAL_COLUMNS}, **rec, "status": "infeasible", "checkpoint": ""})
    return rows


def _key_from_config(exp: Experiment, config: dict | None) -> str:
    try:
        return exp.space.from_choices(config or {}).key
    except NasError:
        return ""
