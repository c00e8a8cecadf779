"""A search whose evaluator scores many candidates per call: no Tune trial per candidate.

With `evaluator: {kind: supernet, run: RUN_DIR}` a candidate costs one slice of a batched,
already-compiled supernet evaluation (milliseconds to a fraction of a second), while a Ray Tune
trial costs ~0.4 s of scheduling alone, so the searcher is driven here, in-process: ask the
strategy for `evaluator.batch` candidates (the ask/tell strategies of `nas.strategies` keep
them pending, so a batch holds distinct candidates; Optuna's TPE/NSGA-II through its own
ask/tell), score the batch in one call, tell every score back, repeat until `num_trials`.
The supernet's weights are loaded once for the whole search. The outputs are those of a Tune
search: trials.csv (same columns), infeasible.jsonl, winners.json with winners/NN/ holding the
winners' extracted weights, the Pareto fronts and the TensorBoard files of `nas.monitor`; the
state is saved after every batch, so `--resume` continues where a killed search stopped. Ray-free:
`nas search` calls `run_supernet_search` for such an experiment without starting Ray.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import optuna

from evaluators.variables import save_variables
from nas.config import ExperimentConfig
from nas.inherited import Scorer, SupernetScorer
from nas.monitor import LineStream, SearchMonitor
from nas.preflight import OPTUNA_ALGORITHMS, prepare
from nas.rundir import (ARCHITECTURE, METRIC, SUGGESTION, TRIAL_COLUMNS, VARIABLES, Experiment, Feasibility,
                        check_run_dir, read_infeasible, result_columns, write_results)
from nas.strategies import make_strategy
from search_spaces.errors import NasError

STATE_FILE = "batched_search.json"
ROWS_FILE = "scored.jsonl"  # one scored candidate a line (its row of trials.csv and its decisions)


# ==================================================================== askers: one batch interface for every algorithm
class StrategyAsker:
    """An ask/tell strategy of `nas.strategies`, asked for several candidates at once."""

    def __init__(self, exp: Experiment, feasible: Feasibility):
        c = exp.cfg
        self.strategy = make_strategy(c.search.algorithm, exp.space, seed=c.seed, options=dict(c.search.options),
                                      feasible=lambda a: feasible(a, proposed=True), budget=c.num_trials)

    def ask(self, n: int) -> list[dict[str, int]]:
        out = []
        for _ in range(n):
            config = self.strategy.suggest()
            if config is None:
                break
            out.append(config)
        return out

    def tell(self, config: Mapping[str, int], row: Mapping[str, Any]) -> None:
        self.strategy.observe(config, None if row["status"] != "ok" else float(row[METRIC]))

    def state(self) -> dict[str, Any]:
        return self.strategy.save()

    def restore(self, state: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
        self.strategy.restore(state)


class OptunaAsker:
    """Optuna's TPE (`tpe`) or NSGA-II (`nsga2`) through Optuna's own ask/tell; infeasible candidates
    are told as failures' worst values and asked again (as `nas.tune.searchers.ConstrainedSearcher` does)."""

    MAX_TRIES = 1000

    def __init__(self, exp: Experiment, feasible: Feasibility):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.exp, self.feasible = exp, feasible
        self.multi = OPTUNA_ALGORITHMS[exp.cfg.search.algorithm]
        self.cost = exp.objective.penalties[0].cost if exp.objective.penalties else "params"
        self.cost_col = self.cost.replace("@", "_at_")  # its column in a row
        opts = dict(exp.cfg.search.options)
        try:
            sampler = (optuna.samplers.NSGAIISampler if self.multi else optuna.samplers.TPESampler)(
                seed=exp.cfg.seed, **opts)
        except TypeError as e:
            raise NasError(f"{exp.cfg.source}: search.options: {e}") from None
        directions = ["maximize", "minimize"] if self.multi else ["maximize"]
        self.study = optuna.create_study(directions=directions, sampler=sampler)
        self.dists = {d.name: optuna.distributions.CategoricalDistribution(list(range(len(d.options))))
                      for d in exp.space.decisions()}
        self.live: dict[str, Any] = {}
        self.told: dict[str, list[float]] = {}  # key -> values told (Optuna may suggest a key again)

    def _values(self, accuracy: float, score: float, cost: float) -> list[float]:
        return [accuracy, cost] if self.multi else [score]

    def ask(self, n: int) -> list[dict[str, int]]:
        out = []
        tries = 0
        while len(out) < n:
            trial = self.study.ask(self.dists)
            config = {k: int(v) for k, v in trial.params.items()}
            arch = self.exp.space.from_choices(config)
            if arch.key in self.told or arch.key in self.live:  # a repeat: told what it got, never scored twice
                if arch.key in self.told:
                    self.study.tell(trial, self.told[arch.key])
                else:
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                tries += 1
                if tries >= self.MAX_TRIES:
                    break
                continue
            if self.feasible(arch, proposed=True):
                self.live[arch.key] = trial
                out.append(config)
                continue
            costs = self.exp.objective.costs(arch)
            self.told[arch.key] = self._values(0.0, 0.0, costs.get(self.cost, 0.0))
            self.study.tell(trial, self.told[arch.key])
            tries += 1
            if tries >= self.MAX_TRIES:
                raise NasError(f"search.algorithm {self.exp.cfg.search.algorithm}: {self.MAX_TRIES} infeasible "
                               f"suggestions in a row; loosen objective.constraints")
        return out

    def tell(self, config: Mapping[str, int], row: Mapping[str, Any]) -> None:
        trial = self.live.pop(row["key"], None)
        if trial is None:
            return
        if row["status"] != "ok":
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        self.told[row["key"]] = self._values(float(row["accuracy"]), float(row[METRIC]),
                                             float(row.get(self.cost_col, 0.0)))
        self.study.tell(trial, self.told[row["key"]])

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
        """Replay the finished candidates into a fresh study (Optuna samplers are conditioned on them)."""
        for r in rows:
            if r["status"] != "ok":
                continue
            params = {d: int(v) for d, v in r["config"].items()}
            values = self._values(float(r["accuracy"]), float(r[METRIC]), float(r.get(self.cost_col, 0.0)))
            self.told[r["key"]] = values
            self.study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dists, values=values))


