"""Compression targets on mnist5k: pruning to half the MACs, int8 on ONNX Runtime, prune + int8 chained.

For each mobile_small key (default: the export benchmark's three, 28x28) in one process:

  1. train the network from scratch (`--epochs`, seed 0): the *winner*, test accuracy acc0;
  2. prune it to `--prune` (default macs=0.5, `--criterion`, `--steps` AGP steps) and fine-tune
     `--finetune` epochs with KD from the winner (`nas.compress.compress_one`): acc_p;
  3. the *uniform* baseline: every width scaled by one factor to the same MACs budget
     (`evaluators.prune.uniform_architecture`), trained from scratch with the same budget
     (epochs + finetune epochs, same KD teacher): acc_u;
  4. int8: static post-training QDQ (`evaluators.quantize.quantize_static_int8`, percentile) of the
     winner (PTQ; full-range weights, and reduced-range ones for `ptq_reduced_drop_pt`), and
     quantization-aware training (`evaluators.qat`, `--qat-epochs` with KD from the winner, weights in
     `--int8-weight-range`, exported QDQ over the activation ranges QAT trained with) of the winner
     and of the pruned network;
  5. low-rank factorization of the winner (`nas.compress.lowrank_one`, `--lowrank`, default
     energy=0.9) fine-tuned `--lowrank-epochs` with KD from the winner, twice: keeping only the
     layers whose one-layer ONNX Runtime model is faster factorized at batch 1 and 32 (the stage's
     default, `lowrank_keep: latency`; per-layer figures in the row's `lowrank_layers`), and keeping
     every layer that gets cheaper (`lowrank_keep: cost`, the `lowrank_cost_*` figures);
  6. ONNX Runtime latency (one thread) of winner fp32 / pruned fp32 / winner int8 / pruned int8 /
     both factorized networks at batch 1 and 32, every figure interleaved with the others
     (`evaluators.timing.measure_passes`).

Figures (each a ratio or difference measured in this one run; medians over keys in the summary):

  prune_speedup_b32   winner fp32 ms / pruned fp32 ms at batch 32          target >= 1.6
  prune_drop_pt       acc0 - acc_p, points                                 target <= 1
  prune_vs_uniform_pt acc_p - acc_u, points                                target > 0
  int8_speedup_b1/b32 winner fp32 ms / winner int8 ms                      target >= 1 (b1), > 1 (b32)
  qat_drop_pt         winner fp32 - QAT int8 test accuracy (ORT), points   target <= 0.3 (ptq_drop_pt: PTQ's)
  chain_ratio         winner fp32 ONNX bytes / chain's QAT int8 ONNX bytes target >= 8
  chain_drop_pt       acc0 - chain's QAT int8 accuracy (ORT), points       target <= 1.5
  lowrank_ratio       winner fp32 ONNX bytes / factorized fp32 ONNX bytes  (no target; also lowrank_cost_ratio)
  lowrank_speedup_b1/b32  winner fp32 ms / factorized fp32 ms              (no target; also lowrank_cost_speedup_*)
  lowrank_drop_pt     acc0 - factorized test accuracy, points              (no target; also lowrank_cost_drop_pt)

The chain (prune, then QAT) prunes to `--chain-prune` (default: the `--prune` network of step 2);
another target prunes the winner again for it, fine-tuned the same way. A network the stage cannot
prune that far (each channel group keeps `min_keep` of its width) is pruned to its floor, and its
row says so (`chain_prune`). With --json each key's row is printed as it is measured ("row {...}").

The machine may be shared: the load average before/after is printed; only ratios are reported.

    python benchmarks/compress.py --json
    python benchmarks/compress.py --keys 1131001--11d7-1 --epochs 2 --finetune 2
    python benchmarks/compress.py --keys 1131001--11d7-1 --lowrank params=0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

DEFAULT_KEYS = ("1131001--11d7-1", "1142208--1146-1", "100-0114-0100-0")  # as benchmarks/export.py
TARGETS = {"prune_speedup_b32": 1.6, "prune_drop_pt": 1.0, "prune_vs_uniform_pt": 0.0, "qat_drop_pt": 0.3,
           "int8_speedup_b1": 1.0,
           "int8_speedup_b32": 1.0, "chain_ratio": 8.0, "chain_drop_pt": 1.5}
LOWRANK = tuple(f"{n}_{f}" for n in ("lowrank", "lowrank_cost") for f in ("ratio", "speedup_b1", "speedup_b32", "drop_pt"))


def ort_accuracy(model, x, y) -> float:
    from evaluators.onnx_export import ort_session, run

    sess = ort_session(model)
    logits = run(sess, x, batch=256)
    return float((logits.argmax(-1) == y).mean())


def one_key(key: str, args, data, printer=print) -> dict:
    import onnx

    from evaluators.cost import analytic_cost
    from evaluators.onnx_export import to_onnx
    from evaluators.prune import floor_architecture
    from evaluators.quantize import quantize_static_int8
    from evaluators.optim import TrainConfig
    from evaluators.predict import evaluate
    from nas.compress import compress_one, lowrank_one, measure_onnx_latency
    from nas.config import CompressConfig
    from search_spaces.catalog import load_space
    from prune_uniform import prune_arms

    arch = load_space("mobile_small").decode(key)
    base = TrainConfig.from_dict({"epochs": args.epochs, "batch_size": 128, "learning_rate": 0.005})
    t0 = time.perf_counter()
    prune = {"prune": args.prune, "criterion": args.criterion, "steps": args.steps, "cost_aware": args.cost_aware,
             "divisor": args.divisor, "epochs": args.finetune, "learning_rate": args.finetune_lr}
    arms = prune_arms(arch, data, base, prune, printer)  # winner, pruned, uniform width (benchmarks/prune_uniform.py)
    res_variables, acc0, teacher, kd = arms["variables"], arms["acc0"], arms["teacher"], arms["kd"]
    small, sv, acc_p = arms["pruned"], arms["pruned_variables"], arms["acc_pruned"]
    uni, acc_u = arms["uniform"], arms["acc_uniform"]
    chain, cv, chain_prune = small, sv, args.prune
    if args.chain_prune not in (None, args.prune):
        cc = CompressConfig.from_dict({**prune, "prune": args.chain_prune})
        t = cc.target()
        cost = t.cost_fn()
        floor = cost(floor_architecture(arch, cc.min_keep, cc.divisor)) / cost(arch)
        chain_prune = args.chain_prune
        if t.kind != "latency_ms" and t.value < floor:  # as far as the stage prunes this network (min_keep, divisor)
            chain_prune = f"{t.kind}={math.ceil(floor * 1000) / 1000:g}"
            cc = CompressConfig.from_dict({**prune, "prune": chain_prune})
        chain, cv, _ = compress_one(arch, res_variables, data, cc, base, kd=kd, teacher_logits=teacher,
                                    printer=lambda *a, **k: None)
        printer(f"{key}: chain pruned to {chain_prune}" + (f" ({args.chain_prune} is below this network's floor)"
                                                           if chain_prune != args.chain_prune else "") +
                f": {chain.key}, {analytic_cost(chain).params:,d} of {analytic_cost(arch).params:,d} params "
                f"(fp32 test {evaluate(chain, cv, data.x_test, data.y_test)[0]:.4f})", flush=True)
    printer(f"{key}: pruned {small.key} test {acc_p:.4f}; uniform {analytic_cost(uni).macs:,d} MACs test "
            f"{acc_u:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    from evaluators.qat import export_variables, qat_train, range_hints
    from evaluators.quantize import resolve_weight_range

    wr = resolve_weight_range(args.int8_weight_range)
    calib = data.x_train[np.random.default_rng(0).choice(len(data.x_train), 256, replace=False)]
    models = {"fp32": to_onnx(arch, res_variables), "pruned": to_onnx(small, sv)}
    models["chain"] = models["pruned"] if chain is small else to_onnx(chain, cv)
    hints = {}
    for name, (a, v) in {"qat": (arch, res_variables), "chain_qat": (chain, cv)}.items():
        folded, ranges, _ = qat_train(a, v, data, epochs=args.qat_epochs, teacher_logits=teacher, weight_range=wr)
        models[name] = to_onnx(a, export_variables(a, folded, weight_range=wr))
        hints[name] = range_hints(a, folded, ranges, calib[:64], weight_range=wr)
    printer(f"{key}: QAT done ({time.perf_counter() - t0:.0f} s)", flush=True)
    from evaluators.lowrank import LowRankTarget, factorize
    from evaluators.prune import recalibrate_bn

    scan = []  # the default energy threshold's evidence: what each threshold keeps, before fine-tuning
    for e in (0.7, 0.8, 0.9, 0.95, 0.99):
        fa, fv, frec = factorize(arch, res_variables, LowRankTarget("energy", e), args.divisor)
        fv = recalibrate_bn(fa, fv, data.x_train) if fa.factorized else fv
        scan.append({"energy": e, "convs": sum(r["rank"] is not None for r in frec), "of": len(frec),
                     "params_kept": analytic_cost(fa).params / analytic_cost(arch).params,
                     "drop_pt_before_finetune": 100 * (acc0 - evaluate(fa, fv, data.x_test, data.y_test)[0])})
    printer(f"{key}: energy scan " + "; ".join(f"{r['energy']:g}: {r['convs']}/{r['of']} convs, params "
                                                 f"{r['params_kept']:.2f}, drop {r['drop_pt_before_finetune']:.2f}"
                                                 for r in scan), flush=True)
    lowrank = {}
    for keep in ("latency", "cost"):
        lc = CompressConfig.from_dict({"lowrank": args.lowrank, "lowrank_epochs": args.lowrank_epochs, "divisor": args.divisor,
                                       "lowrank_keep": keep, "learning_rate": args.finetune_lr,
                                       "latency_budget_s": args.layer_budget})
        la, lv, lrec = lowrank_one(arch, res_variables, data, lc, base, kd=kd, teacher_logits=teacher,
                                   printer=lambda *a, **k: None)
        name = "lowrank" if keep == "latency" else "lowrank_cost"
        lowrank[name] = {"key": la.key, "acc": evaluate(la, lv, data.x_test, data.y_test)[0], "record": lrec}
        models[name] = to_onnx(la, lv)
    printer(f"{key}: lowrank {args.lowrank} done: {lowrank['lowrank']['key']} (latency-gated), "
            f"{lowrank['lowrank_cost']['key']} (cost only) ({time.perf_counter() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        # PTQ in both weight ranges (the export's default is full); QAT in the one it trained with
        for name, method, w in (("fp32", "percentile", "full"), ("fp32", "percentile", "reduced"),
                                ("chain", "percentile", "full"), ("qat", "minmax", wr), ("chain_qat", "minmax", wr)):
            out = f"{name}_int8" + ("_reduced" if name == "fp32" and w == "reduced" else "")
            src, dst = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{out}.onnx"
            onnx.save(models[name], str(src))
            quantize_static_int8(src, dst, calib, method=method, range_hints=hints.get(name), weight_range=w)
            models[out] = onnx.load(str(dst))
        for name in ("qat", "chain_qat"):
            models.pop(name)  # the fp32 form of a QAT network is not shipped
    sizes = {k: len(m.SerializeToString()) for k, m in models.items()}
    accs = {k: ort_accuracy(m, data.x_test, data.y_test) for k, m in models.items()}
    lat = measure_onnx_latency({k: models[k] for k in ("fp32", "pruned", "fp32_int8", "chain_qat_int8", "lowrank",
                                                       "lowrank_cost")}, data.x_test, args.latency_budget)
    lr_figures = {}
    for name in ("lowrank", "lowrank_cost"):
        lr_figures.update({
            f"{name}_ratio": sizes["fp32"] / sizes[name],
            f"{name}_speedup_b1": lat["fp32"]["batch1"] / lat[name]["batch1"],
            f"{name}_speedup_b32": lat["fp32"]["batch32"] / lat[name]["batch32"],
            f"{name}_drop_pt": 100 * (acc0 - lowrank[name]["acc"])})
    row = {
        "key": key, "pruned_key": small.key, "uniform": [l.out_channels for l in uni.layers],
        "macs": analytic_cost(arch).macs, "macs_pruned": analytic_cost(small).macs, "macs_uniform": analytic_cost(uni).macs,
        "chain_prune": chain_prune, "chain_key": chain.key,
        "chain_params_kept": analytic_cost(chain).params / analytic_cost(arch).params,
        "acc0": acc0, "acc_pruned": acc_p, "acc_uniform": acc_u, "acc_ort": accs, "bytes": sizes, "latency_ms": lat,
        "prune_speedup_b1": lat["fp32"]["batch1"] / lat["pruned"]["batch1"],
        "prune_speedup_b32": lat["fp32"]["batch32"] / lat["pruned"]["batch32"],
        "prune_drop_pt": 100 * (acc0 - acc_p), "prune_vs_uniform_pt": 100 * (acc_p - acc_u),
        "ptq_drop_pt": 100 * (accs["fp32"] - accs["fp32_int8"]), "qat_drop_pt": 100 * (accs["fp32"] - accs["qat_int8"]),
        "ptq_reduced_drop_pt": 100 * (accs["fp32"] - accs["fp32_int8_reduced"]), "weight_range": wr,
        "int8_speedup_b1": lat["fp32"]["batch1"] / lat["fp32_int8"]["batch1"],
        "int8_speedup_b32": lat["fp32"]["batch32"] / lat["fp32_int8"]["batch32"],
        "int8_size_ratio": sizes["fp32"] / sizes["fp32_int8"],
        "qat_size_ratio": sizes["fp32"] / sizes["qat_int8"],
        "chain_ratio": sizes["fp32"] / sizes["chain_qat_int8"], "chain_drop_pt": 100 * (acc0 - accs["chain_qat_int8"]),
        "chain_ptq_drop_pt": 100 * (acc0 - accs["chain_int8"]),
        "chain_speedup_b32": lat["fp32"]["batch32"] / lat["chain_qat_int8"]["batch32"],
        **lr_figures, "lowrank_keys": {k: v["key"] for k, v in lowrank.items()},
        "lowrank_layers": lowrank["lowrank"]["record"].get("measured_layers", []),
        "lowrank_ranks": {k: v["record"]["layers"] for k, v in lowrank.items()}, "lowrank_energy_scan": scan,
        "wall_s": time.perf_counter() - t0,
    }
    printer(f"{key}: " + ", ".join(f"{k} {row[k]:.2f}" for k in (
        "prune_speedup_b1", "prune_speedup_b32", "prune_drop_pt", "prune_vs_uniform_pt", "ptq_drop_pt",
        "ptq_reduced_drop_pt", "qat_drop_pt",
        "int8_speedup_b1", "int8_speedup_b32", "chain_ratio", "chain_drop_pt", *LOWRANK)), flush=True)
    for m in row["lowrank_layers"]:
        printer(f"    lowrank layer {m['layer']}: factorized/whole one-layer speedup b1 {m['speedup']['batch1']:.2f} "
                f"b32 {m['speedup']['batch32']:.2f} -> {'kept' if m['kept'] else 'left whole'}", flush=True)
    return row


def main(argv=None) -> int:
    from evaluators.quantize import WEIGHT_RANGE_CHOICES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="mobile_small keys (28x28)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of the winner")
    ap.add_argument("--prune", default="macs=0.5")
    ap.add_argument("--chain-prune", default=None,
                    help="the chain's pruning target, e.g. params=0.4 (default: --prune's network)")
    ap.add_argument("--criterion", default="l1", choices=("l1", "bn", "taylor"))
    ap.add_argument("--divisor", type=int, default=16, help="kept widths are multiples of this")
    ap.add_argument("--cost-aware", action="store_true", help="rank channels per unit of MACs (see evaluators.prune)")
    ap.add_argument("--steps", type=int, default=1, help="AGP steps (1: one-shot)")
    ap.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs (KD from the winner)")
    ap.add_argument("--finetune-lr", type=float, default=None,
                    help="fine-tuning peak rate (default: the winner's training rate, 0.005: the stage's default)")
    ap.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tuning epochs (KD from the winner)")
    ap.add_argument("--int8-weight-range", default="auto", choices=WEIGHT_RANGE_CHOICES,
                    help="QAT's int8 weight range (auto: what this machine's CPU needs; evaluators.quantize)")
    ap.add_argument("--lowrank", default="energy=0.9", help="low-rank target: energy=F, params=F or macs=F")
    ap.add_argument("--lowrank-epochs", type=int, default=2, help="fine-tuning epochs after factorizing (KD)")
    ap.add_argument("--layer-budget", type=float, default=0.2,
                    help="seconds per one-layer latency figure of the lowrank latency gate")
    ap.add_argument("--latency-budget", type=float, default=1.0, help="seconds per latency figure")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)

    from evaluators.datasets import load_dataset
    from evaluators.timing import load_average

    load_before, t0 = load_average(), time.perf_counter()
    data = load_dataset("mnist5k", seed=0)
    rows = []
    for k in args.keys:  # each row as it is measured: a later key's failure loses none of them
        rows.append(one_key(k, args, data))
        if args.json:
            print("row " + json.dumps(rows[-1]), flush=True)
    load_after = load_average()
    med = {k: statistics.median(r[k] for r in rows) for k in TARGETS}
    print(f"\ncompress benchmark: {len(rows)} mobile_small models on mnist5k (28x28), {len(data.y_test)} test images,"
          f" prune {args.prune} (chain {args.chain_prune or args.prune}; {args.criterion}, {args.steps} step(s), "
          f"{args.finetune} KD epochs); ONNX Runtime one thread; load average {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f} ({os.cpu_count()} cores, shared machine), {time.perf_counter() - t0:.0f} s")
    for k, t in TARGETS.items():
        better = (med[k] <= t) if k.endswith("drop_pt") else (med[k] > t if k == "prune_vs_uniform_pt" else med[k] >= t)
        print(f"  {k:<20} median {med[k]:7.2f}  (per key: {', '.join(f'{r[k]:.2f}' for r in rows)})  target "
              f"{'<=' if k.endswith('drop_pt') else '>' if k == 'prune_vs_uniform_pt' else '>='} {t}: "
              f"{'met' if better else 'NOT met'}")
    print(f"  post-training int8 drop (ptq_drop_pt) median {statistics.median(r['ptq_drop_pt'] for r in rows):.2f}, "
          f"with reduced-range weights {statistics.median(r['ptq_reduced_drop_pt'] for r in rows):.2f}; QAT weights "
          f"{rows[0]['weight_range']}; "
          f"chain with PTQ instead of QAT: drop median {statistics.median(r['chain_ptq_drop_pt'] for r in rows):.2f}")
    lr_med = {k: statistics.median(r[k] for r in rows) for k in LOWRANK}
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in lr_med.items()) + f"  (lowrank {args.lowrank}; median over keys)")
    if args.json:
        out = {**med, **lr_med, "ptq_drop_pt": statistics.median(r["ptq_drop_pt"] for r in rows),
               "ptq_reduced_drop_pt": statistics.median(r["ptq_reduced_drop_pt"] for r in rows),
               "prune_speedup_b1": statistics.median(r["prune_speedup_b1"] for r in rows),
               "int8_size_ratio": statistics.median(r["int8_size_ratio"] for r in rows),
               "rows": rows, "load_average": [load_before, load_after], "options": vars(args)}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
