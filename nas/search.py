"""The Ray Tune driver: the only module that imports Ray.

`run_search(cfg)` runs one experiment: a Tune `Tuner` whose searcher proposes architectures of
the configured space (only feasible ones: hard constraints are checked with the cost model
before a candidate reaches Tune, and infeasible ones are recorded, never trained and never
counted against `num_trials`), whose trainable trains each candidate and reports validation
accuracy, costs and score after every epoch, and whose results become `trials.csv` and
`winners.json` in the run directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import Searcher

from nas.config import ExperimentConfig
from nas.objective import Objective
from search_spaces.architecture import Architecture
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

METRIC, MODE = "score", "max"
SUGGESTION = "suggestion"  # the searcher's running count, stamped into each trial's config
TRIAL_COLUMNS = ["suggestion", "trial_id", "key", "status", "params", "macs", "accuracy", "score", "epochs", "wall_s",
                 "node_id", "error"]
FEASIBILITY_PROBES = 2000


# ============================================================ experiment context
@dataclass(frozen=True)
class Experiment:
    """What every trial needs, resolved once in the driver and shipped to the workers."""

    cfg: ExperimentConfig
    space: SearchSpace
    objective: Objective
    train: Any  # evaluators.train.TrainConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def resolve_space(cfg: ExperimentConfig) -> SearchSpace:
    space = load_space(cfg.space)
    if cfg.space_input:
        space = space.with_input(**cfg.space_input)
    return space


def prepare(cfg: ExperimentConfig) -> Experiment:
    """Validate everything a search needs before any trial runs (one-line errors)."""
    from evaluators.datasets import load_dataset
    from evaluators.optim import TrainConfig

    space = resolve_space(cfg)
    objective = Objective.from_config(cfg.objective, where=f"{cfg.source}: objective")
    train = TrainConfig.from_dict(cfg.train, source=f"{cfg.source}: train")
    make_searcher(cfg.search.algorithm, None, check_only=(cfg, space))
    if cfg.evaluator.kind == "table":
        from evaluators.table import TableEvaluator

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
    from nas.distill import DistillConfig
    from nas.export import ExportConfig

    DistillConfig.from_dict(cfg.distill, f"{cfg.source}: distill")
    ExportConfig.from_dict(cfg.export, f"{cfg.source}: export")
    exp = Experiment(cfg, space, objective, train)
    _check_some_feasible(exp)
    return exp


def _check_some_feasible(exp: Experiment) -> None:
    if not exp.objective.constraints:
        return
    import numpy as np

    rng = np.random.default_rng(exp.cfg.seed)
    for _ in range(FEASIBILITY_PROBES):
        if exp.objective.feasible(exp.space.sample(rng)):
            return
    raise NasError(
        f"{exp.cfg.source}: objective.constraints: none of {FEASIBILITY_PROBES} random architectures of "
        f"'{exp.space.name}' satisfies them; loosen the constraints"
    )


# ============================================================ the trainable
def _enable_compilation_cache() -> None:
    import jax

    cache = os.environ.get("NAS_JAX_CACHE", str(Path.home() / ".cache" / "compact-nas" / "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_trial(config: dict[str, Any], exp: Experiment, finished: dict[str, dict] | None = None) -> None:
    """One Tune trial: decode, cost, (constraints), train with per-epoch reports, checkpoint."""
    import ray

    from evaluators.datasets import load_dataset
    from evaluators.train import train
    from evaluators.variables import save_variables

    done = _finished_before(finished, config, exp)
    if done is not None and _report_again(exp, done):
        return
    _enable_compilation_cache()
    start = time.time()
    arch = exp.space.from_choices(config)
    costs = exp.objective.costs(arch)
    base = {"key": arch.key, SUGGESTION: config.get(SUGGESTION, 0), **_cost_metrics(costs),
            "node_id": ray.get_runtime_context().get_node_id(), "started_at": start}  # Tune's timestamp is whole s
    violations = exp.objective.violations(costs)
    if violations:  # the searcher filters these; a hand-made config may still get here
        tune.report({**base, "status": "infeasible", "error": "; ".join(violations), METRIC: -1.0,
                     "accuracy": 0.0, "wall_s": time.time() - start})
        return
    if exp.cfg.evaluator.kind == "table":
        tune.report({**base, **_table_lookup(exp, arch, config), "epochs": 1, "wall_s": time.time() - start,
                     "status": "ok"})
        return
    c = exp.cfg.dataset
    data = load_dataset(c.name, seed=exp.cfg.seed, path=c.path, val_fraction=c.val_fraction,
                        test_fraction=c.test_fraction)
    epochs = exp.train.epochs

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        state["metrics"] = {**base, **m, "accuracy": m["val_accuracy"],
                            METRIC: exp.objective.score(m["val_accuracy"], costs), "epochs": epoch,
                            "wall_s": time.time() - start, "status": "ok" if epoch == epochs else "running"}

    def on_checkpoint(epoch: int, blob: bytes) -> None:
        metrics = state.pop("metrics")
        if epoch == epochs:
            state["final"] = metrics
            return
        with tempfile.TemporaryDirectory() as tmp:  # lets a retried trial continue from this epoch
            (Path(tmp) / TRAIN_STATE).write_bytes(blob)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    state: dict[str, Any] = {}
    result = train(arch, data, exp.train, on_epoch=on_epoch, checkpoint=on_checkpoint,
                   resume_from=_resume_blob())
    with tempfile.TemporaryDirectory() as tmp:
        save_variables(Path(tmp) / "variables.msgpack", result.variables)
        (Path(tmp) / "architecture.json").write_text(arch.to_json(indent=2))
        final = {**state["final"], "wall_s": time.time() - start, "compile_s": result.compile_s,
                 "init_s": result.init_s, "train_s": result.train_s}
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))


TRAIN_STATE = "train_state.msgpack"
FINISHED_LOG = "finished.jsonl"


class FinishedLog(tune.Callback):
    """Appends every finished trial's result to RUN_DIR/finished.jsonl at once. Tune snapshots its
    experiment state only every ~10 s, so a killed driver (SIGKILL, lost machine) would otherwise
    lose, and `--resume` re-run, the trials that finished since the last snapshot. Must come before
    the callbacks that announce a finished trial."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / FINISHED_LOG

    def on_trial_complete(self, iteration, trials, trial, **info):
        from ray.tune.result import AUTO_RESULT_KEYS

        skip = {*AUTO_RESULT_KEYS, "trial_id", "experiment_tag", "done", "should_checkpoint"}
        result = {k: v for k, v in (trial.last_result or {}).items() if k not in skip}
        with self.path.open("a") as f:
            f.write(json.dumps({"trial_id": trial.trial_id, "result": result}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def read(run_dir: Path) -> dict[str, dict]:
        path = Path(run_dir) / FINISHED_LOG
        lines = path.read_text().splitlines() if path.exists() else []
        records = {}
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            records[rec["trial_id"]] = records[_suggestion_id(rec["result"])] = rec["result"]
        return records


def _suggestion_id(result: dict[str, Any]) -> str:
    return f"{result.get(SUGGESTION, '')}:{result.get('key', '')}"


def _finished_before(finished: dict[str, dict] | None, config: dict[str, Any], exp: Experiment) -> dict | None:
    """The recorded result of this trial, if it finished before the driver was killed: by trial id, or,
    for a trial the last state snapshot did not hold (the restored searcher suggests it again, under a
    new id), by suggestion number and architecture."""
    if not finished:
        return None
    done = finished.get(tune.get_context().get_trial_id())
    if done is None:
        done = finished.get(_suggestion_id({SUGGESTION: config.get(SUGGESTION, 0),
                                            "key": exp.space.from_choices(config).key}))
    return done


def _report_again(exp: Experiment, result: dict[str, Any]) -> bool:
    """Report the result of a trial that had finished before the driver was killed, instead of
    running it again; a training trial needs its final checkpoint for that (else it runs again)."""
    if exp.cfg.evaluator.kind == "table":
        tune.report(result)
        return True
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        final = (Path(d) / "variables.msgpack").exists()
    if final:
        tune.report(result, checkpoint=ckpt)
    return final


def _resume_blob() -> bytes | None:
    """The training state of this trial's last epoch checkpoint, when Tune retries the trial."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        path = Path(d) / TRAIN_STATE
        return path.read_bytes() if path.exists() else None


def _table_lookup(exp: Experiment, arch: Architecture, config: dict[str, Any]) -> dict[str, float]:
    """Accuracy (as a fraction) of `arch` from the benchmark table; a sampled repeat is seeded per key."""
    import zlib

    import numpy as np

    from evaluators.table import TableEvaluator

    ev = exp.cfg.evaluator
    table = TableEvaluator(ev.table, ev.metric, ev.sample_repeat)
    rng = np.random.default_rng([exp.cfg.seed, zlib.crc32(arch.key.encode())])
    acc = table.evaluate(arch, rng=rng)["accuracy"] / 100.0
    costs = exp.objective.costs(arch)
    return {"accuracy": acc, "val_accuracy": acc, METRIC: exp.objective.score(acc, costs)}


def _cost_metrics(costs: dict[str, float]) -> dict[str, float]:
    return {k.replace("@", "_at_") if k.startswith("latency") else k: v for k, v in costs.items()}


# ============================================================ the searcher
class Feasibility:
    """A picklable feasibility check that logs every candidate the cost model rejects (once) to
    infeasible.jsonl, marking whether a searcher proposed it (`proposed`) or a strategy only
    screened it while choosing (e.g. the GP scoring every key of a small space)."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.path = exp.run_dir / "infeasible.jsonl"
        self.seen = {(r["key"], r.get("proposed", False)) for r in self.read(self.path)}

    def __call__(self, arch: Architecture, proposed: bool = False) -> bool:
        if not self.exp.objective.constraints:
            return True
        costs = self.exp.objective.costs(arch)
        violations = self.exp.objective.violations(costs)
        if violations and (arch.key, proposed) not in self.seen:
            self.seen.add((arch.key, proposed))
            with self.path.open("a") as f:
                f.write(json.dumps({"key": arch.key, **_cost_metrics(costs), "error": "; ".join(violations),
                                    "proposed": proposed}) + "\n")
        return not violations

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StrategySearcher(Searcher):
    """Adapts a Ray-free ask/tell strategy (nas.strategies) to Tune's `Searcher` interface."""

    def __init__(self, exp: Experiment):
        super().__init__(metric=METRIC, mode=MODE)
        from nas.strategies import make_strategy

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
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opts = dict(exp.cfg.search.options)
    space = exp.space.to_param_space(tune.choice)
    cost = exp.objective.penalties[0].cost if exp.objective.penalties else "params"
    cost_metric = next(iter(_cost_metrics({cost: 0.0})))
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
        costs = _cost_metrics(exp.objective.costs(arch))
        return {METRIC: 0.0, "accuracy": 0.0, cost_metric: costs.get(cost_metric, 0.0)}

    return ConstrainedSearcher(inner, exp, worst)


OPTUNA_ALGORITHMS = {"tpe": False, "nsga2": True}


def make_searcher(name: str, exp: Experiment | None, *, check_only: tuple | None = None) -> Searcher | None:
    """The Tune searcher for algorithm `name`: an ask/tell strategy (nas.strategies) behind
    StrategySearcher, or Optuna's TPE / NSGA-II behind ConstrainedSearcher."""
    from nas.strategies import STRATEGIES, make_strategy

    if name not in STRATEGIES and name not in OPTUNA_ALGORITHMS:
        allowed = ", ".join(sorted([*STRATEGIES.names(), *OPTUNA_ALGORITHMS]))
        src = check_only[0].source if check_only else "config"
        raise NasError(f"{src}: search.algorithm: unknown algorithm '{name}'; allowed: {allowed}")
    if check_only:
        cfg, space = check_only
        if name in STRATEGIES:  # validates options and budget
            make_strategy(name, space, seed=cfg.seed, options=dict(cfg.search.options), budget=cfg.num_trials)
        return None
    if name in OPTUNA_ALGORITHMS:
        return _optuna(exp, OPTUNA_ALGORITHMS[name])
    return StrategySearcher(exp)


# ============================================================ progress
class _LineStream:
    """A text stream that hands each complete line to `printer` (print, or a test's collector)."""

    def __init__(self, printer):
        self.printer, self.buf = printer, ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.printer(line, flush=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.printer is print and sys.stdout.isatty()


class Monitor(tune.Callback):
    """Forwards Tune's trial events to the Ray-free SearchMonitor (live progress, TensorBoard).

    The monitor is built lazily: Tune pickles its callbacks, and the monitor holds locks and writers.
    """

    def __init__(self, exp: Experiment, printer=print):
        self.exp, self.printer, self._monitor = exp, printer, None

    @property
    def monitor(self):
        if self._monitor is None:
            from nas.monitor import SearchMonitor

            c = self.exp.cfg
            stream = sys.stdout if self.printer is print else _LineStream(self.printer)
            self._monitor = SearchMonitor(self.exp.run_dir, self.exp.space, c.num_trials, stream=stream,
                                          latency_profile=(c.objective.profiles or ("host",))[0])
        return self._monitor

    def __getstate__(self):
        return {**self.__dict__, "_monitor": None, "printer": print}

    def setup(self, **info):
        self.monitor

    def on_trial_start(self, iteration, trials, trial, **info):
        self.monitor.trial_started(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.monitor.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.monitor.trial_completed(trial.trial_id, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):
        err = trial.get_error()
        self.monitor.trial_failed(trial.trial_id, _one_line(str(err)) if err else "error")

    def on_experiment_end(self, trials, **info):
        self.monitor.close()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()


# ============================================================ run directory
def check_run_dir(cfg: ExperimentConfig, *, resume: bool, force: bool) -> Path:
    """Refuse to mix experiments in one directory; `force` starts over, `resume` continues."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if saved.exists() and not force:
        previous = yaml.safe_load(saved.read_text())
        if previous != cfg.to_dict():
            diff = sorted(k for k in set(previous) | set(cfg.to_dict()) if previous.get(k) != cfg.to_dict().get(k))
            raise NasError(f"{run_dir}: holds a different experiment (differs in: {', '.join(diff)}); "
                           f"choose another name/output_dir, or pass --force to overwrite it")
        if not resume:
            raise NasError(f"{run_dir}: already holds this experiment; pass --resume to continue it "
                           f"or --force to start over")
    elif resume and not saved.exists():
        raise NasError(f"{run_dir}: nothing to resume (no config.yaml); run without --resume")
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise NasError(f"{run_dir}: not writable")
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail fast (one line) when a cluster address does not answer, instead of Ray's long retries."""
    import socket

    if address == "auto":
        if not (os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists()):
            raise NasError("--address auto: no running Ray cluster found on this machine (start one with `ray start "
                           "--head`, or give --address HOST:PORT)")
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise NasError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise NasError(f"--address {address}: cannot reach a Ray cluster there within {CONNECT_TIMEOUT_S:.0f} s "
                       f"({e.strerror or e})") from None


def _init_ray(cfg: ExperimentConfig, address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"PYTHONWARNINGS": "ignore"}
    address = address or os.environ.get("RAY_ADDRESS")  # set by Ray for a `ray job submit` entrypoint
    if address:
        _check_reachable(address)
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        # address="local": a new local instance even where another cluster runs on this machine (without
        # it Ray joins the cluster named in /tmp/ray/ray_current_cluster, and refuses num_cpus there)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, configure_logging=False)


def _check_resources(cfg: ExperimentConfig) -> None:
    """A trial that no node can host would wait forever: refuse it up front."""
    import ray

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
    exp = prepare(cfg)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Our own TensorBoard writer (nas/monitor.py) owns the HParams view; Tune's would shadow it.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    _init_ray(cfg, address)  # before touching the run dir: a bad address must not cost a --force'd run
    _check_resources(cfg)
    storage = _storage(cfg, cfg.run_dir)
    run_dir = check_run_dir(cfg, resume=resume, force=force)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, exp=exp, finished=FinishedLog.read(run_dir) if resume else {}),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu,
         **({"memory": int(cfg.resources.memory_gb * 2**30)} if cfg.resources.memory_gb else {})},
    )
    tune_dir = f"{storage.rstrip('/')}/{cfg.name if cfg.storage_path else 'tune'}"
    printer(f"search '{cfg.name}': space {exp.space.name} ({exp.space.size():,d} architectures), dataset "
            f"{cfg.dataset.name}, {cfg.num_trials} trials, algorithm {cfg.search.algorithm} -> {run_dir}", flush=True)
    monitor = Monitor(exp, printer)
    if resume and tune.Tuner.can_restore(tune_dir):
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=cfg.num_trials, max_concurrent_trials=cfg.max_concurrent,
                search_alg=make_searcher(cfg.search.algorithm, exp), scheduler=_scheduler(cfg), reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=cfg.name if cfg.storage_path else "tune", storage_path=storage, verbose=0,
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


class SearchInterrupted(NasError):
    """The driver was interrupted (Ctrl-C); finished trials are kept and --resume continues."""


def _scheduler(cfg: ExperimentConfig):
    if cfg.search.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        opts = {"grace_period": 1, "reduction_factor": 2, **cfg.search.scheduler_options}
        return ASHAScheduler(time_attr="training_iteration", max_t=_epochs(cfg), **opts)
    return None


def _epochs(cfg: ExperimentConfig) -> int:
    from evaluators.optim import TrainConfig

    return TrainConfig.from_dict(cfg.train).epochs


# ============================================================ results
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
                    "error": _one_line(str(r.error)) if r.error else m.get("error", ""),
                    "checkpoint": r.checkpoint.path if r.checkpoint else ""})
        row.update({k: v for k, v in m.items() if k.startswith("latency_ms")})
        if not row["params"] and key:
            row.update(_cost_metrics(exp.objective.costs(exp.space.decode(key))))
        rows.append(row)
    rows.sort(key=lambda r: (r[SUGGESTION] == "", r[SUGGESTION] if r[SUGGESTION] != "" else 0))
    for rec in Feasibility.read(exp.run_dir / "infeasible.jsonl"):
        if rec.pop("proposed", False):
            rows.append({**{c: "" for c in TRIAL_COLUMNS}, **rec, "status": "infeasible", "checkpoint": ""})
    return rows


