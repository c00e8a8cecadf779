"""Tune searchers: Ray-free ask/tell strategies behind `StrategySearcher`, Optuna's samplers behind
`ConstrainedSearcher`; both keep infeasible candidates (hard constraints, checked with the cost
model) away from Tune and record them in infeasible.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from nas.preflight import OPTUNA_ALGORITHMS
from nas.rundir import SUGGESTION, Experiment, append_infeasible, read_infeasible, result_columns
from nas.strategies import make_strategy
from nas.tune.trial import METRIC, MODE
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError


class Feasibility:
    """A picklable feasibility check that logs every candidate the cost model rejects (once) to
    infeasible.jsonl, marking whether a searcher proposed it (`proposed`) or a strategy only
    screened it while choosing (e.g. the GP scoring every key of a small space)."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.seen = {(r["key"], r.get("proposed", False)) for r in read_infeasible(exp.run_dir)}

    def __call__(self, arch: Architecture, proposed: bool = False) -> bool:
        if not self.exp.objective.constraints:
            return True
        costs = self.exp.objective.costs(arch)
        violations = self.exp.objective.violations(costs)
        if violations and (arch.key, proposed) not in self.seen:
            self.seen.add((arch.key, proposed))
            append_infeasible(self.exp.run_dir, {"key": arch.key, **result_columns(costs),
                                                 "error": "; ".join(violations), "proposed": proposed})
        return not violations

class StrategySearcher(Searcher):
    """Adapts a Ray-free ask/tell strategy (nas.strategies) to Tune's `Searcher` interface."""

    def __init__(self, exp: Experiment):
        super().__init__(metric=METRIC, mode=MODE)

        self.exp = exp
        self.feasible = Feasibility(exp)
        self.strategy = make_strategy(exp.cfg.search.algorithm, exp.space, seed=exp.cfg.seed,
                                      options=dict(exp.cfg.search.options), feasible=self.feasible,
                                      budget=exp.cfg.num_trials)
        self.live: dict[str, dict[str, int]] = {}
        self.count = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        config = self.strategy.suggest()
        if config is None:  # nothing unseen left, unless pending trials are still to report
            return None if self.live else Searcher.FINISHED
        self.live[trial_id] = config
        self.count += 1
        return {**config, SUGGESTION: self.count}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        config = self.live.pop(trial_id, None)
        if config is None:
            return
        score = None if error or not result or result.get(METRIC) is None else float(result[METRIC])
        self.strategy.observe(config, score)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"strategy": self.strategy.save(), "live": self.live,
                                                     "count": self.count}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.strategy.restore(state["strategy"])
        self.live, self.count = state["live"], state["count"]


class ConstrainedSearcher(Searcher):
    """Wraps a Tune searcher (Optuna's) so infeasible candidates never reach Tune: each one is
    recorded, told back to the inner searcher as a worst-case result, and replaced."""

    MAX_TRIES = 1000

    def __init__(self, inner: Searcher, exp: Experiment, infeasible_result):
        super().__init__(metric=METRIC, mode=MODE)
        self.inner, self.exp = inner, exp
        self.feasible = Feasibility(exp)
        self.infeasible_result = infeasible_result
        self.alias: dict[str, str] = {}
        self.count = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        for attempt in range(self.MAX_TRIES):
            tid = trial_id if attempt == 0 else f"{trial_id}-infeasible{attempt}"
            config = self.inner.suggest(tid)
            if config is None or config == Searcher.FINISHED:
                return config
            arch = self.exp.space.from_choices(config)
            if self.feasible(arch, proposed=True):
                self.alias[trial_id] = tid
                self.count += 1
                return {**config, SUGGESTION: self.count}
            self.inner.on_trial_complete(tid, result=self.infeasible_result(arch))
        raise NasError(f"search.algorithm {self.exp.cfg.search.algorithm}: {self.MAX_TRIES} infeasible "
                       f"suggestions in a row; loosen objective.constraints")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(self.alias.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.inner.on_trial_complete(self.alias.pop(trial_id, trial_id), result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)
        Path(checkpoint_path + ".alias.json").write_text(json.dumps({"alias": self.alias, "count": self.count}))

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)
        alias = Path(checkpoint_path + ".alias.json")
        state = json.loads(alias.read_text()) if alias.exists() else {"alias": {}, "count": 0}
        self.alias, self.count = state["alias"], state["count"]


def _optuna(exp: Experiment, multi_objective: bool) -> Searcher:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opts = dict(exp.cfg.search.options)
    space = exp.space.to_param_space(tune.choice)
    cost = exp.objective.penalties[0].cost if exp.objective.penalties else "params"
    cost_metric = next(iter(result_columns({cost: 0.0})))
    try:
        if multi_objective:
            sampler = optuna.samplers.NSGAIISampler(seed=exp.cfg.seed, **opts)
            inner = OptunaSearch(space, metric=["accuracy", cost_metric], mode=["max", "min"], sampler=sampler)
        else:
            sampler = optuna.samplers.TPESampler(seed=exp.cfg.seed, **opts)
            inner = OptunaSearch(space, metric=METRIC, mode=MODE, sampler=sampler)
    except TypeError as e:
        raise NasError(f"{exp.cfg.source}: search.options: {e}") from None

    def worst(arch: Architecture) -> dict[str, float]:
        costs = result_columns(exp.objective.costs(arch))
        return {METRIC: 0.0, "accuracy": 0.0, cost_metric: costs.get(cost_metric, 0.0)}

    return ConstrainedSearcher(inner, exp, worst)


def make_searcher(exp: Experiment) -> Searcher:
    """The Tune searcher of `exp.cfg.search.algorithm` (checked by `nas.preflight.check_algorithm`): an
    ask/tell strategy (nas.strategies) behind StrategySearcher, or Optuna's TPE / NSGA-II behind
    ConstrainedSearcher."""
    name = exp.cfg.search.algorithm
    if name in OPTUNA_ALGORITHMS:
        return _optuna(exp, OPTUNA_ALGORITHMS[name])
    return StrategySearcher(exp)
