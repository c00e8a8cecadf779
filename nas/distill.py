"""Distillation stage: fine-tune each winner with knowledge distillation, against a same-budget baseline.

For every winner and every seed, two students are trained with the same schedule, seed and
starting point (the search checkpoint, or a fresh initialisation): a **baseline** with plain
cross-entropy and a **KD** student with

    loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels)
           + beta * ||P(student features) - teacher features||^2    (beta > 0: hint loss, learned 1x1 projection P)

plugged into the same compiled training step as the search (`evaluators.train.train`). The
teacher (see `nas.teacher`) is built once; its logits and features on the training rows are
cached once per (teacher, dataset) under `RUN_DIR/teacher/`. Baselines are cached per
(winner weights, schedule, seed, dataset) in `RUN_DIR/winners/NN/baselines.json` and reused when
only the teacher or the KD settings change. Test accuracies are reported as mean and sample
standard deviation over the seeds, with the paired gain (KD - baseline) per seed; the KD student
of the first seed is saved as `RUN_DIR/winners/NN/distilled.msgpack`; everything goes to
`RUN_DIR/distill.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.cost import analytic_cost
from evaluators.datasets import load_dataset
from evaluators.predict import evaluate
from evaluators.train import train
from evaluators.variables import load_variables, save_variables
from nas.config import DistillConfig
from nas.preflight import preflight
from nas.rundir import (TEACHER_DIR, VARIABLES, enable_compilation_cache, experiment_from_run_dir, load_winners,
                        write_distill)
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
                  teacher_logits: np.ndarray | None = None,
                  teacher_features: np.ndarray | None = None) -> StudentResult:
    """Train one student (baseline when `kd` is None) and evaluate it on the test split."""

    t0 = time.perf_counter()
    if kd is None:
        result = train(arch, data, cfg, init_variables=init_variables)
    else:
        result = train(arch, data, cfg, init_variables=init_variables, teacher_logits=teacher_logits, kd=kd,
                       teacher_features=teacher_features)
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
    data = load_dataset(cfg.dataset.name, seed=cfg.seed, path=cfg.dataset.path,
                        val_fraction=cfg.dataset.val_fraction, test_fraction=cfg.dataset.test_fraction)
    kd = d.kd()
    student_cfg = d.student_train(exp.train)
    seed_list = [student_cfg.seed + i for i in range(d.seeds)]
    teacher_train = dataclasses.replace(exp.train, epochs=d.teacher_epochs or exp.train.epochs)
    teacher = resolve_teacher(d.teacher, exp.space, data, teacher_train, run_dir / TEACHER_DIR, printer,
                              candidates=search_candidates(run_dir), source=f"{cfg.source}: distill.teacher")
    printer(f"teacher {teacher.key} ({teacher.kind}, {teacher.params:,d} params): test accuracy "
            f"{teacher.test_accuracy:.4f}", flush=True)
    logits, feats, cache_path, reused = cached_outputs(teacher, data, run_dir / TEACHER_DIR)
    printer(f"teacher outputs {'reused from' if reused else 'cached in'} {cache_path.relative_to(run_dir)}",
            flush=True)
    hints = standardize_features(feats) if d.beta > 0 else None
    data_fp = dataset_fingerprint(data)

    out: dict[str, Any] = {
        "teacher": {**teacher.to_dict(), "outputs_cache": str(cache_path.relative_to(run_dir))},
        "dataset": data.name, "seeds": d.seeds, "seed_list": seed_list,
        "config": {"temperature": d.temperature, "alpha": d.alpha, "beta": d.beta, "init": d.init,
                   **student_cfg.to_dict()},
        "std": "sample standard deviation over seeds (ddof=1); gain_std is that of the per-seed paired gains",
        "winners": [],
    }
    for w in winners:
        arch = w.architecture
        folder = w.folder(run_dir)
        search_vars = load_variables(folder / VARIABLES)
        before = _test_accuracy(arch, search_vars, data)
        init = search_vars if d.init == "search" else None
        cache_file = folder / "baselines.json"
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        per_seed, distilled, baseline_reused = [], None, 0
        for seed in seed_list:
            scfg = dataclasses.replace(student_cfg, seed=seed)
            bkey = _baseline_key(scfg, d.init, folder / VARIABLES, data_fp)
            if bkey in cache:
                base = StudentResult(**cache[bkey])
                baseline_reused += 1
            else:
                base = train_student(arch, data, scfg, init_variables=init)
                cache[bkey] = {"test_accuracy": base.test_accuracy, "val_accuracy": base.val_accuracy,
                               "wall_s": base.wall_s, "compile_s": base.compile_s}
                cache_file.write_text(json.dumps(cache, indent=2))
            student = train_student(arch, data, scfg, init_variables=init, kd=kd, teacher_logits=logits,
                                    teacher_features=hints)
            if distilled is None:
                save_variables(folder / "distilled.msgpack", student.variables)
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


def _baseline_key(cfg: Any, init: str, checkpoint: Path, data_fp: str) -> str:
    """Identifies a baseline student: schedule and seed, starting point, dataset."""
    h = hashlib.sha1(json.dumps({"train": cfg.to_dict(), "init": init}, sort_keys=True).encode())
    if init == "search":
        h.update(checkpoint.read_bytes())
    h.update(data_fp.encode())
    return h.hexdigest()[:16]
