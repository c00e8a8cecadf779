"""Pruning against uniform width over several seeds: is the pruned network better than the same-MACs
network of uniformly narrower width trained from scratch with the same budget?

One run of benchmarks/compress.py answers that with one test image or two either way (750 images, one
is 0.13 points), and runs of the same command moved the answer by up to a point. This one repeats the
comparison per seed and reports the paired differences. For each mobile_small key (default: the
export benchmark's three) and each seed, in one process:

  1. the *winner*: the key trained from scratch for `--epochs` (batch 128, rate 0.005, that seed);
  2. *pruned*: the winner pruned to `--prune` (`--criterion`, `--steps` AGP steps) and fine-tuned
     `--finetune` epochs with KD from the winner's logits, the rate rewound to the winner's
     (`nas.compress.compress_one` with the stage's defaults);
  3. *uniform*: every width scaled by one factor to the same budget (`evaluators.prune.uniform_architecture`),
     trained from scratch for `--epochs` + `--finetune` epochs with the same seed and KD teacher.

Figures per key: test accuracy of each arm (mean ± std over seeds), `vs_uniform_pt` = pruned − uniform
per seed (mean ± std, seeds won), `drop_pt` = winner − pruned per seed; the MACs of both arms.

    python benchmarks/prune_uniform.py --seeds 3 --json
    python benchmarks/prune_uniform.py --keys 100-0114-0100-0 --seeds 2 --epochs 2 --finetune 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_KEYS = ("1131001--11d7-1", "1142208--1146-1", "100-0114-0100-0")  # as benchmarks/export.py


def prune_arms(arch, data, base, prune: dict, printer=None) -> dict:
    """The three arms for `arch`: the *winner* trained per `base`, the winner pruned per `prune` (keys of
    the `compress:` section; `epochs` = fine-tuning epochs) with KD from the winner's logits, and the
    uniform-width network at the same budget trained `base.epochs + prune['epochs']` epochs with that
    teacher. Returns each arm's network, variables and test accuracy, with the teacher (benchmarks/compress.py
    goes on from them). `printer` gets one line once the winner is trained."""
    from evaluators.optim import KDConfig
    from evaluators.predict import evaluate, predict_logits
    from evaluators.prune import uniform_architecture
    from evaluators.train import train
    from nas.compress import compress_one
    from nas.config import CompressConfig

    t0 = time.perf_counter()
    res = train(arch, data, base)
    acc0 = evaluate(arch, res.variables, data.x_test, data.y_test)[0]
    if printer:
        printer(f"{arch.key}: winner trained, test {acc0:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    teacher = predict_logits(arch, res.variables, data.x_train)
    kd = KDConfig()
    c = CompressConfig.from_dict(prune)
    small, sv, _ = compress_one(arch, res.variables, data, c, base, kd=kd, teacher_logits=teacher,
                                printer=lambda *a, **k: None)
    target = c.target()
    uni = uniform_architecture(arch, target.cost_fn(), target.absolute(arch), c.divisor)
    ures = train(uni, data, dataclasses.replace(base, epochs=base.epochs + c.epochs), teacher_logits=teacher, kd=kd)
    return {"variables": res.variables, "acc0": acc0, "teacher": teacher, "kd": kd,
            "pruned": small, "pruned_variables": sv, "acc_pruned": evaluate(small, sv, data.x_test, data.y_test)[0],
            "uniform": uni, "acc_uniform": evaluate(uni, ures.variables, data.x_test, data.y_test)[0]}


def one_seed(key: str, seed: int, args, data) -> dict:
    """Winner, pruned and uniform arms of `key` for one seed: their test accuracies and MACs."""
    from evaluators.cost import analytic_cost
    from evaluators.optim import TrainConfig
    from search_spaces.catalog import load_space

    arch = load_space("mobile_small").decode(key)
    base = TrainConfig.from_dict({"epochs": args.epochs, "batch_size": 128, "learning_rate": 0.005, "seed": seed})
    t0 = time.perf_counter()
    a = prune_arms(arch, data, base, {"prune": args.prune, "criterion": args.criterion, "steps": args.steps,
                                      "epochs": args.finetune})
    acc0, acc_p, acc_u, small, uni = a["acc0"], a["acc_pruned"], a["acc_uniform"], a["pruned"], a["uniform"]
    return {"key": key, "seed": seed, "acc0": acc0, "acc_pruned": acc_p, "acc_uniform": acc_u,
            "pruned_key": small.key, "uniform": [l.out_channels for l in uni.layers],
            "macs": analytic_cost(arch).macs, "macs_pruned": analytic_cost(small).macs,
            "macs_uniform": analytic_cost(uni).macs, "vs_uniform_pt": 100 * (acc_p - acc_u),
            "drop_pt": 100 * (acc0 - acc_p), "wall_s": time.perf_counter() - t0}


def summarize(rows: list[dict]) -> dict:
    """Per key: mean ± std of each arm and of the paired differences, and seeds won by pruning."""
    def ms(v):
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    out = {}
    for key in dict.fromkeys(r["key"] for r in rows):
        rs = [r for r in rows if r["key"] == key]
        s = {"seeds": len(rs)}
        for f in ("acc0", "acc_pruned", "acc_uniform", "vs_uniform_pt", "drop_pt"):
            s[f], s[f + "_std"] = ms([r[f] for r in rs])
        s["seeds_won"] = sum(r["vs_uniform_pt"] > 0 for r in rs)
        s["seeds_tied"] = sum(r["vs_uniform_pt"] == 0 for r in rs)
        s["macs_pruned_over_uniform"] = statistics.mean(r["macs_pruned"] / r["macs_uniform"] for r in rs)
        out[key] = s
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="mobile_small keys (28x28)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each trains all three arms)")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of the winner")
    ap.add_argument("--finetune", type=int, default=10, help="fine-tuning epochs after pruning (KD from the winner)")
    ap.add_argument("--prune", default="macs=0.5")
    ap.add_argument("--criterion", default="l1", choices=("l1", "bn", "taylor"))
    ap.add_argument("--steps", type=int, default=1, help="AGP steps (1: one-shot)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)

    from evaluators.datasets import load_dataset
    from evaluators.timing import load_average

    load_before, t0 = load_average(), time.perf_counter()
    data = load_dataset("mnist5k", seed=0)
    rows = []
    for key in args.keys:
        for seed in range(args.seeds):  # each row as it is measured: a later failure loses none of them
            rows.append(one_seed(key, seed, args, data))
            r = rows[-1]
            print(f"{key} seed {seed}: winner {r['acc0']:.4f}, pruned {r['acc_pruned']:.4f} ({r['macs_pruned']:,d} MACs),"
                  f" uniform {r['acc_uniform']:.4f} ({r['macs_uniform']:,d} MACs): pruned - uniform "
                  f"{r['vs_uniform_pt']:+.2f} pt ({r['wall_s']:.0f} s)", flush=True)
            if args.json:
                print("row " + json.dumps(r), flush=True)
    summary = summarize(rows)
    load_after = load_average()
    print(f"\nprune vs uniform: {len(args.keys)} mobile_small models on mnist5k, {len(data.y_test)} test images, "
          f"seeds 0-{args.seeds - 1}, prune {args.prune} ({args.criterion}, {args.steps} step(s), {args.finetune} KD "
          f"epochs) against uniform width trained {args.epochs + args.finetune} epochs; load average "
          f"{load_before[0]:.2f} -> {load_after[0]:.2f}, {time.perf_counter() - t0:.0f} s")
    for key, s in summary.items():
        print(f"  {key}: winner {s['acc0']:.4f}, pruned {s['acc_pruned']:.4f} ± {s['acc_pruned_std']:.4f}, uniform "
              f"{s['acc_uniform']:.4f} ± {s['acc_uniform_std']:.4f}; pruned - uniform {s['vs_uniform_pt']:+.2f} ± "
              f"{s['vs_uniform_pt_std']:.2f} pt (won {s['seeds_won']}/{s['seeds']}, tied {s['seeds_tied']}); winner - "
              f"pruned {s['drop_pt']:+.2f} ± {s['drop_pt_std']:.2f} pt; MACs pruned/uniform "
              f"{s['macs_pruned_over_uniform']:.3f}")
    if args.json:
        print(json.dumps({"keys": summary, "rows": rows, "load_average": [load_before, load_after],
                          "options": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
