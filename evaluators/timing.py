"""Timing on this machine: median wall time of a callable, passes spread in time, and the
batch-1 callables of a layer, a whole network and a trivial model in each runtime.

Runtimes run single-threaded (ONNX Runtime `intra_op_num_threads=1`): deployment targets serve
one stream per core, and on a shared machine multi-threaded timings depend on other load.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evaluators.onnx_export import function_to_onnx, ort_session, random_variables, to_onnx
from evaluators.quantize import quantize_model_int8
from evaluators.signatures import LayerSig, LayerUnit
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import build_model, input_shape

RUNTIMES = ("onnxruntime", "jax")
REBUILD_EACH_PASS = ("onnxruntime",)  # runtimes timed with a fresh callable every pass (see measure_passes)
ROUNDS = 10  # short timing windows per item per pass, spread over the pass (see measure_passes)


def median_ms(fn: Callable[[], Any], *, budget_s: float = 0.15, min_reps: int = 25, max_reps: int = 3000,
              warmup: int = 10) -> float:
    """Median wall time of `fn()` in ms after `warmup` calls; runs at least `min_reps` times and
    keeps going until `budget_s` is spent (more repetitions for fast ops)."""
    for _ in range(warmup):
        fn()
    ts: list[int] = []
    end = time.perf_counter() + budget_s
    while len(ts) < min_reps or (len(ts) < max_reps and time.perf_counter() < end):
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return float(np.median(ts)) / 1e6


def check_runtime(runtime: str) -> str:
    """`runtime` itself when it is one of `RUNTIMES`; else NasError naming the allowed ones."""
    if runtime not in RUNTIMES:
        raise NasError(f"unknown runtime '{runtime}'; allowed: {', '.join(RUNTIMES)}")
    return runtime


def _ort_callable(model: Any, shape: Sequence[int]) -> Callable[[], Any]:
    sess = ort_session(model, threads=1)
    x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def _jax_callable(apply: Callable, variables: Any, shape: Sequence[int]) -> Callable[[], Any]:
    """Jit with the variables closed over (frozen weights, like an exported model's initializers):
    passing them as arguments costs per-array dispatch time that a whole network pays once."""
    v = jax.tree.map(jnp.asarray, variables)
    f = jax.jit(lambda x: apply(v, x))
    x = jax.device_put(np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32))
    return lambda: f(x).block_until_ready()


PRECISIONS = ("fp32", "int8")  # what the runtimes are timed at (int8: ONNX Runtime QDQ only)
INT8_CALIBRATION_ROWS = 4  # random inputs setting the activation ranges of a model quantized only to be timed


def check_precision(precision: str, runtime: str) -> str:
    """`precision` itself when `runtime` can be timed at it; else NasError naming what is allowed."""
    if precision not in PRECISIONS:
        raise NasError(f"unknown precision '{precision}'; allowed: {', '.join(PRECISIONS)}")
    if precision == "int8" and check_runtime(runtime) != "onnxruntime":
        raise NasError(f"precision 'int8' is timed in ONNX Runtime (QDQ models); runtime '{runtime}' allowed only "
                       f"with fp32")
    return precision


def _int8(model: Any, shape: Sequence[int]) -> Any:
    """`model` statically quantized as the export ships int8 (QDQ, per-channel weights, uint8
    activations), calibrated on a few random inputs: the ranges change the values, not the speed."""
    x = np.random.default_rng(1).standard_normal((INT8_CALIBRATION_ROWS, *shape[1:])).astype(np.float32)
    return quantize_model_int8(model, x, batch=shape[0] if isinstance(shape[0], int) else 1)


def unit_callable(sig: LayerSig, runtime: str, precision: str = "fp32") -> Callable[[], Any]:
    """A zero-argument callable that runs the one-layer model of `sig` once at batch 1.

    ONNX Runtime: exported from the reference (lax.conv) implementation with NCHW input and output
    (except the stem's input and the head's output), so its layout transposes cancel inside as
    they do between the layers of an exported network; at int8 that model quantized (QDQ) as the
    export quantizes whole networks. JAX: the 'fast' implementation, jitted (fp32 only).
    """
    check_precision(precision, runtime)
    if runtime == "onnxruntime":
        unit = LayerUnit(sig, "reference")
        variables = random_variables(unit, sig.in_shape())
        nchw_in, nchw_out = sig.part != "stem", sig.part != "head"
        model = function_to_onnx(lambda x: unit.apply(variables, x), sig.in_shape(), batch=1, nchw_in=nchw_in,
                                 nchw_out=nchw_out, name="unit")
        r, c = sig.resolution, sig.in_channels
        shape = (1, c, r, r) if nchw_in else (1, r, r, c)
        return _ort_callable(_int8(model, shape) if precision == "int8" else model, shape)
    unit = LayerUnit(sig, "fast")
    return _jax_callable(unit.apply, random_variables(unit, sig.in_shape()), (1, *sig.in_shape()))


def null_callable(runtime: str) -> Callable[[], Any]:
    """A trivial model: the runtime's fixed per-call cost, subtracted from every layer entry.

    ONNX Runtime: x + 1 on 8 values. JAX: a (16 x 8) by (8 x 8) matrix product, because XLA:CPU charges
    ~60 us once per executable that contains any dot (measured: 1, 2, 5 and 10 chained tiny
    dots all cost ~66-72 us, an add alone ~8 us), which every network and every layer pays once.
    """
    if runtime == "onnxruntime":
        return _ort_callable(function_to_onnx(lambda x: x + 1.0, (1, 1, 8), batch=1, name="null"), (1, 1, 1, 8))
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    return _jax_callable(lambda v, x: jnp.einsum("nhwc,cd->nhwd", x, v), w, (1, 4, 4, 8))


def arch_callable(arch: Architecture, runtime: str, variables: Any = None,
                  precision: str = "fp32") -> Callable[[], Any]:
    """A zero-argument callable that runs the whole network once at batch 1 in `runtime` (int8:
    its ONNX export quantized as `unit_callable` quantizes a layer)."""
    check_precision(precision, runtime)
    impl = "reference" if runtime == "onnxruntime" else "fast"
    net = build_model(arch, impl)
    if variables is None:
        variables = random_variables(net, input_shape(arch)[1:])
    if runtime == "onnxruntime":
        model = to_onnx(arch, variables, batch=1)
        return _ort_callable(_int8(model, input_shape(arch)) if precision == "int8" else model, input_shape(arch))
    return _jax_callable(lambda v, x: net.apply(v, x, train=False), variables, input_shape(arch))


def measure_latency_ms(arch: Architecture, runtime: str = "onnxruntime", *, budget_s: float = 0.3) -> float:
    """Measured end-to-end latency of `arch` on this machine (batch 1, median, single thread)."""
    return median_ms(arch_callable(arch, runtime), budget_s=budget_s)


def measure_passes(makers: Sequence[Callable[[], Any]], passes: int, budget_s: float,
                   on_result: Callable[[int, float], None] | None = None, *, rebuild: bool = False,
                   rounds: int = ROUNDS) -> list[float]:
    """Time each callable (`makers[i]()` builds it) and keep the minimum of many short medians.

    Each pass builds the callables (all of them at once), then goes `rounds` times round the
    whole list, spending `budget_s / rounds` on each item per round; `on_result(i, best)` follows
    an item's last round of a pass. The machine's host (a shared VM) has bursts of 1.7-2x
    slowdown lasting 0.25-6 s, about a third of the time (measured: one network timed in 0.25 s
    windows for 150 s, `benchmarks/cost_model.py --timeline`); one median over a single window
    lands inside such a burst often, but the minimum over windows spread across a whole pass
    almost never does. With `rebuild`, every pass builds the callables anew: an ONNX Runtime
    session is a fresh allocation whose speed can differ from the last one's.
    """
    fns: list[Any] = [None] * len(makers)
    best = [math.inf] * len(makers)
    rng = np.random.default_rng(0)
    for p in range(passes):
        fns = [f if f is not None else make() for f, make in zip(fns, makers)]
        for r in range(rounds):
            for i in rng.permutation(len(makers)).tolist():
                best[i] = min(best[i], median_ms(fns[i], budget_s=budget_s / rounds, min_reps=15, warmup=5))
                if r == rounds - 1 and on_result:
                    on_result(i, best[i])
        if rebuild or p == passes - 1:
            fns = [None] * len(makers)  # free sessions / executables
    return best


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load averages (what `uptime` prints)."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3
