"""The run directory: what a search, distillation and export write, as typed records (Ray-free).

One reader and one writer per file, so no other module parses these files by hand:

| file | written by | record / function |
|---|---|---|
| `config.yaml` | `check_run_dir` (the search) | `experiment_from_run_dir`, `read_saved_config` |
| `trials.csv` | `write_trials` (`write_results`: with pareto.json and winners) | `read_trials` (rows of str; old `latency_ms@P` columns renamed) |
| `winners.json` | `write_winners` | `Winner`, `load_winners`, `read_winners` |
| `winners/NN/` | the search (trial's final checkpoint) | `Winner.folder`, `VARIABLES`, `ARCHITECTURE` |
| `distill.json` | `write_distill` | `DistillReport`, `DistillRow`, `read_distill` (both schemas) |
| `winners/NN/baselines.json`, `kd_students.json` | `StudentResults.put` (nas.distill) | `StudentResults` |
| `winners/NN/students/KEY.state` | `StudentState.save` (per epoch, removed when done) | `StudentState.load` |
| `pareto.json` | `nas.pareto.write_pareto` | - |
| `finished.jsonl` | the Tune callback in `nas.tune` | `read_finished`, `suggestion_id` |
| `infeasible.jsonl` | `append_infeasible` (`Feasibility`) | `read_infeasible` |
| `scored.jsonl`, `batched_search.json`, `candidates/` | `nas.batched_search` (rows, searcher state, top-k weights) | `nas.batched_search` |
| `tune/` | Ray Tune (its own layout) | `trial_checkpoints` (final checkpoints only) |
| `export/` | `nas.export` | `export_dir` |

Result columns spell a latency cost `latency_ms_at_PROFILE` (`result_column`); the cost model
calls it `latency_ms@PROFILE`. trials.csv files written with the `@` spelling still read.

One module on purpose (about 500 lines): the table above is the whole contract between the
stages, and keeping its readers and writers side by side is what keeps them in step.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from evaluators.cost import analytic_cost
from evaluators.optim import TrainConfig
from nas.config import ExperimentConfig, config_from_dict
from nas.objective import LATENCY_PREFIX, Objective
from nas.pareto import write_pareto
from search_spaces.architecture import Architecture
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

CONFIG = "config.yaml"
TRIALS = "trials.csv"
WINNERS = "winners.json"
WINNERS_DIR = "winners"
DISTILL = "distill.json"
PARETO = "pareto.json"
FINISHED_LOG = "finished.jsonl"
INFEASIBLE = "infeasible.jsonl"
TUNE_DIR = "tune"  # Tune's experiment folder inside RUN_DIR (without storage_path)
EXPORT_DIR = "export"
TEACHER_DIR = "teacher"
BASELINES = "baselines.json"  # a winner folder's finished no-KD students, by key
KD_STUDENTS = "kd_students.json"  # a winner folder's finished KD students, by key
STUDENT_STATES = "students"  # a winner folder's unfinished students' training states
VARIABLES = "variables.msgpack"  # a checkpoint folder's weights
ARCHITECTURE = "architecture.json"  # a checkpoint folder's architecture
TRAIN_STATE = "train_state.msgpack"  # an epoch checkpoint's training state
SUGGESTION = "suggestion"  # the searcher's running count, stamped into each trial's config
METRIC = "score"  # the result field a search maximizes
TRIAL_COLUMNS = ["suggestion", "trial_id", "key", "status", "params", "macs", "accuracy", "score", "epochs", "wall_s",
                 "node_id", "error"]
RESULT_LATENCY_PREFIX = "latency_ms_at_"


class SearchInterrupted(NasError):
    """The driver was interrupted (Ctrl-C); the run directory keeps the finished trials and --resume continues."""


# ============================================================ experiment
@dataclass(frozen=True)
class Experiment:
    """What every trial needs, resolved once in the driver and shipped to the workers."""

    cfg: ExperimentConfig
    space: SearchSpace
    objective: Objective
    train: TrainConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def resolve_space(cfg: ExperimentConfig) -> SearchSpace:
    """The experiment's space, with its input overridden by `space_input`."""
    space = load_space(cfg.space)
    if cfg.space_input:
        space = space.with_input(**cfg.space_input)
    return space


