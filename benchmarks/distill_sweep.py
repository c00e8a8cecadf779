"""How the distillation defaults were chosen: recipes x student epochs, on the VALIDATION split only.

The students, teacher and data of benchmarks/distill.py (mnist5k, mobile_small, the teacher cached
in the same folder). A recipe is `outputs:augment:T:alpha`: the teacher's outputs `cached` (logits
stored once on un-augmented rows) or `online` (the teacher inside the step on the student's view),
the augmentation ('crop=2,mixup=1', 'none'), temperature and KL weight (alpha=1: function matching).
For every student, seed and number of epochs, each augmentation's same-budget baseline
(cross-entropy, same views) and every recipe are trained with the same schedule and seed; the table
shows validation accuracy (mean over seeds), the paired gain over the baseline with the same
augmentation and over the un-augmented one. The test split is never evaluated here, so choosing
defaults from this table does not tune on the test split.

    python benchmarks/distill_sweep.py [--seeds 2] [--epochs 8,20] [--students small]
        [--recipes 'cached:none:2:0.5,online:crop=2,mixup=1:1:1']   (';' separates recipes)
        [--teacher-seeds 3]   (the teacher trained 3 times, logits averaged, as in benchmarks/distill.py)
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill import STUDENTS, TEACHER, parse_augment  # noqa: E402

from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.optim import KDConfig, TrainConfig  # noqa: E402
from evaluators.train import train  # noqa: E402
from nas.distill import mean_std  # noqa: E402
from nas.teacher import cached_outputs, resolve_teacher  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402

RECIPES = "cached:none:2:0.5;online:crop=2:1:1;online:crop=2,mixup=1:1:1;online:crop=2,mixup=1:2:0.5"


def parse_recipes(text: str) -> list[tuple[str, str, float, float]]:
    out = []
    for item in text.split(";"):
        outputs, aug, t, a = item.split(":")
        out.append((outputs, aug, float(t), float(a)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", default="8,20", help="comma list of student epochs")
    p.add_argument("--recipes", default=RECIPES, help="';' list of outputs:augment:T:alpha")
    p.add_argument("--students", default="small")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--teacher-seeds", type=int, default=1,
                   help="K > 1: the teacher is the network trained K times (seeds 0..K-1), logits averaged")
    p.add_argument("--learning-rate", type=float, default=0.005)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--out", default="benchmarks/results/distill")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist5k", seed=0)
    space = SPACES.get("mobile_small")
    teacher_cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=64, learning_rate=args.learning_rate)
    spec = {"key": TEACHER, **({"seeds": args.teacher_seeds} if args.teacher_seeds > 1 else {})}
    teacher = resolve_teacher(spec, space, data, teacher_cfg, out / "teacher")
    recipes = parse_recipes(args.recipes)
    logits = cached_outputs(teacher, data, out / "teacher")[0] if any(r[0] == "cached" for r in recipes) else None
    print(f"teacher {teacher.key}: val {teacher.val_accuracy:.4f} | load {os.getloadavg()[0]:.1f}", flush=True)
    augments = sorted({"none"} | {r[1] for r in recipes})
    rows = []
    t0 = time.perf_counter()
    for name in args.students.split(","):
        arch = space.decode(STUDENTS[name])
        for epochs in [int(e) for e in args.epochs.split(",")]:
            val: dict[str, list[float]] = {f"CE {a}": [] for a in augments}
            val |= {f"KD {o} {a} T={t:g} a={al:g}": [] for o, a, t, al in recipes}
            for seed in range(args.seeds):
                cfg = TrainConfig(epochs=epochs, batch_size=64, learning_rate=args.learning_rate, seed=seed,
                                  schedule="warmup_cosine" if args.warmup_epochs else "cosine",
                                  warmup_epochs=args.warmup_epochs)
                for a in augments:
                    r = train(arch, data, cfg, augment=parse_augment(a))
                    val[f"CE {a}"].append(r.val_accuracy)
                    print(f"    CE {a}: val {r.val_accuracy:.4f} ({r.train_s:.0f}s)", flush=True)
                for o, a, t, al in recipes:
                    kd = KDConfig(temperature=t, alpha=al)
                    teach = {"teacher": teacher.members} if o == "online" else {"teacher_logits": logits}
                    r = train(arch, data, cfg, kd=kd, augment=parse_augment(a), **teach)
                    val[f"KD {o} {a} T={t:g} a={al:g}"].append(r.val_accuracy)
                    print(f"    KD {o} {a} T={t:g} a={al:g}: val {r.val_accuracy:.4f} ({r.train_s:.0f}s)", flush=True)
                print(f"  {name} {epochs} ep seed {seed} done [{time.perf_counter() - t0:.0f}s, load "
                      f"{os.getloadavg()[0]:.1f}]", flush=True)
            plain = np.asarray(val["CE none"])
            for arm, v in val.items():
                aug = arm.split()[2] if arm.startswith("KD") else arm.split()[1]
                same = np.asarray(val[f"CE {aug}"])
                gain, gain_plain = np.asarray(v) - same, np.asarray(v) - plain
                rows.append({"student": name, "epochs": epochs, "arm": arm, "val_mean": mean_std(v)[0],
                             "gain_mean": mean_std(list(gain))[0], "gain_std": mean_std(list(gain))[1],
                             "gain_vs_plain": mean_std(list(gain_plain))[0], "won": int((gain > 0).sum()),
                             "per_seed": [float(x) for x in v]})
                print(f"{name:7s} {epochs:2d} ep  {arm:36s} val {rows[-1]['val_mean']:.4f}  gain vs same-aug CE "
                      f"{rows[-1]['gain_mean']:+.4f} ({rows[-1]['won']}/{len(v)})  vs plain CE "
                      f"{rows[-1]['gain_vs_plain']:+.4f}", flush=True)
    (out / "distill_sweep.json").write_text(json.dumps({"settings": vars(args), "teacher_val": teacher.val_accuracy,
                                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