def make_asker(exp: Experiment, feasible: Feasibility):
    return OptunaAsker(exp, feasible) if exp.cfg.search.algorithm in OPTUNA_ALGORITHMS else StrategyAsker(exp, feasible)


# ==================================================================== the search
def run_batched_search(cfg: ExperimentConfig, scorer_factory: Callable[[Experiment], Scorer], *,
                       resume: bool = False, force: bool = False, printer=print) -> Path:
    """Run (or resume) `cfg` with a batch scorer in-process; returns the run directory.

    Args:
        cfg: the experiment (its `evaluator.batch` candidates are scored per call).
        scorer_factory: builds the scorer once from the prepared experiment (e.g. loads the supernet).
        resume, force: as `nas search`.
    """
    exp = prepare(cfg)
    scorer = scorer_factory(exp)
    try:
        return _search(exp, scorer, resume=resume, force=force, printer=printer)
    finally:
        _close(scorer)


def _search(exp: Experiment, scorer: Scorer, *, resume: bool, force: bool, printer) -> Path:
    cfg = exp.cfg
    run_dir = check_run_dir(cfg, resume=resume, force=force)
    feasible = Feasibility(exp)
    asker = make_asker(exp, feasible)
    rows: list[dict[str, Any]] = []
    if resume:
        rows = _read_rows(run_dir)
        state_path = run_dir / STATE_FILE
        asker.restore(json.loads(state_path.read_text())["asker"] if state_path.exists() else {}, rows)
    elif (run_dir / ROWS_FILE).exists():
        (run_dir / ROWS_FILE).unlink()
    batch = cfg.evaluator.batch
    printer(f"search '{cfg.name}': space {exp.space.name} ({exp.space.size():,d} architectures), evaluator "
            f"{cfg.evaluator.kind} ({cfg.evaluator.run}{_workers(cfg)}), {cfg.num_trials} candidates in batches of "
            f"{batch}, algorithm {cfg.search.algorithm} -> {run_dir}", flush=True)
    monitor = BatchMonitor(run_dir, exp.space, cfg.num_trials, tty=False,
                           stream=None if printer is print else LineStream(printer),
                           latency_profile=(cfg.objective.profiles or ("host",))[0])
    t_start = time.perf_counter()
    try:
        while len(rows) < cfg.num_trials:
            configs = asker.ask(min(batch, cfg.num_trials - len(rows)))
            if not configs:
                break
            new = _score_batch(exp, scorer, configs, first=len(rows) + 1)
            for config, row in zip(configs, new):
                asker.tell(config, row)
            rows += new
            _append_rows(run_dir, new)
            (run_dir / STATE_FILE).write_text(json.dumps({"asker": asker.state(), "done": len(rows)}))
            _feed_monitor(monitor, new)
            monitor.batch_done()
    finally:
        monitor.close()
    wall = time.perf_counter() - t_start
    printer(f"scored {len(rows)} candidates in {wall:.1f} s ({len(rows) / max(wall, 1e-9) * 60:,.0f} per minute)",
            flush=True)
    _attach_winner_weights(exp, scorer, rows, run_dir)
    out = [{k: v for k, v in r.items() if k != "config"} for r in rows]
    for rec in read_infeasible(run_dir):
        if rec.pop("proposed", False):
            out.append({**{c: "" for c in TRIAL_COLUMNS}, **rec, "status": "infeasible", "checkpoint": ""})
    write_results(exp, out)
    return run_dir


def _workers(cfg: ExperimentConfig) -> str:
    return f", {cfg.evaluator.workers} Ray scoring workers" if cfg.evaluator.workers else ""


