"""One Tune trial: decode a suggestion, cost it, train it with a report and a checkpoint per epoch.

A trial that Tune retries continues from its last epoch checkpoint; a trial that finished before
the driver was killed (finished.jsonl, see `FinishedLog`) is reported again, not trained again.
"""

from __future__ import annotations

import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from evaluators.datasets import load
from evaluators.table import TableEvaluator
from evaluators.train import train
from evaluators.variables import save_variables
from nas.rundir import (ARCHITECTURE, FINAL_CHECKPOINT, METRIC, SUGGESTION, TRAIN_STATE, VARIABLES, Experiment,
                        append_finished, enable_compilation_cache, result_columns, suggestion_id)
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

MODE = "max"  # of METRIC (nas.rundir)


def run_trial(config: dict[str, Any], exp: Experiment, finished: dict[str, dict] | None = None) -> None:
    """One Tune trial: decode, cost, (constraints), train with per-epoch reports, checkpoint."""
    done = _finished_before(finished, config, exp)
    if done is not None and _report_again(exp, done):
        return
    enable_compilation_cache()
    start = time.time()
    arch = exp.space.from_choices(config)
    costs = exp.objective.costs(arch)
    base = {"key": arch.key, SUGGESTION: config.get(SUGGESTION, 0), **result_columns(costs),
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
    data = load(c, seed=exp.cfg.seed, resolution=exp.space.resolutions[0], channels=exp.space.in_channels)
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
    blob = resume_blob()
    try:
        result = train(arch, data, exp.train, on_epoch=on_epoch, checkpoint=on_checkpoint, resume_from=blob)
    except NasError as e:  # a damaged epoch checkpoint (disk full, killed mid-write): start this trial over
        if blob is None or not str(e).startswith("resume_from:"):
            raise
        base["note"] = f"its epoch checkpoint cannot be restored ({e}); training it from the first epoch"
        print(f"trial {tune.get_context().get_trial_id()} ({arch.key}): {base['note']}", file=sys.stderr, flush=True)
        state.clear()
        result = train(arch, data, exp.train, on_epoch=on_epoch, checkpoint=on_checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        save_variables(Path(tmp) / VARIABLES, result.variables)
        (Path(tmp) / ARCHITECTURE).write_text(arch.to_json(indent=2))
        final = {**state["final"], "wall_s": time.time() - start, "compile_s": result.compile_s,
                 "init_s": result.init_s, "train_s": result.train_s}
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))


class FinishedLog(tune.Callback):
    """Appends every finished trial's result to RUN_DIR/finished.jsonl at once. Tune snapshots its
    experiment state only every ~10 s, so a killed driver (SIGKILL, lost machine) would otherwise
    lose, and `--resume` re-run, the trials that finished since the last snapshot. Must come before
    the callbacks that announce a finished trial."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_trial_complete(self, iteration, trials, trial, **info):
        skip = {*AUTO_RESULT_KEYS, "trial_id", "experiment_tag", "done", "should_checkpoint"}
        result = {k: v for k, v in (trial.last_result or {}).items() if k not in skip}
        # the final checkpoint: a resumed driver reports it again without training
        append_finished(self.run_dir, trial.trial_id, result, trial.checkpoint.path if trial.checkpoint else None)


def _finished_before(finished: dict[str, dict] | None, config: dict[str, Any], exp: Experiment) -> dict | None:
    """The recorded result of this trial, if it finished before the driver was killed: by trial id, or,
    for a trial the last state snapshot did not hold (the restored searcher suggests it again, under a
    new id), by suggestion number and architecture."""
    if not finished:
        return None
    done = finished.get(tune.get_context().get_trial_id())
    if done is None:
        done = finished.get(suggestion_id({SUGGESTION: config.get(SUGGESTION, 0),
                                            "key": exp.space.from_choices(config).key}))
    return done


def _report_again(exp: Experiment, result: dict[str, Any]) -> bool:
    """Report the result of a trial that had finished before the driver was killed, instead of
    running it again; a training trial needs its final checkpoint for that (else it runs again)."""
    result = dict(result)
    saved = result.pop(FINAL_CHECKPOINT, None)
    if exp.cfg.evaluator.kind == "table":
        tune.report(result)
        return True
    ckpt = tune.get_checkpoint()
    final = False
    if ckpt is not None:
        with ckpt.as_directory() as d:
            final = (Path(d) / VARIABLES).exists()
    if not final and saved and (Path(saved) / VARIABLES).is_file():
        # Tune's last state snapshot predates the trial's end (it restored an epoch checkpoint, or none):
        # the final checkpoint the finished log names is on disk
        ckpt, final = tune.Checkpoint.from_directory(saved), True
    if final:
        tune.report(result, checkpoint=ckpt)
    return final


def resume_blob(name: str = TRAIN_STATE) -> bytes | None:
    """The training state (file `name`) of this trial's last epoch checkpoint, when Tune retries the trial."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        path = Path(d) / name
        return path.read_bytes() if path.exists() else None


def _table_lookup(exp: Experiment, arch: Architecture, config: dict[str, Any]) -> dict[str, float]:
    """Accuracy (as a fraction) of `arch` from the benchmark table; a sampled repeat is seeded per key."""



    ev = exp.cfg.evaluator
    table = TableEvaluator(ev.table, ev.metric, ev.sample_repeat)
    rng = np.random.default_rng([exp.cfg.seed, zlib.crc32(arch.key.encode())])
    acc = table.evaluate(arch, rng=rng)["accuracy"] / 100.0
    costs = exp.objective.costs(arch)
    return {"accuracy": acc, "val_accuracy": acc, METRIC: exp.objective.score(acc, costs)}
