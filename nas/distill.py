"""Distillation stage: fine-tune each winner with knowledge distillation from a teacher.

Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels),
plugged into the same training step as the search (evaluators.train). Reports each winner's
test accuracy before and after, and writes distill.json in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nas.search import experiment_from_run_dir, load_winners
from nas.teacher import cached_logits, resolve_teacher
from search_spaces.architecture import Architecture


def run_distill(run_dir: str | Path, printer=print) -> dict[str, Any]:
    """Distill every winner of `run_dir`; returns (and writes) the distill.json document."""
    from evaluators.datasets import load_dataset
    from evaluators.train import KDConfig, evaluate, load_variables, save_variables, train

    run_dir = Path(run_dir).resolve()
    exp = experiment_from_run_dir(run_dir)
    cfg, d = exp.cfg, exp.cfg.distill
    winners = load_winners(run_dir)
    data = load_dataset(cfg.dataset.name, seed=cfg.seed, path=cfg.dataset.path,
                        val_fraction=cfg.dataset.val_fraction, test_fraction=cfg.dataset.test_fraction)
    kd = KDConfig(temperature=d.temperature, alpha=d.alpha)
    teacher_train = dataclasses.replace(exp.train, epochs=d.teacher_epochs or exp.train.epochs)
    teacher = resolve_teacher(d.teacher, exp.space, data, teacher_train, run_dir / "teacher", printer)
    printer(f"teacher {teacher.arch.key} ({teacher.source}): test accuracy {teacher.test_accuracy:.4f}", flush=True)
    logits = cached_logits(teacher, data.x_train, run_dir / "teacher" / "logits_train.npz")
    student_cfg = dataclasses.replace(exp.train, epochs=d.epochs, learning_rate=d.learning_rate)
    out = {"teacher": {"key": teacher.arch.key, "source": teacher.source, "test_accuracy": teacher.test_accuracy},
           "temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs, "winners": []}
    for w in winners:
        arch = Architecture.from_dict(w["architecture"])
        folder = run_dir / w["checkpoint"]
        variables = load_variables(folder / "variables.msgpack")
        before = evaluate(arch, variables, data.x_test, data.y_test)[0]
        result = train(arch, data, student_cfg, init_variables=variables, teacher_logits=logits, kd=kd)
        after = evaluate(arch, result.variables, data.x_test, data.y_test)[0]
        save_variables(folder / "distilled.msgpack", result.variables)
        row = {"rank": w["rank"], "key": w["key"], "test_accuracy_before": before, "test_accuracy_after": after,
               "gain": after - before, "val_accuracy_after": result.val_accuracy, "distilled": "distilled.msgpack"}
        out["winners"].append(row)
        printer(f"  winner {w['rank']} {w['key']}: test accuracy {before:.4f} -> {after:.4f} "
                f"({after - before:+.4f})", flush=True)
    (run_dir / "distill.json").write_text(json.dumps(out, indent=2))
    return out