def experiment_of(cfg: ExperimentConfig) -> Experiment:
    """The Experiment a validated config describes (space, objective and training resolved)."""
    return Experiment(cfg, resolve_space(cfg), Objective.from_config(cfg.objective, where=f"{cfg.source}: objective"),
                      cfg.train)


def read_saved_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run was started with (RUN_DIR/config.yaml), its output_dir set to where the run is now."""
    run_dir = Path(run_dir).resolve()
    saved = run_dir / CONFIG
    if not saved.exists():
        raise NasError(f"{run_dir}: not a run directory (no {CONFIG})")
    raw = yaml.safe_load(saved.read_text())
    if not isinstance(raw, dict):
        raise NasError(f"{saved}: expected a mapping of config keys")
    raw["output_dir"] = str(run_dir.parent)
    return config_from_dict(raw, source=str(saved))


def experiment_from_run_dir(run_dir: str | Path) -> Experiment:
    """Rebuild the Experiment of a finished run from its saved config."""
    return experiment_of(read_saved_config(run_dir))


def check_run_dir(cfg: ExperimentConfig, *, resume: bool, force: bool) -> Path:
    """Refuse to mix experiments in one directory; `force` starts over, `resume` continues.
    Writes config.yaml; returns the run directory."""
    run_dir = cfg.run_dir
    saved = run_dir / CONFIG
    if saved.exists() and not force:
        # compared as typed configs (defaults filled in, paths absolute), wherever the run directory sits now
        previous = config_from_dict({**yaml.safe_load(saved.read_text()), "output_dir": cfg.output_dir}, str(saved))
        if previous != cfg:
            old, new = previous.to_dict(), cfg.to_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise NasError(f"{run_dir}: holds a different experiment (differs in: {', '.join(diff)}); "
                           f"choose another name/output_dir, or pass --force to overwrite it")
        if not resume:
            raise NasError(f"{run_dir}: already holds this experiment; pass --resume to continue it "
                           f"or --force to start over")
    elif resume and not saved.exists():
        raise NasError(f"{run_dir}: nothing to resume (no {CONFIG}); run without --resume")
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise NasError(f"{run_dir}: not writable")
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def enable_compilation_cache() -> None:
    """Share compiled XLA programs between trials, stages and commands (NAS_JAX_CACHE, default under ~/.cache)."""
    import jax  # heavy: only the processes that compile pay for it

    cache = os.environ.get("NAS_JAX_CACHE", str(Path.home() / ".cache" / "compact-nas" / "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ============================================================ trials.csv
def result_column(cost: str) -> str:
    """The result/CSV column of a cost: `latency_ms@host` -> `latency_ms_at_host`; others unchanged."""
    return RESULT_LATENCY_PREFIX + cost[len(LATENCY_PREFIX):] if cost.startswith(LATENCY_PREFIX) else cost


def result_columns(costs: Mapping[str, float]) -> dict[str, float]:
    """A cost dict with its keys spelled as result columns."""
    return {result_column(k): v for k, v in costs.items()}


def write_trials(run_dir: Path, rows: list[Mapping[str, Any]]) -> Path:
    """RUN_DIR/trials.csv: TRIAL_COLUMNS first, then every other column of the rows (sorted)."""
    extra = sorted({k for r in rows for k in r if k not in TRIAL_COLUMNS and k != "checkpoint"})
    path = Path(run_dir) / TRIALS
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def read_trials(run_dir: str | Path, *, required: bool = True) -> list[dict[str, str]]:
    """The rows of RUN_DIR/trials.csv as strings (columns `latency_ms@P` renamed `latency_ms_at_P`)."""
    path = Path(run_dir) / TRIALS
    if not path.exists():
        if required:
            raise NasError(f"{Path(run_dir)}: no {TRIALS}; run `nas search` first")
        return []
    with path.open(newline="") as f:
        return [{result_column(k): v for k, v in row.items()} for row in csv.DictReader(f)]


# ============================================================ winners.json
@dataclass(frozen=True)
class Winner:
    """One entry of winners.json: a top-k architecture of the search and where its weights are."""

    rank: int
    key: str
    space: str
    trial_id: str
    score: float
    val_accuracy: float
    params: int
    macs: int
    architecture: Architecture
    checkpoint: str | None  # folder relative to RUN_DIR (winners/NN), None for a table-evaluated search

    def folder(self, run_dir: str | Path) -> Path | None:
        """The winner's checkpoint folder (architecture.json, variables.msgpack, distilled.msgpack)."""
        return Path(run_dir) / self.checkpoint if self.checkpoint else None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "key": self.key, "space": self.space, "trial_id": self.trial_id,
                "score": self.score, "val_accuracy": self.val_accuracy, "params": self.params, "macs": self.macs,
                "architecture": self.architecture.to_dict(), "checkpoint": self.checkpoint}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = WINNERS) -> "Winner":
        try:
            arch = Architecture.from_dict(d["architecture"])
            cost = analytic_cost(arch) if "params" not in d or "macs" not in d else None  # hand-written files
            return cls(int(d["rank"]), str(d["key"]), str(d.get("space", arch.space)), str(d.get("trial_id", "")),
                       float(d["score"]), float(d["val_accuracy"]), int(float(d.get("params", cost and cost.params))),
                       int(float(d.get("macs", cost and cost.macs))), arch, d.get("checkpoint"))
        except (KeyError, TypeError, ValueError, NasError) as e:
            raise NasError(f"{where}: malformed winner entry ({type(e).__name__}: {e})".splitlines()[0]) from None


