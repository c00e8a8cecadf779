"""Supernet scoring fanned out over Ray actors that each hold the weights once (`RayScorer`).

A `SupernetScorer` scores `SCORE_CHUNK` candidates per compiled call in one process. `RayScorer`
keeps N Ray actors, each built once from the supernet's variables and the dataset, which are put
into Ray's object store once and shared by every actor (no copy per task); `score(archs)` cuts the
list into N contiguous parts (whole chunks, many candidates per task), scores them concurrently and
returns the accuracies in input order, the same numbers as the in-process scorer (each actor runs
the same compiled program). A worker that dies or raises ends the call with a one-line `NasError`
naming the worker. `open_scorer(run_dir, workers)` picks the in-process scorer (0) or the fan-out.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from evaluators.supernet_score import SCORE_CHUNK
from nas.inherited import Scorer, SupernetScorer
from nas.messages import first_line, last_line
from nas.rundir import enable_compilation_cache
from nas.tune.connect import init_ray
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

WORKER_CPUS = 1  # logical CPUs a scoring actor reserves (XLA uses the node's cores as it sees fit)
READY_TIMEOUT_S = 300.0  # actors that cannot start (no room, lost node) fail instead of waiting forever


@ray.remote(num_cpus=WORKER_CPUS)
class ScoringWorker:
    """One actor: an in-process `SupernetScorer` built once from the shared weights and data, kept."""

    def __init__(self, space, variables, data, run_dir: str, n_images: int):
        enable_compilation_cache()  # as a search trial: a repeated run finds its scoring program compiled
        self.scorer = SupernetScorer(space, variables, data, Path(run_dir), n_images)
        self.calls = 0

    def ready(self) -> dict[str, Any]:
        """The actor's process id and node (answers once the scoring state is built)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def score(self, archs: list[Architecture], split: str) -> np.ndarray:
        self.calls += 1
        return self.scorer.score(archs, split)

    def extract(self, arch: Architecture) -> Any:
        self.calls += 1
        return self.scorer.extract(arch)

    def stats(self) -> dict[str, Any]:
        """How this actor was used: its process, the scoring calls it served and its CPU seconds so far."""
        return {"pid": os.getpid(), "calls": self.calls, "cpu_s": time.process_time()}


def split_parts(n: int, workers: int, chunk: int = SCORE_CHUNK) -> list[slice]:
    """Contiguous slices of `n` candidates for at most `workers` tasks, each a whole number of chunks
    (but the last): a task never pads a chunk another task could have filled."""
    if n <= 0:
        return []
    per = chunk * math.ceil(math.ceil(n / workers) / chunk)
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