def _score_batch(exp: Experiment, scorer: Scorer, configs: list[dict[str, int]], first: int) -> list[dict[str, Any]]:
    """Score one batch in one call; a scorer error fails the batch's candidates, not the search."""
    archs = [exp.space.from_choices(c) for c in configs]
    t0 = time.perf_counter()
    error = ""
    try:
        acc = np.asarray(scorer.score(archs), np.float64)
    except NasError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded per candidate like a crashed trial
        acc, error = np.full(len(archs), np.nan), f"{type(e).__name__}: {e}".splitlines()[0][:300]
    per = (time.perf_counter() - t0) / max(len(archs), 1)
    rows = []
    for i, (config, arch, a) in enumerate(zip(configs, archs, acc)):
        costs = exp.objective.costs(arch)
        ok = math.isfinite(float(a))
        row = {c: "" for c in TRIAL_COLUMNS}
        row.update({SUGGESTION: first + i, "trial_id": f"c{first + i:06d}", "key": arch.key,
                    "status": "ok" if ok else "failed", **result_columns(costs),
                    "accuracy": float(a) if ok else "", METRIC: exp.objective.score(float(a), costs) if ok else "",
                    "epochs": 0, "wall_s": per, "node_id": "", "error": "" if ok else (error or "non-finite accuracy"),
                    "checkpoint": "", "config": dict(config)})
        rows.append(row)
    return rows


def _attach_winner_weights(exp: Experiment, scorer: Scorer, rows: list[dict[str, Any]], run_dir: Path) -> None:
    """Extract the top-k candidates' weights into RUN_DIR/candidates/KEY/ (what write_results copies to winners/)."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-float(r[METRIC]), r["key"]))
    seen: list[str] = []
    for r in ok:
        if r["key"] in seen:
            continue
        seen.append(r["key"])
        if len(seen) > exp.cfg.top_k:
            break
        arch = exp.space.decode(r["key"])
        variables = scorer.extract(arch)
        if variables is None:
            continue
        folder = run_dir / "candidates" / r["key"]
        folder.mkdir(parents=True, exist_ok=True)
        save_variables(folder / VARIABLES, variables)
        (folder / ARCHITECTURE).write_text(arch.to_json(indent=2))
        for same in rows:
            if same["key"] == r["key"]:
                same["checkpoint"] = str(folder)


def _append_rows(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    with (run_dir / ROWS_FILE).open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / ROWS_FILE
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def _feed_monitor(monitor: SearchMonitor, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        monitor.trial_started(r["trial_id"])
        if r["status"] == "ok":
            monitor.trial_completed(r["trial_id"], {k: v for k, v in r.items() if k != "config"})
        else:
            monitor.trial_failed(r["trial_id"], r["error"])


class BatchMonitor(SearchMonitor):
    """`SearchMonitor` drawing its Pareto-front image once per scored batch instead of once per
    candidate (a matplotlib render per candidate would cost more than scoring it)."""

    _stale = False

    def _pareto_image(self) -> None:
        self._stale = True

    def batch_done(self) -> None:
        if self._stale:
            self._stale = False
            super()._pareto_image()


def run_supernet_search(cfg: ExperimentConfig, *, resume: bool = False, force: bool = False, printer=print,
                        open_scorer: Callable[[Path], Scorer] | None = None) -> Path:
    """`evaluator: {kind: supernet, run: RUN_DIR}`: the search scores inherited accuracy on that supernet.

    `open_scorer(RUN_DIR)` builds the scorer once (None: in this process; `nas.tune.scoring.open_scorer`
    fans the scoring out over `evaluator.workers` Ray actors); a scorer with `close()` is closed at the end.
    """
    if cfg.evaluator.workers and open_scorer is None:
        raise NasError(f"{cfg.source}: evaluator.workers: {cfg.evaluator.workers} Ray scoring workers need the Ray "
                       f"driver (nas.tune.run_search, as `nas search` runs it); this in-process search allows 0")

    def load(exp: Experiment) -> Scorer:
        scorer = (open_scorer or SupernetScorer.from_run)(Path(cfg.evaluator.run))
        if scorer.space.name != exp.space.name or scorer.space.decisions() != exp.space.decisions() \
                or scorer.space.resolutions != exp.space.resolutions:
            _close(scorer)
            raise NasError(f"{cfg.source}: evaluator.run: the supernet of {scorer.run_dir} is of space "
                           f"'{scorer.space.name}' at {list(scorer.space.resolutions)} px, the experiment searches "
                           f"'{exp.space.name}' at {list(exp.space.resolutions)} px; allowed: the same space and input")
        return scorer

    return run_batched_search(cfg, load, resume=resume, force=force, printer=printer)


def _close(scorer: Scorer) -> None:
    """End what a scorer holds beyond this process (e.g. Ray actors); in-process scorers have nothing."""
    close = getattr(scorer, "close", None)
    if close is not None:
        close()
