"""Search throughput on a real Ray cluster: 1 CPU vs 2, and Ray's per-trial overhead.

The same fixed-size training search (experiments/quickstart.yaml's space and data, seed 0, random
search, so the same architectures in the same order) runs twice through `nas search --address`:

  * 1 CPU:  a head node alone (`ray start --num-cpus 1`), pinned to core 0;
  * 2 CPUs: the head (core 0) and a worker node (core 1), 1 CPU each (tests/ray_cluster.py).

Each node's processes are pinned to their core, so a trial gets one core in both runs (XLA would
otherwise spread one trial over both cores and hide the scaling). Each run gets a fresh JAX
compilation cache, so the second run does not compile less. Reported per run: the makespan (from
Tune's experiment start to the last trial's result), trials per minute, and the speed-up.

Ray's per-trial overhead is everything a trial slot spends outside the trial function:
  * per trial, training search: (makespan x CPUs - sum of in-trial wall times) / trials
    (placement, actor start and its imports, dispatch, result reporting, idle gaps);
  * with table trials (a look-up, tens of ms of work), max_concurrent 1, reused actor: the median
    gap from one trial's end to the next one's start (reporting + scheduling), from each trial's
    own float start time (`started_at`) and wall time;
  * the first trial's actor start: experiment start -> the first trial function call.

    python benchmarks/cluster.py --trials 6 --epochs 2 --json runs/bench_cluster.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import LocalCluster  # noqa: E402

QUICKSTART = REPO / "experiments" / "quickstart.yaml"
MACRO = REPO / "experiments" / "macro_bench.yaml"


def _search(cluster: LocalCluster, cfg: Path, sets: list[str]) -> None:
    args = [sys.executable, "-m", "nas.cli", "search", str(cfg), "--address", cluster.address, "--force"]
    for s in sets:
        args += ["--set", s]
    p = subprocess.run(args, cwd=REPO, env=cluster.env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"search failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def _tune_results(tune_dir: Path) -> tuple[float, list[dict]]:
    """Tune's experiment start time and the last result of every trial (from its result.json)."""
    state = max(tune_dir.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    start = json.loads(state.read_text())["stats"]["start_time"]
    results = []
    for f in tune_dir.glob("*/result.json"):
        lines = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        if lines:
            results.append(lines[-1])
    return start, results


def training_run(cpus: int, trials: int, epochs: int, out: Path) -> dict:
    cores = {"head": {0}, "worker": {1 % os.cpu_count()}}
    env = {"NAS_JAX_CACHE": str(out / f"jax-cache-{cpus}")}  # a fresh one per run: no compile reuse across runs
    with LocalCluster(with_worker=cpus == 2, cores=cores, env=env, log_dir=out / f"logs-{cpus}") as cluster:
        _search(cluster, QUICKSTART, [f"output_dir={out}", f"name=bench{cpus}", f"num_trials={trials}",
                                      f"train.epochs={epochs}", "max_concurrent=2", "resources.cpu=1", "top_k=1"])
    cluster.remove()
    start, results = _tune_results(out / f"bench{cpus}" / "tune")
    rows = list(csv.DictReader((out / f"bench{cpus}" / "trials.csv").open()))
    assert len(results) == trials and all(r["status"] == "ok" for r in rows), rows
    makespan = max(r["timestamp"] for r in results) - start
    in_trial = sum(float(r["wall_s"]) for r in rows)
    return {"cpus": cpus, "trials": trials, "epochs": epochs, "makespan_s": makespan,
            "trials_per_min": trials / makespan * 60, "in_trial_s": in_trial,
            "overhead_per_trial_s": (makespan * cpus - in_trial) / trials,
            "first_trial_start_s": min(r["started_at"] for r in results) - start,
            "nodes": len({r["node_id"] for r in rows}), "keys": [r["key"] for r in rows]}


def table_run(trials: int, out: Path) -> dict:
    with LocalCluster(with_worker=False, log_dir=out / "logs-table") as cluster:
        _search(cluster, MACRO, [f"output_dir={out}", "name=benchtable", f"num_trials={trials}",
                                 "search.algorithm=random", "max_concurrent=1",
                                 "resources.cpu=1", "top_k=1"])
    cluster.remove()
    start, results = _tune_results(out / "benchtable" / "tune")
    results.sort(key=lambda r: r["started_at"])  # Tune's own "timestamp" is in whole seconds
    gaps = [b["started_at"] - (a["started_at"] + a["wall_s"]) for a, b in zip(results, results[1:])]
    return {"trials": trials, "per_trial_overhead_s": statistics.median(gaps),
            "per_trial_overhead_p90_s": statistics.quantiles(gaps, n=10)[-1],
            "first_trial_start_s": results[0]["started_at"] - start,
            "trial_work_s": statistics.median(r["wall_s"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6, help="trials of the training search")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    ap.add_argument("--table-trials", type=int, default=40, help="trials of the overhead (table) search")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    load = os.getloadavg()
    t = time.time()
    with tempfile.TemporaryDirectory(prefix="nas-bench-cluster-") as tmp:
        out = Path(tmp)
        one = training_run(1, args.trials, args.epochs, out)
        two = training_run(2, args.trials, args.epochs, out)
        table = table_run(args.table_trials, out)
    assert one["keys"] == two["keys"], "the two runs trained different architectures"
    speedup = two["trials_per_min"] / one["trials_per_min"]
    print(f"fixed-size training search: {args.trials} trials x {args.epochs} epochs (quickstart space, digits), "
          f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"  {'CPUs':>4} {'nodes':>5} {'makespan s':>10} {'trials/min':>10} {'in-trial s':>10} "
          f"{'overhead/trial s':>16} {'first trial starts s':>20}")
    for r in (one, two):
        print(f"  {r['cpus']:>4} {r['nodes']:>5} {r['makespan_s']:>10.1f} {r['trials_per_min']:>10.2f} "
              f"{r['in_trial_s']:>10.1f} {r['overhead_per_trial_s']:>16.2f} {r['first_trial_start_s']:>20.1f}")
    print(f"  speed-up 2 CPUs vs 1: {speedup:.2f}x (target >= 1.7x)")
    print(f"Ray per-trial overhead, table trials ({args.table_trials}, ~{table['trial_work_s'] * 1e3:.1f} ms of "
          f"work each, reused actor): median {table['per_trial_overhead_s'] * 1e3:.0f} ms, p90 "
          f"{table['per_trial_overhead_p90_s'] * 1e3:.0f} ms; first trial starts "
          f"{table['first_trial_start_s']:.1f} s after the experiment (placement + actor start + imports)")
    print(f"total {time.time() - t:.0f} s")
    if args.json:
        for r in (one, two):
            r.pop("keys")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"load_average": load, "training": [one, two], "speedup": speedup,
                                               "table": table}, indent=2))


if __name__ == "__main__":
    main()