def write_winners(run_dir: Path, winners: Iterable[Winner]) -> Path:
    path = Path(run_dir) / WINNERS
    path.write_text(json.dumps([w.to_dict() for w in winners], indent=2))
    return path


def write_results(exp: Experiment, rows: list[dict[str, Any]]) -> None:
    """trials.csv (every trial), pareto.json, winners.json (top-k by score, with what is needed to rebuild
    them; each winner's checkpoint folder, a row's `checkpoint`, copied to winners/NN/)."""
    run_dir = exp.run_dir
    write_trials(run_dir, rows)
    done = [r for r in rows if r["status"] == "ok"]
    write_pareto([{k: _float(v) for k, v in r.items() if k in ("accuracy", "params", "macs") or k.startswith("latency")}
                  | {"key": r["key"]} for r in done], run_dir)
    table_mode = exp.cfg.evaluator.kind == "table"
    ok = [r for r in rows if r["status"] == "ok" and (r["checkpoint"] or table_mode)]
    ok.sort(key=lambda r: (-float(r[METRIC]), r["key"]))
    winners, seen = [], set()
    for r in ok:
        if r["key"] in seen:
            continue
        seen.add(r["key"])
        rank = len(winners) + 1
        dest = run_dir / WINNERS_DIR / f"{rank:02d}"
        if dest.exists():
            shutil.rmtree(dest)
        if r["checkpoint"]:
            shutil.copytree(r["checkpoint"], dest)
        winners.append(Winner(
            rank=rank, key=r["key"], space=exp.space.name, trial_id=r["trial_id"], score=float(r[METRIC]),
            val_accuracy=float(r["accuracy"]), params=int(float(r["params"])), macs=int(float(r["macs"])),
            architecture=exp.space.decode(r["key"]),
            checkpoint=str(dest.relative_to(run_dir)) if r["checkpoint"] else None))
        if len(winners) == exp.cfg.top_k:
            break
    write_winners(run_dir, winners)


def _float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def read_winners(run_dir: str | Path) -> list[Winner]:
    """The winners of a run; empty when there is no winners.json."""
    path = Path(run_dir) / WINNERS
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise NasError(f"{path}: not JSON ({e})") from None
    return [Winner.from_dict(d, str(path)) for d in doc]


