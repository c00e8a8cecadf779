"""The checks of an exported format against JAX (logits, accuracy, int8 drop) and its measured latency."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evaluators.lut import cpu_model
from evaluators.timing import measure_passes
from evaluators.onnx_export import ort_session
from nas.export.loading import FILES, RUN_BATCH, LoadedModel
from search_spaces.architecture import Architecture
from search_spaces.model import build_model


def batch_sizes(n: int, format: str) -> list[int]:
    if format == "flax":
        return []  # predict_logits pads to its own fixed batches
    rows = [min(RUN_BATCH, n - i) for i in range(0, n, RUN_BATCH)]
    if format == "stablehlo":  # padded to RUN_BATCH or the next power of two
        rows = [RUN_BATCH if n >= RUN_BATCH else 1 << (n - 1).bit_length()]
    return sorted(set(rows) | {1})


def compare(got: np.ndarray, ref: np.ndarray, y: np.ndarray, tol: float, *, extra: float = 0.0,
             batch_sizes: list[int] | None = None) -> dict[str, Any]:
    """A runtime's logits vs JAX's: max abs difference and the same test accuracy (up to exact ties)."""
    if got.shape != ref.shape:
        return {"passed": False, "reason": f"output shape {got.shape}, expected {ref.shape}"}
    diff = float(max(np.abs(got - ref).max(initial=0.0), extra))
    acc, ref_acc = float(np.mean(got.argmax(-1) == y)), float(np.mean(ref.argmax(-1) == y))
    differ = np.flatnonzero(got.argmax(-1) != ref.argmax(-1))
    top2 = np.sort(ref[differ], axis=-1)[:, -2:] if len(differ) else np.zeros((0, 2))
    ties = bool(np.all(top2[:, 1] - top2[:, 0] <= 2 * tol))  # within tolerance an argmax can only flip on a tie
    finite = bool(np.all(np.isfinite(got)))
    passed = finite and diff <= tol and (acc == ref_acc or ties)
    reason = ""
    if not finite:
        reason = "non-finite logits"
    elif diff > tol:
        reason = f"max |logit difference| {diff:.3g} > tolerance {tol:g}"
    elif not passed:
        reason = f"test accuracy {acc:.4f} != JAX's {ref_acc:.4f}"
    out = {"passed": passed, "max_abs_diff": diff, "tolerance": tol, "images": int(len(y)), "accuracy": acc,
           "jax_accuracy": ref_acc, "predictions_differing": int(len(differ))}
    if batch_sizes:
        out["batch_sizes"] = batch_sizes
    if reason:
        out["reason"] = reason
    return out


def check_int8(model: LoadedModel, x: np.ndarray, y: np.ndarray, fp32_logits: np.ndarray,
                max_drop: float) -> dict[str, Any]:
    got = model(x)
    one = model(x[:1])
    acc, fp32_acc = float(np.mean(got.argmax(-1) == y)), float(np.mean(fp32_logits.argmax(-1) == y))
    drop = fp32_acc - acc
    finite = bool(np.all(np.isfinite(got))) and bool(np.all(np.isfinite(one)))
    passed = finite and got.shape == fp32_logits.shape and drop <= max_drop + 1e-12
    out = {"passed": passed, "images": int(len(y)), "accuracy": acc, "fp32_accuracy": fp32_acc,
           "accuracy_drop": drop, "max_drop": max_drop,
           "agreement_with_fp32": float(np.mean(got.argmax(-1) == fp32_logits.argmax(-1))),
           "max_abs_diff_vs_fp32": float(np.abs(got - fp32_logits).max()) if got.shape == fp32_logits.shape else None,
           "batch_sizes": batch_sizes(len(x), "int8")}
    if not passed:
        out["reason"] = ("non-finite logits" if not finite else
                         f"int8 test accuracy {acc:.4f} is {100 * drop:.2f} points below fp32's {fp32_acc:.4f} "
                         f"(allowed {100 * max_drop:.2f})")
    return out


# ------------------------------------------------------------ writers (module level: tests patch them)


def measure_latencies(stage: Path, arch: Architecture, variables: Any, x: np.ndarray,
                       fmt: Mapping[str, Any], budget: float) -> dict[str, dict[str, float]]:
    """Ms at batch 1 and 32: jitted JAX (fast implementation) and ONNX Runtime (one thread).

    Each figure is the minimum of ten short medians, the windows of all figures interleaved over
    the whole measurement (`evaluators.timing.measure_passes`): bursts of host load then slow
    no figure, and the ratios between formats compare like with like.
    """
    if budget <= 0:
        return {}
    import jax
    import jax.numpy as jnp


    batches = {"batch1": x[:1], "batch32": np.resize(x, (32, *x.shape[1:])).astype(np.float32)}
    net = build_model(arch, "fast")
    v = jax.tree.map(jnp.asarray, {k: variables[k] for k in ("params", "batch_stats") if k in variables})
    f = jax.jit(lambda a: net.apply(v, a, train=False))
    which, makers = [], []
    for b, xb in batches.items():
        xd = jax.device_put(xb)
        which.append(("jax", b))
        makers.append(lambda xd=xd: lambda: f(xd).block_until_ready())
    for format in ("onnx", "int8"):
        if fmt.get(format, {}).get("file"):
            sess = ort_session(str(stage / FILES[format]), threads=1)
            name = sess.get_inputs()[0].name
            for b, xb in batches.items():
                feed = {name: np.ascontiguousarray(xb)}
                which.append((format, b))
                makers.append(lambda sess=sess, feed=feed: lambda: sess.run(None, feed))
    out: dict[str, dict[str, float]] = {}
    for (format, b), ms in zip(which, measure_passes(makers, 1, budget)):
        out.setdefault(format, {})[b] = ms
    return out


def machine() -> dict[str, Any]:
    """What a latency figure depends on: CPU, cores, load, library versions."""
    import jax
    import onnxruntime


    cpu = cpu_model()
    try:
        load_avg = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_avg = None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load_avg, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_threads": 1, "jax": jax.__version__, "python": platform.python_version()}
