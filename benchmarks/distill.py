"""Does distillation lift compact students? A consistent, patient teacher vs the same-budget baseline, mnist5k.

Three `mobile_small` students (3-10x fewer parameters than the teacher) are trained from scratch,
per seed, in two arms with the same steps, schedule, seed and augmentation (so the same views):

  baseline  cross-entropy on the augmented (mixed) labels only
  kd        function matching (Beyer et al., CVPR 2022): the teacher runs inside the compiled step on
            exactly the student's augmented view; loss alpha*T^2*KL + (1-alpha)*CE (alpha=1: no labels)

Optional reference arms (`--arms`): `plain` = cross-entropy without any augmentation, `cached` = the
previous recipe (teacher logits cached once on un-augmented rows, T=2, alpha=0.5, no augmentation).

The teacher is a wide network of the space trained once (cached in the output folder). Test accuracy
is reported as mean ± sample std over the seeds; per student `gain` (KD - baseline, points, mean of
the per-seed paired differences), `gain_std`, `seeds_won`, `gap_closed` (the fraction of teacher -
baseline that KD recovers) and `teacher_gap` (teacher - KD, points). The defaults were chosen on the
validation split with benchmarks/distill_sweep.py, before this script looked at the test split.

    python benchmarks/distill.py [--seeds 5] [--epochs 12] [--teacher-seeds 3] [--json] [--out DIR]

Writes DIR/distill_benchmark.json and prints a Markdown table; with --json the last line is one JSON
object {student: {gain, gain_std, seeds_won, gap_closed, teacher_gap, ...}, ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.augment import AugmentConfig  # noqa: E402
from evaluators.cost import analytic_cost  # noqa: E402
from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.optim import KDConfig, TrainConfig  # noqa: E402
from nas.config import DistillConfig  # noqa: E402
from nas.distill import mean_std, train_student  # noqa: E402
from nas.teacher import cached_outputs, resolve_teacher  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402

TEACHER = "11332133-1133-1"  # two mb k3 e6 per stage, 24/40/64 channels, head 256: 104k params, 5.7 M MACs
STUDENTS = {  # small -> larger: 10x, 5.5x and 2.9x fewer parameters than the teacher
    "small": "000-000--000--0",    # ds k3 per stage, 16/24/48 channels, head 128: 10k params
    "medium": "002-002--002--0",   # mb k3 e3 per stage, 16/24/48 channels, head 128: 19k params
    "large": "11112111-1111-1",    # two ds k5 per stage, 24/40/64 channels, head 256: 36k params
}
ARMS = ("baseline", "kd", "plain", "cached")


def parse_augment(text: str) -> AugmentConfig:
    """'crop=2,mixup=1' -> AugmentConfig ('crop' short for crop_padding); 'none' -> no augmentation."""
    if text in ("", "none"):
        return AugmentConfig()
    d: dict = {}
    for item in text.split(","):
        k, v = item.split("=")
        k = "crop_padding" if k == "crop" else k
        d[k] = v in ("1", "true") if k == "flip" else int(v) if k in ("crop_padding", "cutout") else float(v)
    return AugmentConfig.from_dict(d)


def arm_run(arm: str, arch, data, cfg: TrainConfig, teacher, logits, args, augment: AugmentConfig):
    """One student of one arm (see the module docstring)."""
    if arm == "baseline":
        return train_student(arch, data, cfg, augment=augment)
    if arm == "plain":
        return train_student(arch, data, cfg)
    if arm == "cached":
        return train_student(arch, data, cfg, kd=KDConfig(temperature=2.0, alpha=0.5), teacher_logits=logits)
    return train_student(arch, data, cfg, kd=KDConfig(temperature=args.temperature, alpha=args.alpha),
                         teacher=teacher.members, augment=augment)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=DistillConfig().epochs, help="student epochs (every arm; "
                   "default: the distill stage's)")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--teacher-seeds", type=int, default=1,
                   help="K > 1: the teacher is the network trained K times (seeds 0..K-1), logits averaged")
    p.add_argument("--teacher-augment", default="none",
                   help="the reference teacher's training augmentation, e.g. 'crop=2,mixup=1' (default none)")
    p.add_argument("--teacher", default=TEACHER, help="an arch key of mobile_small, or 'largest'")
    p.add_argument("--learning-rate", type=float, default=0.005)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=KDConfig().temperature, help="default: the distill stage's")
    p.add_argument("--alpha", type=float, default=KDConfig().alpha,
                   help="KL weight; 1 = pure function matching (default: the distill stage's)")
    p.add_argument("--augment", default="crop=2,mixup=1", help="e.g. 'crop=2,mixup=1', 'none'")
    p.add_argument("--arms", default="baseline,kd", help="comma list of " + ", ".join(ARMS))
    p.add_argument("--students", default=",".join(STUDENTS), help="comma list of " + ", ".join(STUDENTS))
    p.add_argument("--json", action="store_true", help="print the per-student summary as one JSON line, last")
    p.add_argument("--out", default="benchmarks/results/distill")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if "baseline" not in arms or "kd" not in arms:
        p.error("--arms must include baseline and kd")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    augment = parse_augment(args.augment)

    data = load_dataset("mnist5k", seed=0)
    space = SPACES.get("mobile_small")
    print(data.summary(), "| load", os.getloadavg()[0], flush=True)
    teacher_cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=64, learning_rate=args.learning_rate)
    teacher_augment = None if args.teacher_augment == "none" else parse_augment(args.teacher_augment)
    if teacher_augment is not None:  # a patient teacher: warm-up + cosine like the students, augmented
        teacher_cfg = dataclasses.replace(teacher_cfg, schedule="warmup_cosine", warmup_epochs=1)
    spec = {"key": args.teacher, **({"seeds": args.teacher_seeds} if args.teacher_seeds > 1 else {})}
    teacher = resolve_teacher(spec, space, data, teacher_cfg, out / "teacher", augment=teacher_augment)
    logits = cached_outputs(teacher, data, out / "teacher")[0] if "cached" in arms else None
    t_acc = teacher.test_accuracy
    print(f"teacher {teacher.key}: {teacher.params:,d} params, test {t_acc:.4f}, val {teacher.val_accuracy:.4f} "
          f"({teacher.source}, {args.teacher_epochs} epochs)", flush=True)

    results = []
    for name in args.students.split(","):
        arch = space.decode(STUDENTS[name])
        cost = analytic_cost(arch)
        rows: dict[str, list] = {a: [] for a in arms}
        for i in range(args.seeds):
            cfg = TrainConfig(epochs=args.epochs, batch_size=64, learning_rate=args.learning_rate, seed=i,
                              schedule="warmup_cosine" if args.warmup_epochs else "cosine",
                              warmup_epochs=args.warmup_epochs)
            for arm in arms:
                r = arm_run(arm, arch, data, cfg, teacher, logits, args, augment)
                rows[arm].append({"seed": i, "test": r.test_accuracy, "val": r.val_accuracy, "wall_s": r.wall_s,
                                  "compile_s": r.compile_s})
                print(f"  {name} {arch.key} seed {i} {arm:8s} test {r.test_accuracy:.4f} val {r.val_accuracy:.4f} "
                      f"{r.wall_s:6.1f}s (compile {r.compile_s:.1f}s) load {os.getloadavg()[0]:.1f}", flush=True)
        entry = {"name": name, "key": arch.key, "params": int(cost.params), "macs": int(cost.macs),
                 "size_ratio": teacher.params / cost.params, "arms": {}}
        for arm in arms:
            test = [r["test"] for r in rows[arm]]
            gains = [r["test"] - s["test"] for r, s in zip(rows[arm], rows["baseline"])]
            entry["arms"][arm] = {
                "test_mean": mean_std(test)[0], "test_std": mean_std(test)[1],
                "val_mean": mean_std([r["val"] for r in rows[arm]])[0],
                "gain_mean": mean_std(gains)[0], "gain_std": mean_std(gains)[1],
                "seeds_won": int(sum(g > 0 for g in gains)),
                "train_s_median": float(np.median([r["wall_s"] - r["compile_s"] for r in rows[arm]])),
                "compile_s": float(sum(r["compile_s"] for r in rows[arm])), "per_seed": rows[arm]}
        results.append(entry)

    doc = {"dataset": data.summary(), "teacher": {**teacher.to_dict(), "epochs": args.teacher_epochs},
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "json")},
           "students": results, "summary": summary(results, t_acc), "wall_s": time.perf_counter() - t_all,
           "load_end": os.getloadavg()[0]}
    (out / "distill_benchmark.json").write_text(json.dumps(doc, indent=2))
    print()
    print(table(doc))
    if args.json:
        print(json.dumps(doc["summary"]))
    return 0


def summary(students: list[dict], teacher_acc: float) -> dict[str, dict]:
    """Per student, in points: gain (KD - baseline), gain_std, seeds_won, gap_closed, teacher_gap."""
    out = {}
    for s in students:
        base, kd = s["arms"]["baseline"], s["arms"]["kd"]
        gap = teacher_acc - base["test_mean"]
        out[s["name"]] = {
            "gain": round(100 * kd["gain_mean"], 3), "gain_std": round(100 * kd["gain_std"], 3),
            "seeds_won": kd["seeds_won"], "seeds": len(kd["per_seed"]),
            "gap_closed": round(kd["gain_mean"] / gap, 3) if gap > 0 else None,
            "teacher_gap": round(100 * (teacher_acc - kd["test_mean"]), 3),
            "baseline_gap": round(100 * gap, 3)}
    return out


def table(doc: dict) -> str:
    """A Markdown table of the benchmark document."""
    t, st = doc["teacher"], doc["settings"]
    arms = list(doc["students"][0]["arms"])
    lines = [f"teacher `{t['key']}` ({t['params']:,d} params): test {t['test_accuracy']:.4f}; {st['seeds']} seeds, "
             f"{st['epochs']} epochs per student, augment {st['augment']}, T={st['temperature']:g}, "
             f"alpha={st['alpha']:g}",
             "",
             "| student | params | " + " | ".join(arms) + " | gap closed | train s/student (" + " / ".join(arms) + ") |",
             "|---|---|" + "---|" * len(arms) + "---|---|"]
    for s in doc["students"]:
        a = s["arms"]

        def cell(arm: str) -> str:
            x = a[arm]
            acc = f"{x['test_mean']:.4f} ± {x['test_std']:.4f}"
            return acc if arm == "baseline" else f"{acc} ({100 * x['gain_mean']:+.2f} ± {100 * x['gain_std']:.2f} " \
                                                 f"pt, {x['seeds_won']}/{len(x['per_seed'])})"

        secs = " / ".join(f"{a[arm]['train_s_median']:.1f}" for arm in arms)
        gc = doc["summary"][s["name"]]["gap_closed"]
        lines.append(f"| {s['name']} `{s['key']}` | {s['params']:,d} | " + " | ".join(cell(arm) for arm in arms)
                     + f" | {'n/a' if gc is None else f'{gc:.0%}'} | {secs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