def load_winners(run_dir: str | Path, *, with_weights: bool = True) -> list[Winner]:
    """The winners of a run, refusing a run without any; with `with_weights`, refuse winners without checkpoints."""
    path = Path(run_dir) / WINNERS
    if not path.exists():
        raise NasError(f"{run_dir}: no {WINNERS}; run `nas search` first")
    winners = read_winners(run_dir)
    if not winners:
        raise NasError(f"{path}: no winners (every trial failed or was infeasible)")
    if with_weights and any(w.checkpoint is None for w in winners):
        raise NasError(f"{path}: the winners have no trained weights (a table-evaluated search); "
                       f"nothing to distill or export")
    return winners


def winner_weights(run_dir: str | Path, w: Winner, distill: "DistillReport | None" = None) -> Path:
    """The weights to ship for a winner: the distilled student when distill.json names one, else the search's."""
    row = distill.row(w.rank) if distill else None
    path = Path(run_dir) / (w.checkpoint or "") / ((row.distilled if row else None) or VARIABLES)
    if not w.checkpoint or not path.is_file():
        raise NasError(f"{path}: checkpoint missing; re-run the search (or distillation)")
    return path


# ============================================================ distill.json
@dataclass(frozen=True)
class DistillRow:
    """One winner's distillation result, whatever the schema it was written with.

    `after` is the test accuracy with KD, `baseline` that of the same fine-tuning without a
    teacher (NaN in the first schema, which had no baseline), `gain` = KD - baseline."""

    rank: int
    key: str
    before: float
    after: float
    baseline: float
    gain: float
    distilled: str | None  # the KD student's weights file in the winner's folder
    fields: Mapping[str, Any] = field(default_factory=dict)  # every field as written

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], index: int) -> "DistillRow":
        after = finite_float(d.get("kd_acc", d.get("test_accuracy_after")))
        baseline = finite_float(d.get("baseline_acc"))
        gain = finite_float(d.get("gain", after - baseline))
        return cls(int(d.get("rank", index + 1)), str(d.get("key", "")), finite_float(d.get("test_accuracy_before")),
                   after, baseline, gain, d.get("distilled") or None, dict(d))


@dataclass(frozen=True)
class DistillReport:
    """distill.json: the teacher, seeds and one row per distilled winner; `info` is everything but the rows."""

    rows: tuple[DistillRow, ...]
    info: Mapping[str, Any]

    @property
    def teacher(self) -> Any:
        return self.info.get("teacher")

    @property
    def seeds(self) -> Any:
        return self.info.get("seeds")

    def row(self, rank: int) -> DistillRow | None:
        return next((r for r in self.rows if r.rank == rank), None)


def finite_float(v: Any) -> float:
    """A finite float, or NaN for anything else (None, '', strings, bools)."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def read_distill(run_dir: str | Path) -> DistillReport | None:
    """RUN_DIR/distill.json (both schemas: with `kd_acc`/`baseline_acc`, or `test_accuracy_after`), None without."""
    path = Path(run_dir) / DISTILL
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        rows = tuple(DistillRow.from_dict(r, i) for i, r in enumerate(doc["winners"] or []))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NasError(f"{path}: malformed distillation report ({type(e).__name__}: {e})".splitlines()[0]) from None
    return DistillReport(rows, {k: v for k, v in doc.items() if k != "winners"})


def write_distill(run_dir: Path, doc: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / DISTILL
    path.write_text(json.dumps(doc, indent=2))
    return path


# ============================================================ winners/NN/ students of the distillation
class StudentResults:
    """Finished distillation students' results ({key: plain dict}) in one JSON file of a winner's
    folder (`BASELINES` or `KD_STUDENTS`), rewritten atomically on each `put`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.entries: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError as e:
            raise NasError(f"{self.path}: not JSON ({e}); delete it to re-train those students") from None

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        self.entries[key] = dict(result)
        _atomic_write(self.path, json.dumps(self.entries, indent=2).encode())


