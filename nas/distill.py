"""Distillation stage: fine-tune each winner with knowledge distillation, against a same-budget baseline.

For every winner and every seed, two students are trained with the same schedule, seed, starting
point (the search checkpoint, or a fresh initialisation) and augmentation (`distill.augment`: the
same views, step by step): a **baseline** with cross-entropy only and a **KD** student with

    loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels)
           + beta * ||P(student features) - teacher features||^2    (beta > 0: hint loss, cached outputs only)

plugged into the same compiled training step as the search (`evaluators.train.train`). With
`teacher_outputs: online` (the default) the teacher (see `nas.teacher`; an ensemble's logits are
averaged) runs inside that step, in evaluation mode, on exactly the augmented (mixed) batch the
student sees: function matching (Beyer et al., CVPR 2022; alpha = 1 uses no labels at all). With
`cached`, its logits and features on the un-augmented training rows are computed once per
(teacher, dataset) under `RUN_DIR/teacher/` (for teachers too large to run every step). The budget
is `epochs` (or `steps`) with warm-up + cosine, separate from the search's. Finished students are
kept per key in `RUN_DIR/winners/NN/baselines.json` and `kd_students.json` (baselines are reused
when only the teacher or the KD settings change); an unfinished one saves its training state after
every epoch and a re-run continues it (`nas.rundir.StudentResults`, `StudentState`). Test
accuracies are reported as mean and sample standard deviation over the seeds, with the paired gain
(KD - baseline) per seed; the KD student of the first seed is saved as
`RUN_DIR/winners/NN/distilled.msgpack`; everything goes to `RUN_DIR/distill.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evaluators.cost import analytic_cost
from evaluators.datasets import load
from evaluators.predict import evaluate
from evaluators.train import train
from evaluators.variables import load_variables, save_variables
from nas.config import DistillConfig
from nas.preflight import preflight
from nas.rundir import (BASELINES, KD_STUDENTS, TEACHER_DIR, VARIABLES, StudentResults, StudentState,
                        enable_compilation_cache, experiment_from_run_dir, load_winners, write_distill)
from nas.teacher import cached_outputs, dataset_fingerprint, resolve_teacher, search_candidates
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError


# ============================================================ one student
@dataclass(frozen=True)
class StudentResult:
    """One trained student: test/validation accuracy, wall time (compile included) and its weights."""

    test_accuracy: float
    val_accuracy: float
    wall_s: float
    compile_s: float
    variables: Any = None


def train_student(arch: Architecture, data, cfg: Any, *, init_variables: Any = None, kd: Any = None,
                  teacher_logits: np.ndarray | None = None, teacher_features: np.ndarray | None = None,
                  teacher: Any = None, augment: Any = None, checkpoint: Any = None,
                  resume_from: bytes | None = None) -> StudentResult:
    """Train one student (baseline when `kd` is None) and evaluate it on the test split.

    `teacher` ((arch, variables) members) runs online inside the step, on the `augment`ed view the
    student sees; `teacher_logits`/`teacher_features` are the cached alternative. `checkpoint` and
    `resume_from` are passed to `evaluators.train.train` (per-epoch state, resume after a kill)."""
    t0 = time.perf_counter()
    common = {"init_variables": init_variables, "augment": augment, "checkpoint": checkpoint,
              "resume_from": resume_from}
    if kd is None:
        result = train(arch, data, cfg, **common)
    elif teacher is not None:
        result = train(arch, data, cfg, kd=kd, teacher=teacher, **common)
    else:
        result = train(arch, data, cfg, teacher_logits=teacher_logits, kd=kd, teacher_features=teacher_features,
                       **common)
    acc = evaluate(arch, result.variables, data.x_test, data.y_test)[0]
    return StudentResult(acc, result.val_accuracy, time.perf_counter() - t0, result.compile_s, result.variables)


def standardize_features(features: np.ndarray) -> np.ndarray:
    """Teacher features scaled per dimension to zero mean and unit variance over the training rows,
    so the hint weight beta means the same for any teacher (the projection can learn any scale)."""
    f = np.asarray(features, np.float32)
    return ((f - f.mean(axis=0)) / (f.std(axis=0) + 1e-6)).astype(np.float32)


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# ============================================================ the stage
def run_distill(run_dir: str | Path, *, seeds: int | None = None, printer=print) -> dict[str, Any]:
    """Distill every winner of `run_dir` against a same-budget no-KD baseline; writes and returns distill.json.

    Args:
      run_dir: a finished search's run directory (config.yaml, winners.json, winners/NN/).
      seeds: how many seeds per winner and arm (overrides `distill.seeds`); seed i trains with
        `train.seed + i`, the same for both arms.
      printer: where progress lines go (`print`-compatible).

    Returns:
      The distill.json document: {'teacher': {...}, 'seeds': N, 'winners': [{'rank', 'key',
      'test_accuracy_before', 'teacher_acc', 'baseline_acc', 'baseline_std', 'kd_acc', 'kd_std', 'gain',
      'gain_std', 'distilled', 'per_seed': [...]}, ...], ...}.

    Raises:
      NasError: a bad `distill:` section or `seeds`, a teacher that does not fit the dataset; before training.
    """

    enable_compilation_cache()  # as the search's trials: a re-run (e.g. more seeds) skips XLA compiles
    t_start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    exp = experiment_from_run_dir(run_dir)
    cfg = exp.cfg
    preflight(cfg, ("distill",))
    d: DistillConfig = cfg.distill
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise NasError(f"--seeds: {seeds!r}; allowed an integer >= 1")
        d = dataclasses.replace(d, seeds=seeds)
    winners = load_winners(run_dir)
    data = load(cfg.dataset, seed=cfg.seed, resolution=exp.space.resolutions[0], channels=exp.space.in_channels)
    kd = d.kd()
    augment = d.augment_config()
    student_cfg = d.student_train(exp.train, len(data.y_train))
    seed_list = [student_cfg.seed + i for i in range(d.seeds)]
    teacher_train = dataclasses.replace(exp.train, epochs=d.teacher_epochs or exp.train.epochs)
    teacher = resolve_teacher(d.teacher, exp.space, data, teacher_train, run_dir / TEACHER_DIR, printer,
                              candidates=search_candidates(run_dir), source=f"{cfg.source}: distill.teacher")
    printer(f"teacher {teacher.key} ({teacher.kind}, {teacher.params:,d} params): test accuracy "
            f"{teacher.test_accuracy:.4f}", flush=True)
    online = d.teacher_outputs == "online"
    logits = hints = None
    teacher_doc = teacher.to_dict()
    if online:
        printer("teacher outputs: online (the teacher runs inside each step on the student's view)", flush=True)
    else:
        logits, feats, cache_path, reused = cached_outputs(teacher, data, run_dir / TEACHER_DIR)
        printer(f"teacher outputs {'reused from' if reused else 'cached in'} {cache_path.relative_to(run_dir)}",
                flush=True)
        hints = standardize_features(feats) if d.beta > 0 else None
        teacher_doc["outputs_cache"] = str(cache_path.relative_to(run_dir))
    data_fp = dataset_fingerprint(data)
    steps_per_epoch = len(data.y_train) // student_cfg.batch_size

    out: dict[str, Any] = {
        "teacher": teacher_doc,
        "dataset": data.name, "seeds": d.seeds, "seed_list": seed_list,
        "config": {"temperature": d.temperature, "alpha": d.alpha, "beta": d.beta, "init": d.init,
                   "teacher_outputs": d.teacher_outputs, "augment": augment.to_dict(),
                   "steps": steps_per_epoch * student_cfg.epochs, **student_cfg.to_dict()},
        "std": "sample standard deviation over seeds (ddof=1); gain_std is that of the per-seed paired gains",
        "winners": [],
    }
    for w in winners:
        arch = w.architecture
        folder = w.folder(run_dir)
        search_vars = load_variables(folder / VARIABLES)
        before = _test_accuracy(arch, search_vars, data)
        init = search_vars if d.init == "search" else None
        start = (folder / VARIABLES,) if d.init == "search" else ()
        baselines, kd_students = StudentResults(folder / BASELINES), StudentResults(folder / KD_STUDENTS)
        per_seed, distilled, baseline_reused = [], None, 0
        for seed in seed_list:
            scfg = dataclasses.replace(student_cfg, seed=seed)
            common = {"train": scfg.to_dict(), "init": d.init, "augment": augment.to_dict(), "data": data_fp}
            bkey = student_key({"arm": "baseline", **common}, *start)
            base, reused = _resumable(baselines, bkey, folder, d.resume, scfg.epochs, printer, lambda **kw: train_student(
                arch, data, scfg, init_variables=init, augment=augment, **kw))
            baseline_reused += reused
            kkey = student_key({"arm": "kd", **common, "teacher": teacher.fingerprint(), "outputs": d.teacher_outputs,
                                "kd": {"temperature": d.temperature, "alpha": d.alpha, "beta": d.beta}}, *start)
            first = distilled is None

            def kd_student(**kw):
                s = train_student(arch, data, scfg, init_variables=init, kd=kd, augment=augment,
                                  teacher=teacher.members if online else None, teacher_logits=logits,
                                  teacher_features=hints, **kw)
                if first:  # before the result is kept: a kill in between re-trains, never loses the weights
                    save_variables(folder / "distilled.msgpack", s.variables)
                return s

            student, _ = _resumable(kd_students, kkey, folder, d.resume, scfg.epochs, printer, kd_student)
            if first:
                distilled = student.test_accuracy
            per_seed.append({"seed": seed, "baseline_acc": base.test_accuracy, "kd_acc": student.test_accuracy,
                             "gain": student.test_accuracy - base.test_accuracy,
                             "baseline_val_acc": base.val_accuracy, "kd_val_acc": student.val_accuracy,
                             "baseline_s": base.wall_s, "kd_s": student.wall_s})
            printer(f"  winner {w.rank} {w.key} seed {seed}: baseline {base.test_accuracy:.4f} "
                    f"KD {student.test_accuracy:.4f} ({student.wall_s:.1f}s)", flush=True)
        b_mean, b_std = mean_std([r["baseline_acc"] for r in per_seed])
        k_mean, k_std = mean_std([r["kd_acc"] for r in per_seed])
        g_mean, g_std = mean_std([r["gain"] for r in per_seed])
        row = {"rank": w.rank, "key": w.key, "params": int(analytic_cost(arch).params),
               "test_accuracy_before": before, "teacher_acc": teacher.test_accuracy,
               "baseline_acc": b_mean, "baseline_std": b_std, "kd_acc": k_mean, "kd_std": k_std,
               "gain": g_mean, "gain_std": g_std, "distilled": "distilled.msgpack",
               "test_accuracy_after": distilled, "baselines_reused": baseline_reused, "per_seed": per_seed}
        out["winners"].append(row)
        printer(f"winner {w.rank} {w.key} ({row['params']:,d} params): search {before:.4f} | baseline "
                f"{b_mean:.4f} ± {b_std:.4f} | KD {k_mean:.4f} ± {k_std:.4f} | gain {g_mean:+.4f} ± {g_std:.4f} "
                f"({d.seeds} seed{'s' if d.seeds > 1 else ''})", flush=True)
    out["wall_s"] = time.perf_counter() - t_start
    write_distill(run_dir, out)
    return out


def _test_accuracy(arch: Architecture, variables: Any, data) -> float:
    return evaluate(arch, variables, data.x_test, data.y_test)[0]


def student_key(parts: Mapping[str, Any], *files: Path) -> str:
    """A student's identity: 16 hex digits over everything that decides its weights (`parts`, plain
    data: arm, schedule and seed, starting point, augmentation, teacher and KD settings, dataset)
    and the bytes of `files` (the starting checkpoint)."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def _resumable(cache: StudentResults, key: str, folder: Path, resume: bool, epochs: int, printer,
               train_fn) -> tuple[StudentResult, bool]:
    """A student's result from `cache`, or trained by `train_fn(checkpoint=..., resume_from=...)` (continuing
    after the last epoch saved by a killed run when `resume`) and kept in `cache`. Returns (result, reused)."""
    hit = cache.get(key)
    if hit is not None:
        return StudentResult(**hit), True
    state = StudentState(folder, key)
    blob = state.load() if resume else None
    save = (lambda epoch, b: state.save(epoch, b) if epoch < epochs else None) if resume else None
    try:
        result = train_fn(checkpoint=save, resume_from=blob)
    except NasError as e:
        if blob is None or "resume_from" not in str(e):
            raise
        printer(f"  {state.path.name}: unusable saved state ({e}); training from the start", flush=True)
        result = train_fn(checkpoint=save, resume_from=None)
    if blob is not None:
        printer(f"  resumed {state.path.name} from its last saved epoch", flush=True)
    cache.put(key, {"test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
                    "wall_s": result.wall_s, "compile_s": result.compile_s})
    state.clear()
    return result, False
