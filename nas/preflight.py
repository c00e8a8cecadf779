"""Everything a search needs, checked before Ray starts and before anything is written (Ray-free).

`prepare(cfg)` resolves the space, objective and training config, checks the search algorithm
and its options, the dataset or benchmark table against the space, and that some architecture
satisfies the hard constraints; every failure is a one-line `NasError` naming the file and key.
"""

from __future__ import annotations

import numpy as np

from evaluators.datasets import load_dataset
from evaluators.table import TableEvaluator
from nas.config import ExperimentConfig
from nas.objective import Objective
from nas.rundir import Experiment, resolve_space
from nas.strategies import STRATEGIES, make_strategy
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

FEASIBILITY_PROBES = 2000
OPTUNA_ALGORITHMS = {"tpe": False, "nsga2": True}  # search.algorithm -> multi-objective (Optuna via Tune)


def check_algorithm(cfg: ExperimentConfig, space: SearchSpace) -> None:
    """`search.algorithm` names a strategy (whose options and budget are checked) or an Optuna sampler."""
    name = cfg.search.algorithm
    if name not in STRATEGIES and name not in OPTUNA_ALGORITHMS:
        allowed = ", ".join(sorted([*STRATEGIES.names(), *OPTUNA_ALGORITHMS]))
        raise NasError(f"{cfg.source}: search.algorithm: unknown algorithm '{name}'; allowed: {allowed}")
    if name in STRATEGIES:
        make_strategy(name, space, seed=cfg.seed, options=dict(cfg.search.options), budget=cfg.num_trials)


def prepare(cfg: ExperimentConfig) -> Experiment:
    """Validate everything a search needs before any trial runs (one-line errors)."""

    space = resolve_space(cfg)
    objective = Objective.from_config(cfg.objective, where=f"{cfg.source}: objective")
    train = cfg.train
    check_algorithm(cfg, space)
    if cfg.evaluator.kind == "table":
        TableEvaluator(cfg.evaluator.table, cfg.evaluator.metric, cfg.evaluator.sample_repeat).check_space(space)
        exp = Experiment(cfg, space, objective, train)
        _check_some_feasible(exp)
        return exp
    data = load_dataset(cfg.dataset.name, seed=cfg.seed, path=cfg.dataset.path,
                        val_fraction=cfg.dataset.val_fraction, test_fraction=cfg.dataset.test_fraction)
    if (data.resolution, data.channels, data.num_classes) != (space.resolutions[0], space.in_channels, space.num_classes) \
            or len(space.resolutions) > 1:
        raise NasError(
            f"{cfg.source}: dataset '{cfg.dataset.name}' gives {data.resolution}x{data.resolution}x{data.channels} images "
            f"with {data.num_classes} classes but space '{space.name}' expects "
            f"{list(space.resolutions)}x{space.in_channels} with {space.num_classes} classes; "
            f"set space_input: {{resolution: {data.resolution}, in_channels: {data.channels}, num_classes: {data.num_classes}}}"
        )
    exp = Experiment(cfg, space, objective, train)
    _check_some_feasible(exp)
    return exp


def _check_some_feasible(exp: Experiment) -> None:
    if not exp.objective.constraints:
        return

    rng = np.random.default_rng(exp.cfg.seed)
    for _ in range(FEASIBILITY_PROBES):
        if exp.objective.feasible(exp.space.sample(rng)):
            return
    raise NasError(
        f"{exp.cfg.source}: objective.constraints: none of {FEASIBILITY_PROBES} random architectures of "
        f"'{exp.space.name}' satisfies them; loosen the constraints"
    )
