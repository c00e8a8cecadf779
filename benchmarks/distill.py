"""Does distillation lift compact students? Scratch vs KD vs KD + feature hints on mnist5k.

Three `mobile_small` architectures of different sizes (28x28 inputs) are each trained from
scratch with the same schedule and seeds in three arms:

  scratch   cross-entropy only (the same-budget baseline)
  kd        Hinton KD from the teacher's logits (temperature T, weight alpha, the T^2 factor)
  kd+feat   KD plus a hint loss (weight beta) between the student's penultimate features, through a
            learned 1x1 projection, and the teacher's (standardised) penultimate features

The teacher is a wide network of the space (`--teacher largest` for the largest one; ~3x the
training cost), trained once and cached in the output folder
(its logits/features on the training rows too). Test accuracy is reported as mean ± sample std
over the seeds, the gain over scratch as mean ± std of the per-seed paired differences; every
hyperparameter was fixed before looking at any result, and the validation accuracies are
written too, for diagnosis without touching the test split.

    python benchmarks/distill.py [--seeds 5] [--epochs 8] [--teacher-epochs 6] [--out DIR]

The defaults (8 epochs, T=2, alpha=0.5) were chosen with benchmarks/distill_sweep.py, on the
validation split only.

Writes DIR/distill_benchmark.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.cost import analytic_cost  # noqa: E402
from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.optim import KDConfig, TrainConfig  # noqa: E402
from nas.distill import mean_std, standardize_features, train_student  # noqa: E402
from nas.teacher import cached_outputs, resolve_teacher  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402

TEACHER = "11332133-1133-1"  # two mb k3 e6 per stage, 24/40/64 channels, head 256: 104k params, 5.7 M MACs
STUDENTS = {  # small -> larger; all at least 3x smaller than the teacher
    "small": "000-000--000--0",    # ds k3 per stage, 16/24/48 channels, head 128: 10k params
    "medium": "002-002--002--0",   # mb k3 e3 per stage, 16/24/48 channels, head 128: 19k params
    "large": "11112111-1111-1",    # two ds k5 per stage, 24/40/64 channels, head 256: 36k params
}
ARMS = ("scratch", "kd", "kd+feat")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8, help="student epochs (every arm)")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--teacher", default=TEACHER, help="an arch key of mobile_small, or 'largest'")
    p.add_argument("--learning-rate", type=float, default=0.005)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--students", default=",".join(STUDENTS), help="comma list of " + ", ".join(STUDENTS))
    p.add_argument("--out", default="benchmarks/results/distill")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    data = load_dataset("mnist5k", seed=0)
    space = SPACES.get("mobile_small")
    print(data.summary(), "| load", os.getloadavg()[0], flush=True)
    teacher_cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=64, learning_rate=args.learning_rate)
    teacher = resolve_teacher({"key": args.teacher}, space, data, teacher_cfg, out / "teacher")
    logits, feats, _, reused = cached_outputs(teacher, data, out / "teacher")
    hints = standardize_features(feats)
    train_acc = float((logits.argmax(1) == data.y_train).mean())
    print(f"teacher {teacher.key}: {teacher.params:,d} params, test {teacher.test_accuracy:.4f}, "
          f"val {teacher.val_accuracy:.4f}, train {train_acc:.4f} ({teacher.source}; outputs "
          f"{'reused' if reused else 'computed'})", flush=True)

    kd = KDConfig(temperature=args.temperature, alpha=args.alpha)
    kd_feat = KDConfig(temperature=args.temperature, alpha=args.alpha, beta=args.beta)
    results = []
    for name in args.students.split(","):
        arch = space.decode(STUDENTS[name])
        cost = analytic_cost(arch)
        rows: dict[str, list] = {a: [] for a in ARMS}
        for i in range(args.seeds):
            cfg = TrainConfig(epochs=args.epochs, batch_size=64, learning_rate=args.learning_rate, seed=i)
            for arm in ARMS:
                r = train_student(arch, data, cfg, kd=None if arm == "scratch" else kd if arm == "kd" else kd_feat,
                                  teacher_logits=None if arm == "scratch" else logits,
                                  teacher_features=hints if arm == "kd+feat" else None)
                rows[arm].append({"seed": i, "test": r.test_accuracy, "val": r.val_accuracy, "wall_s": r.wall_s,
                                  "compile_s": r.compile_s})
                print(f"  {name} {arch.key} seed {i} {arm:8s} test {r.test_accuracy:.4f} val {r.val_accuracy:.4f} "
                      f"{r.wall_s:6.1f}s (compile {r.compile_s:.1f}s) load {os.getloadavg()[0]:.1f}", flush=True)
        entry = {"name": name, "key": arch.key, "params": int(cost.params), "macs": int(cost.macs), "arms": {}}
        for arm in ARMS:
            test = [r["test"] for r in rows[arm]]
            gains = [r["test"] - s["test"] for r, s in zip(rows[arm], rows["scratch"])]
            entry["arms"][arm] = {
                "test_mean": mean_std(test)[0], "test_std": mean_std(test)[1],
                "val_mean": mean_std([r["val"] for r in rows[arm]])[0],
                "gain_mean": mean_std(gains)[0], "gain_std": mean_std(gains)[1],
                "seeds_won": int(sum(g > 0 for g in gains)),
                "train_s_median": float(np.median([r["wall_s"] - r["compile_s"] for r in rows[arm]])),
                "compile_s": float(sum(r["compile_s"] for r in rows[arm])), "per_seed": rows[arm]}
        results.append(entry)

    doc = {"dataset": data.summary(), "teacher": {**teacher.to_dict(), "train_accuracy": train_acc,
                                                  "epochs": args.teacher_epochs},
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "students": results, "wall_s": time.perf_counter() - t_all, "load_end": os.getloadavg()[0]}
    (out / "distill_benchmark.json").write_text(json.dumps(doc, indent=2))
    print()
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    """A Markdown table of the benchmark document."""
    t = doc["teacher"]
    lines = [f"teacher `{t['key']}` ({t['params']:,d} params): test {t['test_accuracy']:.4f}; "
             f"{doc['settings']['seeds']} seeds, {doc['settings']['epochs']} epochs per student",
             "",
             "| student | params | MACs | scratch | KD (gain) | KD+feat (gain) | train s/student (scratch / KD / KD+feat) |",
             "|---|---|---|---|---|---|---|"]
    for s in doc["students"]:
        a = s["arms"]

        def cell(arm: str) -> str:
            x = a[arm]
            acc = f"{x['test_mean']:.4f} ± {x['test_std']:.4f}"
            return acc if arm == "scratch" else f"{acc} ({x['gain_mean']:+.4f} ± {x['gain_std']:.4f}, " \
                                                f"{x['seeds_won']}/{len(x['per_seed'])})"

        secs = " / ".join(f"{a[arm]['train_s_median']:.1f}" for arm in ARMS)
        lines.append(f"| {s['name']} `{s['key']}` | {s['params']:,d} | {s['macs'] / 1e6:.2f} M | {cell('scratch')} | "
                     f"{cell('kd')} | {cell('kd+feat')} | {secs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