class StudentState:
    """The per-epoch training state of one unfinished student (`winners/NN/students/KEY.state`);
    `save` is a `train(checkpoint=...)` callback."""

    def __init__(self, folder: Path, key: str):
        self.path = Path(folder) / STUDENT_STATES / f"{key}.state"

    def load(self) -> bytes | None:
        """The last saved state, or None when the student has not started (or finished)."""
        return self.path.read_bytes() if self.path.exists() else None

    def save(self, epoch: int, blob: bytes) -> None:
        _atomic_write(self.path, blob)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    """`data` to `path` via a synced temporary file and a rename: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ============================================================ finished.jsonl, infeasible.jsonl
def suggestion_id(result: Mapping[str, Any]) -> str:
    """A trial's identity across a killed driver: the searcher's suggestion number and the key."""
    return f"{result.get(SUGGESTION, '')}:{result.get('key', '')}"


FINAL_CHECKPOINT = "_final_checkpoint"  # in a `read_finished` result: where its final checkpoint was written


def append_finished(run_dir: Path, trial_id: str, result: Mapping[str, Any], checkpoint: str | None = None) -> None:
    """Append one finished trial (and the path of its final checkpoint, so a resumed driver can report it
    again without training) to RUN_DIR/finished.jsonl, synced to disk at once."""
    record = {"trial_id": trial_id, "result": dict(result), **({"checkpoint": checkpoint} if checkpoint else {})}
    with (Path(run_dir) / FINISHED_LOG).open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_finished(run_dir: str | Path, printer: Callable[..., None] | None = None) -> dict[str, dict[str, Any]]:
    """Results of the trials a driver saw finish, by trial id and by `suggestion_id`. A line that is not
    a whole record (cut short by a kill while it was written) is skipped with a one-line note to
    `printer`: that trial runs again."""
    path = Path(run_dir) / FINISHED_LOG
    records: dict[str, dict[str, Any]] = {}
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            result = {**rec["result"], **({FINAL_CHECKPOINT: rec["checkpoint"]} if rec.get("checkpoint") else {})}
            records[rec["trial_id"]] = records[suggestion_id(rec["result"])] = result
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            if printer is not None:
                printer(f"{path}: line {i} is not a whole record (cut short when the driver was killed?); "
                        "that trial runs again", flush=True)
    return records


def append_infeasible(run_dir: Path, record: Mapping[str, Any]) -> None:
    with (Path(run_dir) / INFEASIBLE).open("a") as f:
        f.write(json.dumps(dict(record)) + "\n")


class Feasibility:
    """A picklable feasibility check that logs every candidate the cost model rejects (once) to
    infeasible.jsonl, marking whether a searcher proposed it (`proposed`) or a strategy only
    screened it while choosing (e.g. the GP scoring every key of a small space)."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.seen = {(r["key"], r.get("proposed", False)) for r in read_infeasible(exp.run_dir)}

    def __call__(self, arch: Architecture, proposed: bool = False) -> bool:
        if not self.exp.objective.constraints:
            return True
        costs = self.exp.objective.costs(arch)
        violations = self.exp.objective.violations(costs)
        if violations and (arch.key, proposed) not in self.seen:
            self.seen.add((arch.key, proposed))
            append_infeasible(self.exp.run_dir, {"key": arch.key, **result_columns(costs),
                                                 "error": "; ".join(violations), "proposed": proposed})
        return not violations


def read_infeasible(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/infeasible.jsonl (empty when there is none; a cut-short line is skipped)."""
    path = Path(run_dir) / INFEASIBLE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# ============================================================ checkpoints
def read_architecture(path: str | Path) -> Architecture:
    """The architecture in an architecture.json (a checkpoint's `{...}` or an export's `{"architecture": {...}}`)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return Architecture.from_dict(doc.get("architecture", doc))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise NasError(f"{path}: not an architecture file ({type(e).__name__}: {e})".splitlines()[0]) from None


def trial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Final trial checkpoints (architecture.json beside variables.msgpack) under Tune's folder RUN_DIR/tune."""
    tune_dir = Path(run_dir) / TUNE_DIR
    if not tune_dir.is_dir():
        return []
    return [p.parent for p in sorted(tune_dir.rglob(ARCHITECTURE)) if (p.parent / VARIABLES).exists()]


def export_dir(run_dir: str | Path) -> Path:
    """Where `nas export` writes by default."""
    return Path(run_dir) / EXPORT_DIR
