"""Distillation stage: fine-tune each winner with knowledge distillation from a teacher.

Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels),
plugged into the same training step as the search (evaluators.train). Reports each winner's
test accuracy before and after, and writes distill.json in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from nas.search import experiment_from_run_dir, load_winners
from nas.teacher import cached_logits, resolve_teacher
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError


@dataclass(frozen=True)
class DistillConfig:
    """The `distill:` section of an experiment config."""

    enabled: bool = True
    teacher: Mapping[str, Any] = field(default_factory=lambda: {"key": "largest"})
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 3
    learning_rate: float = 1e-3
    teacher_epochs: int | None = None  # None: the search's train.epochs

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "distill") -> "DistillConfig":
        d = dict(d or {})
        allowed = {f.name for f in fields(cls)}
        for k in d:
            if k not in allowed:
                raise NasError(f"{source}.{k}: unknown key; allowed: {', '.join(sorted(allowed))}")
        cfg = cls(**d)
        if not isinstance(cfg.enabled, bool):
            raise NasError(f"{source}.enabled: expected true or false, got {cfg.enabled!r}")
        if not isinstance(cfg.teacher, Mapping):
            raise NasError(f"{source}.teacher: expected a mapping like {{key: largest}} or {{checkpoint: PATH}}")
        for k in ("temperature", "alpha", "learning_rate"):
            v = getattr(cfg, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise NasError(f"{source}.{k}: expected a number, got {v!r}")
        if cfg.temperature <= 0:
            raise NasError(f"{source}.temperature: must be > 0, got {cfg.temperature}")
        if not 0 <= cfg.alpha <= 1:
            raise NasError(f"{source}.alpha: must be in [0, 1], got {cfg.alpha}")
        if cfg.learning_rate <= 0:
            raise NasError(f"{source}.learning_rate: must be > 0, got {cfg.learning_rate}")
        for k in ("epochs", "teacher_epochs"):
            v = getattr(cfg, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise NasError(f"{source}.{k}: must be an integer >= 1, got {v!r}")
        return cfg


def run_distill(run_dir: str | Path, printer=print) -> dict[str, Any]:
    """Distill every winner of `run_dir`; returns (and writes) the distill.json document."""
    from evaluators.datasets import load_dataset
    from evaluators.train import KDConfig, evaluate, load_variables, save_variables, train

    run_dir = Path(run_dir).resolve()
    exp = experiment_from_run_dir(run_dir)
    cfg, d = exp.cfg, DistillConfig.from_dict(exp.cfg.distill, f"{exp.cfg.source}: distill")
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