def _key_from_config(exp: Experiment, config: dict | None) -> str:
    try:
        return exp.space.from_choices(config or {}).key
    except NasError:
        return ""


def _one_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def write_results(exp: Experiment, rows: list[dict[str, Any]]) -> None:
    """trials.csv (every trial), winners.json (top-k by score, with what is needed to rebuild them)."""
    run_dir = exp.run_dir
    extra = sorted({k for r in rows for k in r if k not in TRIAL_COLUMNS and k != "checkpoint"})
    with (run_dir / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    from nas.pareto import write_pareto

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
        dest = run_dir / "winners" / f"{rank:02d}"
        if dest.exists():
            shutil.rmtree(dest)
        if r["checkpoint"]:
            shutil.copytree(r["checkpoint"], dest)
        arch = exp.space.decode(r["key"])
        winners.append({
            "rank": rank, "key": r["key"], "space": exp.space.name, "trial_id": r["trial_id"],
            "score": float(r["score"]), "val_accuracy": float(r["accuracy"]),
            "params": int(float(r["params"])), "macs": int(float(r["macs"])),
            "architecture": arch.to_dict(),
            "checkpoint": str(dest.relative_to(run_dir)) if r["checkpoint"] else None,
        })
        if len(winners) == exp.cfg.top_k:
            break
    (run_dir / "winners.json").write_text(json.dumps(winners, indent=2))


def _float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def load_winners(run_dir: Path, *, with_weights: bool = True) -> list[dict[str, Any]]:
    """The winners of a run; with `with_weights`, refuse runs whose winners have no checkpoints."""
    path = Path(run_dir) / "winners.json"
    if not path.exists():
        raise NasError(f"{run_dir}: no winners.json; run `nas search` first")
    winners = json.loads(path.read_text())
    if not winners:
        raise NasError(f"{path}: no winners (every trial failed or was infeasible)")
    if with_weights and any(w.get("checkpoint") is None for w in winners):
        raise NasError(f"{path}: the winners have no trained weights (a table-evaluated search); "
                       f"nothing to distill or export")
    return winners


def experiment_from_run_dir(run_dir: Path) -> Experiment:
    """Rebuild the Experiment of a finished run from its saved config."""
    from nas.config import config_from_dict

    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        raise NasError(f"{run_dir}: not a run directory (no config.yaml)")
    raw = yaml.safe_load(saved.read_text())
    raw["output_dir"] = str(Path(run_dir).resolve().parent)
    cfg = config_from_dict(raw, source=str(saved))
    from evaluators.optim import TrainConfig

    space = resolve_space(cfg)
    return Experiment(cfg, space, Objective.from_config(cfg.objective), TrainConfig.from_dict(cfg.train))


