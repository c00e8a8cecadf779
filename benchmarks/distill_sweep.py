"""How the distillation defaults were chosen: KD settings x student epochs, on the VALIDATION split only.

The students, teacher and data of benchmarks/distill.py (mnist5k, mobile_small, the teacher cached
in the same folder). For every student, seed and number of epochs, a no-KD run and one run per KD
setting (temperature T, weight alpha) are trained with the same schedule and seed; the table shows
validation accuracy (mean over seeds) and the paired gain over no-KD. The test split is never
evaluated here, so choosing defaults from this table does not tune on the test split;
benchmarks/distill.py then reports test accuracy with the chosen settings.

    python benchmarks/distill_sweep.py [--seeds 3] [--epochs 3,8] [--settings 4:0.9,2:0.5,1:0.5]
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

from distill import STUDENTS, TEACHER  # noqa: E402

from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.optim import KDConfig, TrainConfig  # noqa: E402
from evaluators.train import train  # noqa: E402
from nas.distill import mean_std  # noqa: E402
from nas.teacher import cached_outputs, resolve_teacher  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402


def _settings(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        t, a = item.split(":")
        out.append((float(t), float(a)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", default="3,8", help="comma list of student epochs")
    p.add_argument("--settings", default="4:0.9,2:0.5,1:0.5", help="comma list of T:alpha")
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=0.005)
    p.add_argument("--out", default="benchmarks/results/distill")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist5k", seed=0)
    space = SPACES.get("mobile_small")
    teacher_cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=64, learning_rate=args.learning_rate)
    teacher = resolve_teacher({"key": TEACHER}, space, data, teacher_cfg, out / "teacher")
    logits, _, _, _ = cached_outputs(teacher, data, out / "teacher")
    print(f"teacher {teacher.key}: val {teacher.val_accuracy:.4f} | load {os.getloadavg()[0]:.1f}", flush=True)
    settings = _settings(args.settings)
    rows = []
    t0 = time.perf_counter()
    for name in args.students.split(","):
        arch = space.decode(STUDENTS[name])
        for epochs in [int(e) for e in args.epochs.split(",")]:
            val: dict[str, list[float]] = {"no-KD": []} | {f"T={t:g} a={a:g}": [] for t, a in settings}
            for seed in range(args.seeds):
                cfg = TrainConfig(epochs=epochs, batch_size=64, learning_rate=args.learning_rate, seed=seed)
                val["no-KD"].append(train(arch, data, cfg).val_accuracy)
                for t, a in settings:
                    r = train(arch, data, cfg, teacher_logits=logits, kd=KDConfig(temperature=t, alpha=a))
                    val[f"T={t:g} a={a:g}"].append(r.val_accuracy)
            base = np.asarray(val["no-KD"])
            for arm, v in val.items():
                gain = np.asarray(v) - base
                (val_mean, _), (gain_mean, gain_std) = mean_std(v), mean_std(list(gain))
                won = int((gain > 0).sum())
                rows.append({"student": name, "epochs": epochs, "arm": arm, "val_mean": val_mean,
                             "gain_mean": gain_mean, "gain_std": gain_std, "won": won,
                             "per_seed": [float(x) for x in v]})
                print(f"{name:7s} {epochs:2d} ep  {arm:12s} val {val_mean:.4f}  gain {gain_mean:+.4f} "
                      f"({won}/{len(v)})  [{time.perf_counter() - t0:.0f}s, load {os.getloadavg()[0]:.1f}]", flush=True)
    (out / "distill_sweep.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
