"""Everything a run needs, checked before Ray starts and before anything is written (Ray-free).

`preflight(cfg, stages)` checks what the config names on the disk: the dataset file, a teacher
checkpoint (when distillation runs), the output and storage folders (writable, probed without
leaving anything behind) and the latency tables the objective will read. `prepare(cfg)` runs it,
then resolves the space, objective and training config, checks the search algorithm and its
options, the dataset or benchmark table against the space, and that some architecture satisfies
the hard constraints. Every failure is a one-line `NasError` naming the file, the key and the
problem; the CLI turns it into exit code 2 within seconds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Collection

import numpy as np

from evaluators.datasets import DatasetInfo, check_dataset
from evaluators.hardware import PROFILES
from evaluators.lut import CACHE_ENV
from evaluators.table import TableEvaluator
from nas.config import ExperimentConfig
from nas.objective import Objective
from nas.rundir import ARCHITECTURE, VARIABLES, Experiment, read_architecture, resolve_space
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


STAGES = ("search", "distill", "export")
CACHE_ENVS = (CACHE_ENV, "NAS_JAX_CACHE")  # latency look-up tables, compiled XLA programs


def preflight(cfg: ExperimentConfig, stages: Collection[str] = ("search",)) -> None:
    """Check every file and folder `cfg` names for `stages` (any of search, distill, export)."""
    src = cfg.source
    if cfg.dataset.path is not None:
        _check_file(Path(cfg.dataset.path), src, "dataset.path", "a dataset file")
    if "search" in stages:
        _check_writable(Path(cfg.output_dir), src, "output_dir")
        if cfg.storage_path and "://" not in cfg.storage_path:
            _check_writable(Path(cfg.storage_path), src, "storage_path")
    if "distill" in stages and cfg.distill.enabled and cfg.distill.teacher.checkpoint is not None:
        folder = Path(cfg.distill.teacher.checkpoint)
        key = "distill.teacher.checkpoint"
        if not folder.is_dir():
            raise NasError(f"{src}: {key}: {folder}: no such folder (a folder with {ARCHITECTURE} and {VARIABLES})")
        for name in (ARCHITECTURE, VARIABLES):
            _check_file(folder / name, src, key, "part of a model checkpoint")
        try:
            read_architecture(folder / ARCHITECTURE)
        except NasError as e:
            raise NasError(f"{src}: {key}: {e}") from None
    for p in cfg.objective.profiles:
        if p not in PROFILES:
            raise NasError(f"{src}: objective.profiles: unknown profile '{p}'; allowed: {', '.join(PROFILES.names())}")
    for env in CACHE_ENVS:  # trials run in their own working directory: a relative cache path must not move
        if os.environ.get(env) and not Path(os.environ[env]).is_absolute():
            os.environ[env] = str(Path(os.environ[env]).absolute())


def _check_file(path: Path, src: str, key: str, what: str) -> None:
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "no such file"
        raise NasError(f"{src}: {key}: {path}: {problem} ({what})")
    if not os.access(path, os.R_OK):
        raise NasError(f"{src}: {key}: {path}: not readable ({what})")


def _check_writable(path: Path, src: str, key: str) -> None:
    """`path` exists as a writable folder or can be created: probed by creating and removing a
    temporary folder in its nearest existing ancestor, so nothing is left behind."""
    probe_in = path
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise NasError(f"{src}: {key}: {path}: not writable (cannot be created: {probe_in} is a file)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".nas-write-test-", dir=probe_in))
    except OSError as e:
        how = "" if probe_in == path else f"cannot be created in {probe_in}: "
        raise NasError(f"{src}: {key}: {path}: not writable ({how}{e.strerror or e})") from None


def prepare(cfg: ExperimentConfig, stages: Collection[str] = ("search",)) -> Experiment:
    """`preflight(cfg, stages)`, then validate everything a search needs before any trial runs."""
    preflight(cfg, stages)
    space = resolve_space(cfg)
    objective = Objective.from_config(cfg.objective, where=f"{cfg.source}: objective")
    train = cfg.train
    check_algorithm(cfg, space)
    objective.costs(space.sample(np.random.default_rng(cfg.seed)))  # every cost once: a bad latency table fails here
    if cfg.evaluator.kind == "table":
        TableEvaluator(cfg.evaluator.table, cfg.evaluator.metric, cfg.evaluator.sample_repeat).check_space(space)
        exp = Experiment(cfg, space, objective, train)
        _check_some_feasible(exp)
        return exp
    check_fitting_data(cfg, space)
    exp = Experiment(cfg, space, objective, train)
    _check_some_feasible(exp)
    return exp


def check_fitting_data(cfg: ExperimentConfig, space: SearchSpace) -> DatasetInfo:
    """The experiment's dataset, checked cheaply before Ray starts (missing folders, unprepared TFDS
    datasets, bad images surface here) and refused in one line unless its images and classes fit `space`."""
    try:
        data = check_dataset(cfg.dataset, seed=cfg.seed, resolution=space.resolutions[0],
                             channels=space.in_channels)
    except NasError as e:
        raise NasError(f"{cfg.source}: {e}") from None
    if (data.resolution, data.channels, data.num_classes) != (space.resolutions[0], space.in_channels, space.num_classes) \
            or len(space.resolutions) > 1:
        raise NasError(
            f"{cfg.source}: dataset '{cfg.dataset.name}' gives {data.resolution}x{data.resolution}x{data.channels} images "
            f"with {data.num_classes} classes but space '{space.name}' expects "
            f"{list(space.resolutions)}x{space.in_channels} with {space.num_classes} classes; "
            f"set space_input: {{resolution: {data.resolution}, in_channels: {data.channels}, num_classes: {data.num_classes}}}"
        )
    return data


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
