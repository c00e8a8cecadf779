"""Search algorithms through a real Ray Tune Tuner, on NAS-Bench-Macro via the table evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trials import trained_rows, trial_rows

from evaluators.cost import analytic_cost
from evaluators.table import TableEvaluator
from nas.config import load_config
from nas.tune import run_search
from nas.strategies import make_strategy
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "macro_bench.yaml"


def _quiet(*a, **k):
    pass


def _cfg(tmp_path, macro_table_path, *extra):
    return load_config(CONFIG, [f"output_dir={tmp_path}", f"evaluator.table={macro_table_path}", *extra])


def _trials(run_dir):
    return trained_rows(run_dir), trial_rows(run_dir, "infeasible")


def _direct_trajectory(name, n, seed, table_path, cap):
    """The same strategy driven directly (what benchmarks/search_macro.py does)."""
    space = SPACES.get("macro_cifar")
    table = TableEvaluator(table_path)
    feasible = lambda a: analytic_cost(a).macs <= cap
    strategy = make_strategy(name, space, seed=seed, feasible=feasible, budget=n)
    keys = []
    for _ in range(n):
        cfg = strategy.suggest()
        key = space.from_choices(cfg).key
        keys.append(key)
        strategy.observe(cfg, table.evaluate(key)["accuracy"] / 100)
    return keys


@pytest.mark.parametrize("algorithm", ["default", "evolution"])
def test_tuner_run_follows_the_direct_trajectory_and_respects_the_cap(tmp_path, macro_table_path, algorithm):
    cfg = _cfg(tmp_path, macro_table_path, "num_trials=14", f"search.algorithm={algorithm}",
               f"name=traj_{algorithm}", "search.options={population: 6, sample: 3}" if algorithm == "evolution" else "seed=0")
    run_dir = run_search(cfg, printer=_quiet)
    trained, _ = _trials(run_dir)
    assert len(trained) == 14 and all(r["status"] == "ok" for r in trained)
    assert all(float(r["macs"]) <= 45_500_000 for r in trained)
    if algorithm == "evolution":
        direct = _direct_trajectory_with(cfg, macro_table_path)
    else:
        direct = _direct_trajectory(algorithm, 14, 0, macro_table_path, 45_500_000)
    assert [r["key"] for r in trained] == direct
    winners = json.loads((run_dir / "winners.json").read_text())
    assert winners[0]["val_accuracy"] == max(float(r["accuracy"]) for r in trained)
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert {"params", "macs"} <= set(pareto["fronts"]) and pareto["fronts"]["macs"]["hypervolume"] > 0


def _direct_trajectory_with(cfg, table_path):
    space = SPACES.get("macro_cifar")
    table = TableEvaluator(table_path)
    strategy = make_strategy("evolution", space, seed=cfg.seed, options=dict(cfg.search.options),
                             feasible=lambda a: analytic_cost(a).macs <= 45_500_000, budget=cfg.num_trials)
    keys = []
    for _ in range(cfg.num_trials):
        c = strategy.suggest()
        keys.append(space.from_choices(c).key)
        strategy.observe(c, table.evaluate(keys[-1])["accuracy"] / 100)
    return keys


@pytest.mark.parametrize("algorithm", ["tpe", "nsga2"])
def test_optuna_searchers_never_train_infeasible_candidates(tmp_path, macro_table_path, algorithm):
    cfg = _cfg(tmp_path, macro_table_path, "num_trials=10", f"search.algorithm={algorithm}", f"name=opt_{algorithm}",
               "objective.constraints.macs=40000000")
    run_dir = run_search(cfg, printer=_quiet)
    trained, infeasible = _trials(run_dir)
    assert len(trained) == 10 and all(float(r["macs"]) <= 40_000_000 for r in trained)
    assert all(float(r["macs"]) > 40_000_000 for r in infeasible)


def test_unknown_algorithm_or_option_fails_before_any_trial(tmp_path, macro_table_path):
    with pytest.raises(NasError, match="unknown algorithm 'anneal'; allowed: .*evolution.*nsga2.*tpe"):
        run_search(_cfg(tmp_path, macro_table_path, "search.algorithm=anneal"), printer=_quiet)
    with pytest.raises(NasError, match="population"):
        run_search(_cfg(tmp_path, macro_table_path, "search.algorithm=evolution", "num_trials=5",
                        "search.options={population: 50}"), printer=_quiet)
    assert not (tmp_path / "macro_bench").exists()


def test_winners_of_a_table_run_cannot_be_distilled(tmp_path, macro_table_path):
    from nas.distill import run_distill

    run_dir = run_search(_cfg(tmp_path, macro_table_path, "num_trials=3", "top_k=2", "search.algorithm=random",
                                 "name=nodistill"), printer=_quiet)
    with pytest.raises(NasError, match="no trained weights"):
        run_distill(run_dir, printer=_quiet)
