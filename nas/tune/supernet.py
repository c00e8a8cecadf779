"""Supernet training as one Ray Tune trial (all of the supernet route's Ray code lives here).

One trial trains the supernet with a checkpoint per epoch, so Tune retries a trial whose node was
lost from its last epoch (`max_failures`), `--resume` restores an interrupted driver, and the
same command runs on a cluster (`--address`) like any search.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from evaluators.supernet import MANIFEST, WEIGHTS, load_supernet, save_supernet, train_supernet
from nas.config import ExperimentConfig
from nas.tune.connect import init_ray
from nas.rundir import enable_compilation_cache
from nas.tune.trial import resume_blob
from nas.messages import last_line
from nas.supernet import SupernetJob, check_out_dir, load_data, prepare, write_outputs
from search_spaces.catalog import load_space
from search_spaces.errors import NasError

TRAIN_STATE = "supernet_state.msgpack"
HISTORY_KEY = "history"


def supernet_trial(config: dict[str, Any], job: SupernetJob) -> None:
    """The Tune trainable: train, report every epoch with a resumable checkpoint, then the weights."""
    enable_compilation_cache()  # a retried trial, a --force re-run or a second seed loads its training program
    data = load_data(job.cfg, job.space)
    pending: dict[str, Any] = {}

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        pending["metrics"] = {**metrics, "epoch": epoch}

    def on_checkpoint(epoch: int, blob: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / TRAIN_STATE).write_bytes(blob)
            tune.report(pending.pop("metrics"), checkpoint=tune.Checkpoint.from_directory(tmp))

    result = train_supernet(job.space, data, job.train, on_epoch=on_epoch, checkpoint=on_checkpoint,
                            resume_from=resume_blob(TRAIN_STATE))
    with tempfile.TemporaryDirectory() as tmp:  # the weights travel back to the driver as the final checkpoint
        save_supernet(tmp, job.space, result.variables, space_ref=job.cfg.space, space_input=job.cfg.space_input,
                      config=job.train, history=result.history, extra={"experiment": job.cfg.to_dict()})
        tune.report({**result.history[-1], "done_training": 1, "compile_s": result.compile_s,
                     "train_s": result.train_s}, checkpoint=tune.Checkpoint.from_directory(tmp))


class _Progress(tune.Callback):
    """One line per supernet epoch on the driver's console."""

    def __init__(self, printer):
        self.printer = printer

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val_accuracy_largest" in result and "done_training" not in result:
            self.printer(f"  epoch {result.get('epoch')}: loss {result['train_loss']:.4f}  inherited val acc "
                         f"largest {result['val_accuracy_largest']:.4f} smallest {result['val_accuracy_smallest']:.4f}"
                         f"  ({result['epoch_s']:.1f} s)", flush=True)


def train_on_ray(cfg: ExperimentConfig, *, resume: bool = False, force: bool = False,
                 address: str | None = None, printer=print) -> Path:
    """Train the supernet of `cfg` as one Tune trial; writes RUN_DIR/supernet/ and returns it."""
    job = prepare(cfg)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # num_to_keep=2 (a checkpoint holds the whole supernet and its optimizer state) forces a snapshot of the
    # one-trial experiment per checkpoint, which is cheap here; Tune warns about it every epoch otherwise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_ray(address)
    out = check_out_dir(job, resume=resume, force=force)
    trainable = tune.with_resources(tune.with_parameters(supernet_trial, job=job),
                                    {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    tune_dir = str(out / "tune")
    printer(f"supernet '{cfg.name}': space {job.space.name} ({job.space.size():,d} architectures), dataset "
            f"{cfg.dataset.name}, {job.train.epochs} epochs -> {out}", flush=True)
    if resume and tune.Tuner.can_restore(tune_dir):
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={}, tune_config=tune.TuneConfig(num_samples=1),
                           run_config=tune.RunConfig(
                               name="tune", storage_path=str(out), verbose=0,
                               callbacks=[_Progress(printer), CSVLoggerCallback(), JsonLoggerCallback()],
                               failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                               checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    grid = tuner.fit()
    result = grid[0]
    if result.error is not None or result.checkpoint is None:
        raise NasError(f"supernet training of '{cfg.name}' failed: {last_line(str(result.error))} "
                       f"(continue with: nas supernet train {cfg.source} --resume)")
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / WEIGHTS).exists():
            raise NasError(f"supernet training of '{cfg.name}' stopped before its last epoch; continue with: "
                           f"nas supernet train {cfg.source} --resume")
        for name in (WEIGHTS, MANIFEST):
            shutil.copy(Path(d) / name, out / name)
    saved = load_supernet(out, load_space)
    write_outputs(job, saved.variables, saved.manifest["history"])
    return out
