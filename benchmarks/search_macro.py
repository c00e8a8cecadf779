"""Benchmark the search strategies on NAS-Bench-Macro (CIFAR-10) through the table evaluator.

For every algorithm, seed and setting (no constraint; FLOPs <= cap), the strategy is driven
directly (ask/tell, no Ray) for `--queries` queries; a query is one table look-up of a new
suggestion (a repeated key counts as a query too). Printed per algorithm: the median best
accuracy after 50/100/200/300 queries, the median number of queries to reach the setting's
best and to come within 0.1 of it (with how many seeds got there), and the queries spent on
infeasible candidates. The reference rows "optuna-tpe (direct)" and "optuna-gp (direct)" run
Optuna's TPESampler / GPSampler (a GP with a Hamming-distance kernel on categoricals; needs
torch, the `bench` extra) with one categorical per layer (and a `Trial.set_constraint` FLOPs
excess under the cap).

Runs of our strategies stop as soon as they have found the setting's best: nothing reported
can change after that (they never propose an infeasible candidate); TPE always runs in full;
the GP sampler (~0.1-1 s a query) stops at the setting's best too, so its infeasible count is a
lower bound.

    python benchmarks/search_macro.py --seeds 20 --queries 300 --json runs/bench_macro.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # small matrices: threads only contend

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluators.cost import analytic_cost  # noqa: E402
from evaluators.table import TableEvaluator, resolve_table  # noqa: E402
from nas.strategies import make_strategy  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402
from search_spaces.errors import NasError  # noqa: E402
from search_spaces.space import SearchSpace  # noqa: E402

DEFAULT_TABLE = "nas-bench-macro"  # the packaged table (evaluators/tables/)
OPTUNA = {"optuna-tpe": "TPESampler", "optuna-gp": "GPSampler"}
ALGORITHMS = ("random", "evolution", "default", "optuna-tpe", "optuna-gp")
CHECKPOINTS = (50, 100, 200, 300)
NEAR = 0.1
TOL = 1e-6


def run_strategy(name: str, space: SearchSpace, table: TableEvaluator, seed: int, queries: int,
                 cap: float | None, target: float, options: dict | None = None) -> dict:
    """Drive one strategy; returns the per-query accuracies (None = infeasible) and counts."""
    feasible = None if cap is None else (lambda arch: analytic_cost(arch).macs <= cap)
    strategy = make_strategy(name, space, seed=seed, options=options or {}, feasible=feasible, budget=queries)
    accs: list[float | None] = []
    infeasible = 0
    for _ in range(queries):
        cfg = strategy.suggest()
        if cfg is None:
            break
        res = table.evaluate(space.from_choices(cfg))
        ok = cap is None or res["flops"] <= cap
        infeasible += not ok
        accs.append(res["accuracy"] if ok else None)
        strategy.observe(cfg, res["accuracy"], feasible=ok)
        if ok and res["accuracy"] >= target - TOL:
            break
    return {"accs": accs, "infeasible": infeasible, "spent": len(accs)}


def run_optuna(algo: str, space: SearchSpace, table: TableEvaluator, seed: int, queries: int, cap: float | None,
               target: float) -> dict:
    """An Optuna sampler (`OPTUNA[algo]`) used directly: one categorical per decision."""
    import warnings

    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = getattr(optuna.samplers, OPTUNA[algo])(seed=seed)
    stop_at_target = algo == "optuna-gp"
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dists = {d.name: CategoricalDistribution(list(range(len(d.options)))) for d in space.decisions()}
    accs: list[float | None] = []
    infeasible = 0
    for _ in range(queries):
        trial = study.ask(dists)
        res = table.evaluate(space.from_choices(trial.params))
        ok = cap is None or res["flops"] <= cap
        infeasible += not ok
        accs.append(res["accuracy"] if ok else None)
        if cap is not None:
            trial.set_constraint("excess_flops", float(res["flops"] - cap))  # > 0: infeasible
        study.tell(trial, res["accuracy"])
        if stop_at_target and ok and res["accuracy"] >= target - TOL:
            break
    return {"accs": accs, "infeasible": infeasible, "spent": len(accs)}


def first_reaching(accs: list[float | None], level: float) -> int | None:
    for i, a in enumerate(accs):
        if a is not None and a >= level - TOL:
            return i + 1
    return None


def summarise(runs: list[dict], queries: int, target: float) -> dict:
    """Medians over seeds; runs that stopped at the target keep their best for later checkpoints."""
    best_at = {}
    for c in CHECKPOINTS:
        if c <= queries:
            vals = [max((a for a in r["accs"][:c] if a is not None), default=float("nan")) for r in runs]
            best_at[c] = float(np.nanmedian(vals))
    out = {"best_at": best_at, "infeasible_median": float(np.median([r["infeasible"] for r in runs])),
           "infeasible_total": int(sum(r["infeasible"] for r in runs)), "seeds": len(runs)}
    for label, level in (("best", target), ("near", target - NEAR)):
        hits = [first_reaching(r["accs"], level) for r in runs]
        qs = [h if h is not None else np.inf for h in hits]
        out[f"{label}_median"] = float(np.median(qs))
        out[f"{label}_reached"] = int(sum(h is not None for h in hits))
    return out


def _fmt(x: float) -> str:
    return "inf" if x == np.inf else (f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}")


def print_table(title: str, rows: dict[str, dict], queries: int, target: float, show_infeasible: bool) -> None:
    cps = [c for c in CHECKPOINTS if c <= queries]
    print(f"\n## {title} (target {target:.3f}; median over seeds)")
    head = ["algorithm"] + [f"best@{c}" for c in cps] + ["q. to best (reached)", f"q. to within {NEAR} (reached)"]
    if show_infeasible:
        head.append("infeasible q. (median / total)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, s in rows.items():
        cells = [name] + [f"{s['best_at'][c]:.3f}" for c in cps]
        for label in ("best", "near"):
            med = s[f"{label}_median"]
            cells.append(f"{'>' + str(queries) if med == np.inf else _fmt(med)} ({s[f'{label}_reached']}/{s['seeds']})")
        if show_infeasible:
            cells.append(f"{_fmt(s['infeasible_median'])} / {s['infeasible_total']}")
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (split a run)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"comma-separated; strategy names, 'optuna-tpe' or 'optuna-gp' (default: {','.join(ALGORITHMS)})")
    p.add_argument("--cap", type=float, default=45.5e6, help="FLOPs (MACs) cap of the constrained setting")
    p.add_argument("--settings", default="unconstrained,capped")
    p.add_argument("--table", default=DEFAULT_TABLE, help="a packaged table name or a JSON path")
    p.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    args = p.parse_args(argv)
    try:
        table = TableEvaluator(resolve_table(args.table))
        space = SPACES.get("macro_cifar")
        table.check_space(space)
        algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        for a in algos:
            if a not in OPTUNA:
                make_strategy(a, space, seed=0, options={}, budget=args.queries)
    except NasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report: dict = {"table": str(args.table), "seeds": args.seeds, "queries": args.queries, "cap": args.cap, "settings": {}}
    for setting in [s.strip() for s in args.settings.split(",")]:
        cap = args.cap if setting == "capped" else None
        _, target = table.best(None if cap is None else (lambda k, e: e["flops"] <= cap))
        rows, raw = {}, {}
        for algo in algos:
            t0 = time.time()
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                if algo in OPTUNA:
                    runs.append(run_optuna(algo, space, table, seed, args.queries, cap, target))
                else:
                    runs.append(run_strategy(algo, space, table, seed, args.queries, cap, target))
            label = f"{algo} (direct)" if algo in OPTUNA else algo
            rows[label] = summarise(runs, args.queries, target)
            rows[label]["seconds"] = round(time.time() - t0, 1)
            raw[label] = runs
            print(f"[{setting}] {label}: {rows[label]['seconds']} s", file=sys.stderr, flush=True)
        title = "No constraint" if cap is None else f"FLOPs <= {args.cap / 1e6:g}M"
        print_table(title, rows, args.queries, target, show_infeasible=cap is not None)
        report["settings"][setting] = {"target": target, "summary": rows, "runs": raw}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
