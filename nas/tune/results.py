"""A finished Tune experiment -> trials.csv, pareto.json and winners.json (with copied checkpoints)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nas.messages import last_line
from nas.pareto import write_pareto
from nas.rundir import (SUGGESTION, TRIAL_COLUMNS, WINNERS_DIR, Experiment, Winner, read_infeasible, result_columns,
                        write_trials, write_winners)
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


def write_results(exp: Experiment, rows: list[dict[str, Any]]) -> None:
    """trials.csv (every trial), winners.json (top-k by score, with what is needed to rebuild them)."""
    run_dir = exp.run_dir
    write_trials(run_dir, rows)
    done = [r for r in rows if r["status"] == "ok"]
    write_pareto([{k: _float(v) for k, v in r.items() if k in ("accuracy", "params", "macs") or k.startswith("latency")}
                  | {"key": r["key"]} for r in done], run_dir)
    table_mode = exp.cfg.evaluator.kind == "table"
    ok = [r for r in rows if r["status"] == "ok" and (r["checkpoint"] or table_mode)]
    ok.sort(key=lambda r: (-float(r["score"]), r["key"]))
    winners, seen = [], set()
    for r in ok:
        if r["key"] in seen:
            continue
        seen.add(r["key"])
        rank = len(winners) + 1
        dest = run_dir / WINNERS_DIR / f"{rank:02d}"
        if dest.exists():
            shutil.rmtree(dest)
        if r["checkpoint"]:
            shutil.copytree(r["checkpoint"], dest)
        winners.append(Winner(
            rank=rank, key=r["key"], space=exp.space.name, trial_id=r["trial_id"], score=float(r["score"]),
            val_accuracy=float(r["accuracy"]), params=int(float(r["params"])), macs=int(float(r["macs"])),
            architecture=exp.space.decode(r["key"]),
            checkpoint=str(dest.relative_to(run_dir)) if r["checkpoint"] else None))
        if len(winners) == exp.cfg.top_k:
            break
    write_winners(run_dir, winners)


def _float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
