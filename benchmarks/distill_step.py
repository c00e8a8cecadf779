"""What the teacher inside the step costs: epoch time and compiled memory, online vs cached vs baseline.

For each student of benchmarks/distill.py and its teacher (mnist5k, batch 64, the same augmentation
in every arm), three epoch programs are compiled and run in alternating rounds (one epoch each):

  baseline  cross-entropy only
  cached    KD against teacher logits stored once per training row (gathered like the labels)
  online    KD with the teacher's forward (evaluation mode) inside the compiled step, on the view

Time per step is an epoch's wall time (one validation pass included, the same in every arm) over its
steps: min / median / max over the rounds, and the ratio to the baseline of the same round. Memory is
XLA's own account of the compiled epoch program (`memory_analysis()`: temporaries, arguments,
outputs), which does not depend on the machine's load.

    python benchmarks/distill_step.py [--rounds 3] [--students small,large] [--json]   (--rounds 0: memory only)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill import STUDENTS, TEACHER, parse_augment  # noqa: E402

from evaluators.augment import AugmentConfig  # noqa: E402
from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.optim import KDConfig, TrainConfig  # noqa: E402
from evaluators.predict import EVAL_BATCH  # noqa: E402
from evaluators.programs import compiled_programs  # noqa: E402
from evaluators.teaching import TeacherForward  # noqa: E402
from evaluators.train import _val_plan, train  # noqa: E402
from nas.teacher import cached_outputs, resolve_teacher  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402

ARMS = ("baseline", "cached", "online")


def memory(arch, cfg: TrainConfig, data, augment: AugmentConfig, arm: str, teacher) -> dict[str, int]:
    """XLA's memory account of the arm's compiled epoch program (the one `train` compiled)."""
    n = len(data.y_train)
    online = TeacherForward(tuple(a for a, _ in teacher.members), cfg.conv_impl) if arm == "online" else None
    progs = compiled_programs(arch, dataclasses.replace(cfg, seed=0), n // cfg.batch_size, n,
                              _val_plan(len(data.y_val), EVAL_BATCH), None if arm == "baseline" else data.num_classes,
                              (), None, augment, None, online)
    m = progs.epoch.memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--students", default="small,large")
    p.add_argument("--augment", default="crop=2,mixup=1")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default="benchmarks/results/distill")
    args = p.parse_args(argv)
    data = load_dataset("mnist5k", seed=0)
    space = SPACES.get("mobile_small")
    teacher = resolve_teacher({"key": TEACHER}, space, data,
                              TrainConfig(epochs=args.teacher_epochs, batch_size=64, learning_rate=0.005),
                              Path(args.out) / "teacher")
    logits = cached_outputs(teacher, data, Path(args.out) / "teacher")[0]
    augment = parse_augment(args.augment)
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.005)
    steps = len(data.y_train) // cfg.batch_size
    kd = KDConfig(temperature=1.0, alpha=1.0)
    print(f"teacher {teacher.key} ({teacher.params:,d} params); {steps} steps/epoch; augment {args.augment}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    out = {}
    for name in args.students.split(","):
        arch = space.decode(STUDENTS[name])
        run = {"baseline": lambda: train(arch, data, cfg, augment=augment),
               "cached": lambda: train(arch, data, cfg, augment=augment, kd=kd, teacher_logits=logits),
               "online": lambda: train(arch, data, cfg, augment=augment, kd=kd, teacher=teacher.members)}
        times: dict[str, list[float]] = {a: [] for a in ARMS}
        for arm in ARMS:  # compile once, outside the timed rounds
            run[arm]()
        for r in range(args.rounds):
            for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
                res = run[arm]()
                times[arm].append(res.history[0]["epoch_s"] / steps * 1e3)
            print(f"  {name} round {r}: " + ", ".join(f"{a} {times[a][-1]:.1f} ms/step" for a in ARMS)
                  + f" | load {os.getloadavg()[0]:.1f}", flush=True)
        mem = {a: memory(arch, cfg, data, augment, a, teacher) for a in ARMS}
        entry = {"key": arch.key}
        for arm in ARMS:
            if not times[arm]:  # --rounds 0: memory only
                entry[arm] = mem[arm]
                print(f"{name} {arm:8s} temp {mem[arm]['temp_bytes'] / 2**20:.1f} MiB, args "
                      f"{mem[arm]['argument_bytes'] / 2**20:.1f} MiB", flush=True)
                continue
            ratio = [t / b for t, b in zip(times[arm], times["baseline"])]
            entry[arm] = {"ms_per_step": [min(times[arm]), float(np.median(times[arm])), max(times[arm])],
                          "ratio_to_baseline": [min(ratio), float(np.median(ratio)), max(ratio)], **mem[arm]}
            print(f"{name} {arm:8s} step ms min/med/max {min(times[arm]):.1f}/{np.median(times[arm]):.1f}/"
                  f"{max(times[arm]):.1f}  x baseline {min(ratio):.2f}/{np.median(ratio):.2f}/{max(ratio):.2f}  "
                  f"temp {mem[arm]['temp_bytes'] / 2**20:.1f} MiB, args {mem[arm]['argument_bytes'] / 2**20:.1f} MiB",
                  flush=True)
        out[name] = entry
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
