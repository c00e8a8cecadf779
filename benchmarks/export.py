"""Export targets on mnist5k winners: ONNX Runtime vs jitted JAX, int8 size / accuracy / latency.

Builds (or takes, `--run-dir`) a run directory of mobile_small winners at 28x28 trained on
mnist5k, exports each through `nas.export.export_run` (flax, onnx, stablehlo, --int8, every
numerical check on), and reports per model from its metrics.json:

  ORT/JAX b1   ONNX Runtime fp32 (one thread) / jitted JAX latency at batch 1 (below 1 = ORT faster)
  size ratio   model.onnx bytes / model.int8.onnx bytes             target >= 3.5
  acc drop     fp32 - int8 test accuracy, points                     target <= 1.0
  int8/fp32    ONNX Runtime latency ratio at batch 1 and 32 (reported, no target)

Without --run-dir the winners are trained here (evaluators.train, `--epochs`, seed 0) into
`--work` (default a temporary folder; pass one to keep the run and its export).

    python benchmarks/export.py                       # 3 default architectures, table + targets
    python benchmarks/export.py --keys 1131001--11d7-1 --epochs 2
    python benchmarks/export.py --run-dir runs/mnist --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

DEFAULT_KEYS = ("1131001--11d7-1", "1142208--1146-1", "100-0114-0100-0")
SIZE_TARGET, DROP_TARGET = 3.5, 1.0


def build_run(work: Path, keys: list[str], epochs: int, printer=print) -> Path:
    """A run directory (config.yaml, winners.json, winners/NN/) of `keys` trained on mnist5k."""
    from evaluators.datasets import load_dataset
    from evaluators.optim import TrainConfig
    from evaluators.predict import evaluate
    from evaluators.train import train
    from evaluators.variables import save_variables
    from nas.config import config_from_dict
    from search_spaces.catalog import load_space

    train_cfg = {"epochs": epochs, "batch_size": 128, "learning_rate": 0.005}
    cfg = config_from_dict({"name": "mnist5k_export", "space": "mobile_small", "dataset": "mnist5k", "seed": 0,
                            "output_dir": str(work), "top_k": len(keys), "num_trials": len(keys),
                            "train": train_cfg, "objective": {"cost": None}}, source="benchmarks/export.py")
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    space, data = load_space("mobile_small"), load_dataset("mnist5k", seed=0)
    winners = []
    for rank, key in enumerate(keys, 1):
        arch = space.decode(key)
        t0 = time.perf_counter()
        res = train(arch, data, TrainConfig.from_dict(train_cfg))
        ck = run / "winners" / f"{rank:02d}"
        save_variables(ck / "variables.msgpack", res.variables)
        (ck / "architecture.json").write_text(arch.to_json())
        test = evaluate(arch, res.variables, data.x_test, data.y_test)[0]
        printer(f"trained {key}: val {res.val_accuracy:.4f}, test {test:.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True)
        winners.append({"rank": rank, "key": key, "space": arch.space, "trial_id": f"bench{rank}",
                        "score": res.val_accuracy, "val_accuracy": res.val_accuracy, "params": 0, "macs": 0,
                        "architecture": arch.to_dict(), "checkpoint": f"winners/{rank:02d}"})
    (run / "winners.json").write_text(json.dumps(winners, indent=2))
    return run


def payload(path: Path) -> dict:
    """Initializer bytes of an ONNX file by role: where the int8 file's bytes go."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = {"weights": 0, "per_channel": 0, "other": 0}
    for t in onnx.load(str(path)).graph.initializer:
        a = numpy_helper.to_array(t)
        role = "weights" if a.ndim >= 2 else ("per_channel" if a.ndim == 1 and a.size > 1 else "other")
        out[role] += int(a.nbytes)
    out["graph"] = path.stat().st_size - sum(out.values())
    return out