class RayScorer:
    """Inherited accuracy scored by `workers` Ray actors holding the supernet once each.

    Build with `RayScorer(SupernetScorer.from_run(RUN_DIR), workers)` (Ray already initialised, e.g.
    by `open_scorer`). The supernet's variables and dataset are put into the object store once; every
    actor gets the same object references and keeps its scoring state for its lifetime. `extract` runs
    on a worker (its compiled scoring program; the statistics of a candidate it scored are reused).
    `close()` (or a `with` block) ends the actors.

    Example:
      >>> with RayScorer(SupernetScorer.from_run("runs/tiny"), workers=4) as scorer:
      ...     acc = scorer.score(archs)  # same order and values as the in-process scorer
    """

    def __init__(self, local: SupernetScorer, workers: int, *, what: str = "workers"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise NasError(f"{what}: {workers!r}; allowed an integer >= 1 for Ray scoring workers")
        # the cluster's CPUs, not those free right now: actors ended a moment ago release theirs asynchronously
        # (a busy cluster makes the actors wait, and READY_TIMEOUT_S turns a wait that never ends into an error)
        total = ray.cluster_resources().get("CPU", 0.0)
        if workers * WORKER_CPUS > total:
            raise NasError(f"{what}: {workers} scoring workers need {workers * WORKER_CPUS:g} CPUs, the Ray cluster "
                           f"has {total:g}; allowed: at most {int(total // WORKER_CPUS)} workers")
        self.local = local
        self._scored_by: dict[str, int] = {}  # key -> the worker that scored it last (it keeps its statistics)
        self.what = what
        variables = jax.device_get(local.variables)  # NumPy leaves: shared from the object store without a copy
        self.shared = {"variables": ray.put(variables), "data": ray.put(local.data)}
        self.workers = [ScoringWorker.options(scheduling_strategy="SPREAD").remote(
            local.space, self.shared["variables"], self.shared["data"], str(local.run_dir), local.n_images)
            for _ in range(workers)]
        try:
            self.nodes = self._gather([w.ready.remote() for w in self.workers], timeout=READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    # the Scorer protocol (and what `nas specialize` reads of a supernet scorer)
    @property
    def space(self):
        return self.local.space

    @property
    def cache_dir(self) -> Path:
        return self.local.cache_dir

    @property
    def run_dir(self) -> Path:
        return self.local.run_dir

    @property
    def experiment(self) -> Any:
        return self.local.experiment

    @property
    def n_images(self) -> int:
        return self.local.n_images

    def score(self, archs: Sequence[Architecture], split: str = "val") -> np.ndarray:
        """One accuracy per architecture, in order: contiguous parts scored by the workers at once."""
        archs = list(archs)
        if not archs:
            return np.zeros(0)
        parts = split_parts(len(archs), len(self.workers))
        refs = [w.score.remote(archs[p], split) for w, p in zip(self.workers, parts)]
        out = self._gather(refs)
        for i, p in enumerate(parts):
            self._scored_by.update((a.key, i) for a in archs[p])
        return np.concatenate([np.asarray(o, np.float64) for o in out])

    def extract(self, arch: Architecture) -> Any:
        """Stand-alone variables of `arch` from the worker that scored it last (the first if none did)."""
        i = self._scored_by.get(arch.key, 0)
        return self._gather([self.workers[i].extract.remote(arch)], on=[i])[0]

    def worker_stats(self) -> list[dict[str, Any]]:
        return self._gather([w.stats.remote() for w in self.workers])

    def close(self) -> None:
        """End the actors and release the shared objects (idempotent)."""
        for w in getattr(self, "workers", []):
            ray.kill(w)
        self.workers = []
        self.shared = {}

    def __enter__(self) -> "RayScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gather(self, refs: list, timeout: float | None = None, on: list[int] | None = None) -> list[Any]:
        """Results of one task per worker (refs[j] ran on worker on[j], default j), in order; the first failure
        raises, naming its worker."""
        index = {ref: j for j, ref in enumerate(refs)}
        on = list(range(len(refs))) if on is None else on
        n = len(self.workers)
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise NasError(f"{self.what}: {len(pending)} of {len(refs)} scoring workers did not start within "
                               f"{timeout:.0f} s (the Ray cluster has {ray.available_resources().get('CPU', 0):g} "
                               f"CPUs free)")
            for ref in done:
                j = index[ref]
                i = on[j]
                try:
                    results[j] = ray.get(ref)
                except RayTaskError as e:
                    cause = e.cause
                    if isinstance(cause, NasError):  # the user's error (a key of another space, ...): as is
                        raise NasError(str(cause)) from None
                    raise NasError(f"scoring worker {i} of {n} raised {type(cause).__name__}: "
                                   f"{last_line(cause) or '(no message)'}") from None
                except (RayActorError, GetTimeoutError) as e:
                    raise NasError(f"scoring worker {i} of {n} died: "
                                   f"{first_line(e, 300) or type(e).__name__}") from None
        return [results[j] for j in range(len(refs))]


def open_scorer(run_dir: str | Path, workers: int = 0, *, n_images: int | None = None,
                address: str | None = None, what: str = "--workers") -> Scorer:
    """The scorer of a trained supernet run: in this process (`workers` 0) or over Ray actors.

    Args:
        run_dir: a run directory holding `supernet/` (from `nas supernet train`).
        workers: Ray scoring actors (0: no Ray, the in-process `SupernetScorer`).
        n_images: BatchNorm recalibration images per candidate (None: the supernet's config).
        address: a Ray cluster to join (None: $RAY_ADDRESS, else a private local instance).
        what: how the caller names the workers setting in errors (`evaluator.workers`, `--workers`).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise NasError(f"{what}: {workers!r}; allowed an integer >= 0 (0: score in this process)")
    local = SupernetScorer.from_run(run_dir)
    if n_images is not None:
        local = dataclasses.replace(local, n_images=n_images)
    if workers == 0:
        return local
    init_ray(address)
    return RayScorer(local, workers, what=what)
