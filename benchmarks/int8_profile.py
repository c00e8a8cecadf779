"""Where int8 time goes in ONNX Runtime: per-operator figures from its profiler, fp32 vs int8 QDQ.

For one mobile_small network at 28x28 (random weights: kernel choice and speed do not depend on
the values), exports fp32 ONNX (`evaluators.onnx_export.to_onnx`), quantizes it statically
(`evaluators.quantize.quantize_static_int8`, per-channel int8 weights) with uint8 and with int8
activations and with uint8 activations but every squeeze-and-excite path left in float
(`float_se=True`), and runs each with `SessionOptions.enable_profiling` at batch 1 and 32, at graph
optimisation levels 'basic' and 'all'. Reports, per model, the operators ONNX Runtime actually
ran after its graph rewrites (e.g. QLinearConv, or DequantizeLinear -> Conv -> QuantizeLinear
where it could not fuse) with their summed time per inference, so the operators that make int8
slower than fp32 show by name.

    python benchmarks/int8_profile.py --key 1131001--11d7-1 --runs 200
    python benchmarks/int8_profile.py --json
    python benchmarks/int8_profile.py --accuracy 8   # trained on mnist5k first: each model's test accuracy

With `--accuracy EPOCHS` the network is first trained on mnist5k (`evaluators.train.train`, batch 64)
and calibrated on 256 of its training images; each model's test accuracy in ONNX Runtime is then
reported beside its speed, so the cost of each int8 variant in accuracy shows too.

Convolutions are reported apart by kind: `Conv[dw]`/`QLinearConv[dw]` (depthwise, group > 1) and
the rest (pointwise, stem), read from the session's optimized graph; each model's file size too.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def profile(path: str, x: np.ndarray, runs: int, level: str, tmp: str) -> dict:
    """{'per_run_us': total, 'ops': {op_type: us per run}, 'nodes': {op_type: count}} from ORT's profiler."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, f"prof-{Path(path).stem}-{level}-{len(x)}")
    so.optimized_model_filepath = os.path.join(tmp, f"opt-{Path(path).stem}-{level}-{len(x)}.onnx")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    kinds = {n.name: n.op_type + ("[dw]" if any(a.name == "group" and a.i > 1 for a in n.attribute) else "")
             for n in onnx.load(so.optimized_model_filepath).graph.node}
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(10):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    ops: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = kinds.get(e["name"][:-len("_kernel_time")]) or e.get("args", {}).get("op_name", "?")
            ops[op] += e["dur"]
            nodes[op].add(e["name"])
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            total += e["dur"]
    n = runs + 10
    return {"per_run_us": total / n, "ops": {k: v / n for k, v in sorted(ops.items(), key=lambda t: -t[1])},
            "nodes": {k: len(v) for k, v in nodes.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", default="1131001--11d7-1", help="a mobile_small key (28x28)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--accuracy", type=int, default=0, metavar="EPOCHS",
                    help="train on mnist5k for EPOCHS first and report each model's test accuracy (0: random weights)")
    args = ap.parse_args(argv)

    import onnx

    from evaluators.onnx_export import arch_variables, to_onnx
    from evaluators.quantize import quantize_static_int8
    from search_spaces.catalog import load_space

    arch = load_space("mobile_small").decode(args.key)
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(128, 28, 28, 1)).astype(np.float32)
    variables, data = arch_variables(arch), None
    if args.accuracy:
        from evaluators.datasets import load_dataset
        from evaluators.optim import TrainConfig
        from evaluators.train import train

        data = load_dataset("mnist5k", seed=0)
        variables = train(arch, data, TrainConfig(epochs=args.accuracy, batch_size=64)).variables
        calib = np.asarray(data.x_train[rng.choice(len(data.x_train), 256, replace=False)], np.float32)
    out: dict = {"key": args.key, "results": {}, "trained_epochs": args.accuracy}
    with tempfile.TemporaryDirectory(prefix="int8-profile-") as tmp:
        paths = {"fp32": os.path.join(tmp, "fp32.onnx")}
        onnx.save(to_onnx(arch, variables), paths["fp32"])
        for name, act, float_se in (("int8_u8", "uint8", False), ("int8_s8", "int8", False),
                                    ("int8_u8_sefloat", "uint8", True)):
            paths[name] = os.path.join(tmp, f"{name}.onnx")
            quantize_static_int8(paths["fp32"], paths[name], calib, activation_type=act, float_se=float_se)
        out["bytes"] = {name: os.path.getsize(p) for name, p in paths.items()}
        if data is not None:
            from evaluators.onnx_export import ort_session, run

            out["test_accuracy"] = {}
            for name, path in paths.items():
                sess = ort_session(path)
                logits = run(sess, data.x_test, batch=256)
                out["test_accuracy"][name] = float(np.mean(logits.argmax(-1) == data.y_test))
        for batch in (1, 32):
            x = np.ascontiguousarray(calib[:batch])
            for level in ("basic", "all"):
                for name, path in paths.items():
                    r = profile(path, x, args.runs, level, tmp)
                    out["results"][f"{name}/b{batch}/{level}"] = r
    print(f"ONNX Runtime per-operator time per inference (us), one thread, {args.runs} runs, mobile_small "
          f"{args.key} at 28x28 (shared machine: compare within a column group, not across runs)")
    print("file bytes: " + ", ".join(f"{n} {b}" for n, b in out["bytes"].items()))
    if "test_accuracy" in out:
        print(f"test accuracy, mnist5k ({len(data.y_test)} images, trained {args.accuracy} epochs): "
              + ", ".join(f"{n} {a:.4f}" for n, a in out["test_accuracy"].items()))
    for batch in (1, 32):
        for level in ("basic", "all"):
            rows = {n: out["results"][f"{n}/b{batch}/{level}"] for n in out["bytes"]}
            print(f"\nbatch {batch}, graph optimisation '{level}': total "
                  + ", ".join(f"{n} {r['per_run_us']:.1f}" for n, r in rows.items())
                  + f"  (int8_u8 / fp32 = {rows['int8_u8']['per_run_us'] / rows['fp32']['per_run_us']:.2f})")
            ops = sorted({o for r in rows.values() for o in r["ops"]},
                         key=lambda o: -max(r["ops"].get(o, 0) for r in rows.values()))
            for o in ops:
                print(f"  {o:<24}" + "".join(
                    f"{n} {r['ops'].get(o, 0):9.1f} ({r['nodes'].get(o, 0):2d} nodes)  " for n, r in rows.items()))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
