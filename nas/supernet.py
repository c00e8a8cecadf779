"""The supernet route, Ray-free: validate an experiment's `supernet:` section, lay out
RUN_DIR/supernet/, write its outputs (weights, manifest, history, TensorBoard events) and score
candidates of a trained supernet (`nas supernet eval`). Training on Ray lives in `nas.tune.supernet`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from tensorboardX import SummaryWriter

from evaluators.datasets import Dataset, load
from evaluators.supernet import SavedSupernet, SupernetConfig, load_supernet, save_supernet
from evaluators.supernet_score import score
from nas.config import ExperimentConfig, config_from_dict
from nas.preflight import check_fitting_data, preflight
from nas.rundir import resolve_space
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

SUPERNET_DIR = "supernet"
HISTORY = "history.json"
CONFIG = "config.yaml"


@dataclass(frozen=True)
class SupernetJob:
    """What the supernet trial needs, resolved once in the driver and shipped to the worker."""

    cfg: ExperimentConfig
    space: SearchSpace
    train: SupernetConfig

    @property
    def out_dir(self) -> Path:
        return self.cfg.run_dir / SUPERNET_DIR


def load_data(cfg: ExperimentConfig, space: SearchSpace) -> Dataset:
    return load(cfg.dataset, seed=cfg.seed, resolution=space.resolutions[0], channels=space.in_channels)


def prepare(cfg: ExperimentConfig) -> SupernetJob:
    """Validate everything supernet training needs before anything runs (one-line errors)."""
    preflight(cfg)
    space = resolve_space(cfg)
    check_fitting_data(cfg, space)
    return SupernetJob(cfg, space, cfg.supernet or SupernetConfig())


def check_out_dir(job: SupernetJob, *, resume: bool, force: bool) -> Path:
    """RUN_DIR/supernet/: refuse to overwrite a trained supernet or mix configs; `force` starts over."""
    out = job.out_dir
    saved = out / CONFIG
    if saved.exists() and not force:
        # compared as typed configs (defaults filled in), so a section added since it was saved is no difference
        previous = config_from_dict({**yaml.safe_load(saved.read_text()), "output_dir": job.cfg.output_dir}, str(saved))
        if previous != job.cfg:
            raise NasError(f"{out}: holds a supernet of a different experiment config; pass --force to replace it")
        if not resume:
            raise NasError(f"{out}: already holds this supernet; pass --resume to continue it or --force to start over")
    elif resume and not saved.exists():
        raise NasError(f"{out}: nothing to resume (no {CONFIG}); run without --resume")
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(job.cfg.to_dict(), sort_keys=False))
    return out


def write_outputs(job: SupernetJob, variables: dict[str, Any], history: list[dict[str, float]]) -> Path:
    """weights.msgpack + manifest.json (via `save_supernet`), history.json and TensorBoard events."""
    out = job.out_dir
    save_supernet(out, job.space, variables, space_ref=job.cfg.space, space_input=job.cfg.space_input,
                  config=job.train, history=history, extra={"experiment": job.cfg.to_dict()})
    (out / HISTORY).write_text(json.dumps(history, indent=2))
    with SummaryWriter(str(out / "tensorboard")) as tb:
        for row in history:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(f"supernet/{k}", v, int(row["epoch"]))
    return out


def load_run(run_dir: str | Path) -> tuple[SavedSupernet, ExperimentConfig]:
    """The trained supernet of a run directory and its experiment config (one-line errors)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NasError(f"{run_dir}: not a directory")
    saved = load_supernet(run_dir / SUPERNET_DIR, load_space)
    raw = dict(saved.manifest.get("experiment") or {})
    if not raw:
        raise NasError(f"{run_dir / SUPERNET_DIR}/manifest.json: no experiment config recorded")
    raw["output_dir"] = str(run_dir.resolve().parent)
    return saved, config_from_dict(raw, source=str(run_dir / SUPERNET_DIR / CONFIG))


def evaluate_keys(run_dir: str | Path, keys: Sequence[str], *, n_images: int | None = None,
                  scorer: Any = None) -> list[dict[str, Any]]:
    """Inherited validation accuracy of each architecture key on the run's supernet.

    `scorer`: a Scorer of this run opened by the caller (`nas.inherited`; e.g. fanned out over Ray
    workers by `nas.tune.scoring.open_scorer`, its recalibration images set there); None: scored here.
    """
    if scorer is not None:
        archs = [scorer.space.decode(k) for k in keys]
        return [{"key": a.key, "val_accuracy": float(x)} for a, x in zip(archs, scorer.score(archs))]
    saved, cfg = load_run(run_dir)
    archs = [saved.space.decode(k) for k in keys]  # a key of another space: one-line SpaceError
    cfg_train = SupernetConfig.from_dict(saved.manifest.get("config") or {})
    acc = score(saved.space, saved.variables, archs, load_data(cfg, saved.space),
                n_images=n_images or cfg_train.recalibration_images)
    return [{"key": a.key, "val_accuracy": float(x)} for a, x in zip(archs, acc)]
