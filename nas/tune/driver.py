"""The Ray Tune driver: `run_search(cfg)` runs (or resumes) one experiment.

A Tune `Tuner` whose searcher (`nas.tune.searchers`) proposes feasible architectures of the
configured space, whose trainable (`nas.tune.trial`) trains each candidate and reports validation
accuracy, costs and score after every epoch, and whose results become `trials.csv` and
`winners.json` in the run directory (`nas.tune.results`, `nas.rundir.write_results`). Everything is
checked before Ray starts (`nas.preflight.prepare`). An experiment with `evaluator.kind: supernet`
is driven in this process, many candidates per call, without Tune (`nas.batched_search`), its
scoring in-process or over `evaluator.workers` Ray actors (`nas.tune.scoring`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from nas.batched_search import run_supernet_search
from nas.config import ExperimentConfig
from nas.preflight import prepare
from nas.rundir import TUNE_DIR, SearchInterrupted, check_run_dir, read_finished, write_results
from nas.tune.connect import init_ray
from nas.tune.progress import MonitorCallback
from nas.tune.results import collect_trials
from nas.tune.scoring import open_scorer
from nas.tune.searchers import make_searcher
from nas.tune.trial import METRIC, MODE, FinishedLog, run_trial
from search_spaces.errors import NasError


def _check_resources(cfg: ExperimentConfig) -> None:
    """A trial that no node can host would wait forever: refuse it up front."""

    need = {"CPU": cfg.resources.cpu, "GPU": cfg.resources.gpu}
    if cfg.resources.memory_gb:
        need["memory"] = cfg.resources.memory_gb * 2**30
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(all(res.get(k, 0) >= v for k, v in need.items() if v) for res in nodes):
        have = "; ".join(", ".join(f"{k} {res.get(k, 0):g}" for k in need) for res in nodes) or "no live nodes"
        raise NasError(f"{cfg.source}: resources: no node of the cluster can host a trial needing "
                       f"{', '.join(f'{k} {v:g}' for k, v in need.items() if v)} (nodes have: {have})")


def _storage(cfg: ExperimentConfig, run_dir: Path) -> str:
    """Where Tune keeps its experiment: RUN_DIR, or `storage_path` (a shared dir or cloud URI)."""
    if not cfg.storage_path:
        return str(run_dir)
    if "://" in cfg.storage_path:
        return cfg.storage_path
    path = Path(cfg.storage_path).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise NasError(f"{cfg.source}: storage_path: {path} is not writable ({e.strerror or e})") from None
    return str(path)


def run_search(cfg: ExperimentConfig, *, resume: bool = False, force: bool = False,
               address: str | None = None, printer=print) -> Path:
    """Run (or resume) the search of `cfg`; returns the run directory with trials.csv and winners.json."""
    if cfg.evaluator.kind == "supernet":  # no Tune trial per candidate; Ray only for `evaluator.workers` actors
        scorer = functools.partial(open_scorer, workers=cfg.evaluator.workers, address=address,
                                   what=f"{cfg.source}: evaluator.workers")
        return run_supernet_search(cfg, resume=resume, force=force, printer=printer, open_scorer=scorer)
    exp = prepare(cfg)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Our own TensorBoard writer (nas/monitor.py) owns the HParams view; Tune's would shadow it.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    init_ray(address)  # before touching the run dir: a bad address must not cost a --force'd run
    _check_resources(cfg)
    storage = _storage(cfg, cfg.run_dir)
    run_dir = check_run_dir(cfg, resume=resume, force=force)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, exp=exp, finished=read_finished(run_dir, printer) if resume else {}),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu,
         **({"memory": int(cfg.resources.memory_gb * 2**30)} if cfg.resources.memory_gb else {})},
    )
    tune_dir = f"{storage.rstrip('/')}/{cfg.name if cfg.storage_path else TUNE_DIR}"
    printer(f"search '{cfg.name}': space {exp.space.name} ({exp.space.size():,d} architectures), dataset "
            f"{cfg.dataset.name}, {cfg.num_trials} trials, algorithm {cfg.search.algorithm} -> {run_dir}", flush=True)
    monitor = MonitorCallback(exp, printer)
    if resume and tune.Tuner.can_restore(tune_dir):
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=cfg.num_trials, max_concurrent_trials=cfg.max_concurrent,
                search_alg=make_searcher(exp), scheduler=_scheduler(cfg), reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=cfg.name if cfg.storage_path else TUNE_DIR, storage_path=storage, verbose=0,
                callbacks=[FinishedLog(run_dir), monitor, CSVLoggerCallback(), JsonLoggerCallback()],
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures, fail_fast=False),
                # keep every epoch's checkpoint: num_to_keep forces an experiment snapshot per checkpoint
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            ),
        )
    try:
        grid = tuner.fit()
    finally:
        monitor.close()
    rows = collect_trials(grid, exp)
    write_results(exp, rows)
    finished = grid.num_terminated + grid.num_errors
    if finished < cfg.num_trials:
        raise SearchInterrupted(
            f"search '{cfg.name}' interrupted after {finished} of {cfg.num_trials} trials; results so far are in "
            f"{run_dir}; continue with: nas search {cfg.source} --resume")
    return run_dir


def _scheduler(cfg: ExperimentConfig):
    if cfg.search.scheduler == "asha":
        opts = {"grace_period": 1, "reduction_factor": 2, **cfg.search.scheduler_options}
        return ASHAScheduler(time_attr="training_iteration", max_t=_epochs(cfg), **opts)
    return None


def _epochs(cfg: ExperimentConfig) -> int:
    return cfg.train.epochs
