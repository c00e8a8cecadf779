"""Scorers: measured accuracy of many candidates per call, and the predictor fitted on them (Ray-free).

A `Scorer` turns a list of architectures into accuracies (fractions) in one call and, where it
holds weights, gives a candidate's stand-alone variables. Two real ones:

* `SupernetScorer`: inherited validation accuracy from a trained weight-sharing supernet
  (`RUN_DIR/supernet/`, written by `nas supernet train`); `extract` slices a candidate's weights.
* `TableScorer`: a benchmark table's accuracy (no weights), for spaces such as NAS-Bench-Macro.

`fitted_predictor(scorer, ...)` measures random candidates once, fits the accuracy predictor
(`evaluators.predictor`) on them and caches both next to the scorer's run, so a search or a
specialization proposes with the predictor and confirms with the scorer.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from evaluators.datasets import Dataset
from evaluators.predictor import Predictor, PredictorConfig, fit_predictor, load_predictor
from evaluators.supernet import SupernetConfig
from evaluators.supernet_score import RECAL_IMAGES, score_with_statistics
from nas.supernet import load_data, load_run
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace
from search_spaces.supernet import extract

PREDICTOR_FILE = "predictor.msgpack"
MEASURED_FILE = "measured.json"
KEPT_STATISTICS = 64  # re-estimated BatchNorm statistics a supernet scorer keeps (the last candidates scored)


class Scorer(Protocol):
    """Measured accuracy (a fraction) of many candidates per call."""

    space: SearchSpace
    cache_dir: Path | None  # where a fitted predictor and its measurements are kept (None: not kept)

    def score(self, archs: Sequence[Architecture]) -> np.ndarray:
        """One accuracy per architecture, in order."""

    def extract(self, arch: Architecture) -> Any | None:
        """Stand-alone {'params', 'batch_stats'} of `arch` for `build_model(arch)`, or None (no weights)."""


@dataclass
class TableScorer:
    """Accuracy from a NAS-Bench-Macro-format table (`evaluators.table`), as a fraction; no weights."""

    space: SearchSpace
    table: Any  # evaluators.table.TableEvaluator
    cache_dir: Path | None = None

    def score(self, archs: Sequence[Architecture]) -> np.ndarray:
        return np.array([self.table.evaluate(a)["accuracy"] / 100.0 for a in archs], np.float64)

    def extract(self, arch: Architecture) -> None:
        return None


@dataclass
class SupernetScorer:
    """Inherited validation accuracy from a trained supernet, its weights loaded once.

    Build with `SupernetScorer.from_run(RUN_DIR)`: the supernet of `RUN_DIR/supernet/` (written by
    `nas supernet train`) and the dataset of the experiment recorded with it. Each candidate's BatchNorm
    statistics are re-estimated on `n_images` training images before the whole validation split is
    scored (`evaluators.supernet.score`: a fixed number of compiled programs however many candidates).
    """

    space: SearchSpace
    variables: Any
    data: Dataset
    run_dir: Path
    n_images: int = RECAL_IMAGES
    experiment: Any = None  # the supernet run's ExperimentConfig
    # key -> re-estimated 'batch_stats' of the last KEPT_STATISTICS candidates scored: a search's winners were
    # scored just before they are extracted
    _statistics: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def cache_dir(self) -> Path:
        return self.run_dir / "supernet"

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "SupernetScorer":
        run_dir = Path(run_dir).resolve()
        saved, cfg = load_run(run_dir)
        n_images = SupernetConfig.from_dict(saved.manifest.get("config") or {}).recalibration_images
        return cls(saved.space, saved.variables, load_data(cfg, saved.space), run_dir, n_images, cfg)

    def score(self, archs: Sequence[Architecture], split: str = "val") -> np.ndarray:
        for a in archs:
            if a.space != self.space.name:
                raise NasError(f"{self.run_dir}: architecture {a.key!r} of space '{a.space}' cannot be scored by the "
                               f"supernet of space '{self.space.name}'")
        if not archs:
            return np.zeros(0)
        acc, stats = score_with_statistics(self.space, self.variables, list(archs), self.data, n_images=self.n_images,
                                           split=split)
        for a, st in zip(archs, stats):
            self._statistics[a.key] = st
            self._statistics.move_to_end(a.key)
        while len(self._statistics) > KEPT_STATISTICS:
            self._statistics.popitem(last=False)
        return np.asarray(acc, np.float64)

    def extract(self, arch: Architecture) -> Any:
        """The candidate's stand-alone variables, BatchNorm statistics re-estimated for it: those of its
        last scoring, else scored now (the scoring program: no other program is compiled for this)."""
        if arch.key not in self._statistics:
            self.score([arch])
        stats = self._statistics[arch.key]
        return extract(self.space, arch, {"params": self.variables["params"], "batch_stats": stats})


def fitted_predictor(scorer: Scorer, *, n_measure: int = 300, seed: int = 0,
                     cfg: PredictorConfig | None = None, printer=None) -> tuple[Predictor, dict[str, Any]]:
    """The accuracy predictor of `scorer`'s space, fitted on `n_measure` random measured candidates.

    Measurements and the predictor are cached in `scorer.cache_dir` (when set): a later call with
    the same or a smaller `n_measure` reuses them; a larger one measures only the extra candidates.
    One fifth of the measurements are held out to report the predictor's Kendall tau and RMSE.

    Returns:
        (predictor, info) with info = {'measured', 'measure_s', 'fit_s', 'holdout_tau', 'holdout_rmse', 'reused'}.
    """
    if isinstance(n_measure, bool) or not isinstance(n_measure, int) or n_measure < 10:
        raise NasError(f"predictor measurements: {n_measure!r}; allowed an integer >= 10")
    space = scorer.space
    cache = Path(scorer.cache_dir) if scorer.cache_dir else None
    measured: dict[str, float] = {}
    if cache and (cache / MEASURED_FILE).exists():
        measured = {k: float(v) for k, v in json.loads((cache / MEASURED_FILE).read_text())["accuracy"].items()}
    rng = np.random.default_rng([seed, 11])
    t0 = time.perf_counter()
    want = min(n_measure, space.size())
    new: list[Architecture] = []
    tries = 0
    keys = set(measured)
    while len(keys) < want and tries < 50 * want:
        tries += 1
        arch = space.sample(rng)
        if arch.key not in keys:
            keys.add(arch.key)
            new.append(arch)
    if new:
        if printer:
            printer(f"measuring {len(new)} random candidates for the accuracy predictor", flush=True)
        for arch, acc in zip(new, scorer.score(new)):
            measured[arch.key] = float(acc)
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            (cache / MEASURED_FILE).write_text(json.dumps({"space": space.name, "accuracy": measured}))
    measure_s = time.perf_counter() - t0
    if cache and not new and (cache / PREDICTOR_FILE).exists():
        pred = load_predictor(cache / PREDICTOR_FILE, space)
        info = json.loads((cache / (PREDICTOR_FILE + ".json")).read_text())
        return pred, {**info, "reused": True, "measure_s": 0.0, "fit_s": 0.0}
    order = sorted(measured)
    np.random.default_rng([seed, 12]).shuffle(order)
    held = order[: max(2, len(order) // 5)]
    train = order[len(held):]
    t1 = time.perf_counter()
    check = fit_predictor(space, train, [measured[k] for k in train], cfg)
    ev = check.evaluate(held, [measured[k] for k in held])
    pred = fit_predictor(space, order, [measured[k] for k in order], cfg)  # the one used: every measurement
    info = {"measured": len(order), "measure_s": measure_s, "fit_s": time.perf_counter() - t1,
            "holdout_tau": ev["kendall_tau"], "holdout_rmse": ev["rmse"], "holdout_n": ev["n"], "reused": False}
    if cache:
        pred.save(cache / PREDICTOR_FILE)
        (cache / (PREDICTOR_FILE + ".json")).write_text(json.dumps(info, indent=2))
    return pred, info