def row(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    cost = json.loads((folder / "cost.json").read_text())
    f, lat = m["formats"], m["latency_ms"]
    q = f["int8"]
    return {
        "key": m["key"], "params": cost["params"], "macs": cost["macs"], "test_images": m["test_images"],
        "acc_jax": m["test_accuracy"], "acc_onnx": f["onnx"]["check"]["accuracy"],
        "acc_int8": q["check"]["accuracy"], "acc_drop_points": 100 * q["check"]["accuracy_drop"],
        "onnx_max_abs_diff": f["onnx"]["check"]["max_abs_diff"],
        "stablehlo_max_abs_diff": f["stablehlo"]["check"]["max_abs_diff"],
        "bytes_fp32": f["onnx"]["bytes"], "bytes_int8": q["bytes"], "size_ratio": q["size_ratio_fp32_over_int8"],
        "payload_fp32": payload(folder / "model.onnx"), "payload_int8": payload(folder / "model.int8.onnx"),
        "jax_ms": lat["jax"], "ort_fp32_ms": lat["onnx"], "ort_int8_ms": lat["int8"],
        "ort_over_jax_b1": lat["onnx"]["batch1"] / lat["jax"]["batch1"],
        "int8_over_fp32": q["latency_ratio_int8_over_fp32"],
        "predicted_host_ms": cost["predicted_latency_ms"]["host"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="export the winners of this run instead of training")
    ap.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="mobile_small keys to train (28x28)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the trained run and its export (default: temporary)")
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--calibration-method", default="percentile", choices=("percentile", "minmax", "entropy"))
    ap.add_argument("--latency-budget", type=float, default=1.0, help="seconds per latency figure")
    ap.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = ap.parse_args(argv)

    from evaluators.timing import load_average
    from nas.export import export_run

    load_before = load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(args.work or tmp).resolve()
        run = Path(args.run_dir).resolve() if args.run_dir else build_run(work, args.keys, args.epochs)
        out = work / "export"
        folders = export_run(run, out=out, formats=("flax", "onnx", "stablehlo"), int8=True, force=True,
                             calibration_images=args.calibration_images,
                             calibration_method=args.calibration_method, latency_budget_s=args.latency_budget,
                             int8_max_drop=1.0)  # the drop is a target reported here, not an export failure
        rows = [row(f) for f in folders]
    load_after = load_average()

    print(f"\nexport benchmark: {len(rows)} mobile_small models on mnist5k (28x28), "
          f"{rows[0]['test_images']} test images; "
          f"ONNX Runtime one thread; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
          f"({os.cpu_count()} cores), {time.perf_counter() - t0:.0f} s")
    print(f"{'key':<18}{'params':>8}{'MACs':>10} {'acc jax':>8}{'fp32':>7}{'int8':>7}{'drop':>6} "
          f"{'fp32 B':>8}{'int8 B':>8}{'ratio':>6}  {'jax b1':>7}{'ort b1':>7}{'ort/jax':>8}  "
          f"{'int8 b1':>8}{'i8/fp b1':>9}{'jax b32':>8}{'ort b32':>8}{'int8 b32':>9}{'i8/fp b32':>10}")
    for r in rows:
        print(f"{r['key']:<18}{r['params']:>8,d}{r['macs']:>10,d} {r['acc_jax']:>8.4f}{r['acc_onnx']:>7.4f}"
              f"{r['acc_int8']:>7.4f}{r['acc_drop_points']:>6.2f} {r['bytes_fp32']:>8,d}{r['bytes_int8']:>8,d}"
              f"{r['size_ratio']:>6.2f}  {r['jax_ms']['batch1']:>7.3f}{r['ort_fp32_ms']['batch1']:>7.3f}"
              f"{r['ort_over_jax_b1']:>8.2f}  {r['ort_int8_ms']['batch1']:>8.3f}{r['int8_over_fp32']['batch1']:>9.2f}"
              f"{r['jax_ms']['batch32']:>8.3f}{r['ort_fp32_ms']['batch32']:>8.3f}{r['ort_int8_ms']['batch32']:>9.3f}"
              f"{r['int8_over_fp32']['batch32']:>10.2f}")
    print("where the bytes go (weights = conv/dense kernels; per_channel = BatchNorm vectors in fp32, weight scales "
          "and fp32 biases of the folded BatchNorm in int8; graph = nodes, names, activation scales):")
    for r in rows:
        print(f"  {r['key']:<18} fp32 {r['payload_fp32']}  int8 {r['payload_int8']}")
    size_ok = all(r["size_ratio"] >= SIZE_TARGET for r in rows)
    drop_ok = all(r["acc_drop_points"] <= DROP_TARGET for r in rows)
    med = lambda k, b=None: statistics.median(r[k][b] if b else r[k] for r in rows)  # noqa: E731
    summary = {
        "size_ratio_min": min(r["size_ratio"] for r in rows), "size_target": SIZE_TARGET, "size_ok": size_ok,
        "acc_drop_points_max": max(r["acc_drop_points"] for r in rows), "drop_target": DROP_TARGET, "drop_ok": drop_ok,
        "ort_over_jax_b1_median": med("ort_over_jax_b1"),
        "int8_over_fp32_b1_median": med("int8_over_fp32", "batch1"),
        "int8_over_fp32_b32_median": med("int8_over_fp32", "batch32"),
        "load_average": [load_before, load_after],
    }
    print(f"targets: int8 file >= {SIZE_TARGET}x smaller: {'met' if size_ok else 'NOT met'} "
          f"(min {summary['size_ratio_min']:.2f}x); int8 accuracy drop <= {DROP_TARGET} point: "
          f"{'met' if drop_ok else 'NOT met'} (max {summary['acc_drop_points_max']:.2f})")
    print(f"median ONNX Runtime fp32 / jitted JAX at batch 1: {summary['ort_over_jax_b1_median']:.2f}; "
          f"median int8 / fp32 latency: batch 1 {summary['int8_over_fp32_b1_median']:.2f}, "
          f"batch 32 {summary['int8_over_fp32_b32_median']:.2f}")
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0 if size_ok and drop_ok else 1


if __name__ == "__main__":
    sys.exit(main())
