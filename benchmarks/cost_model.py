"""How well do the latency predictors rank and predict real latency on this machine?

For each built-in space and runtime: calibrate the host look-up table (reusing the cache),
then validate both predictors (analytic roofline of the `host` profile, calibrated LUT) against
end-to-end measurements of N sampled architectures (batch 1, median, one thread).

    python benchmarks/cost_model.py                       # all spaces, both runtimes
    python benchmarks/cost_model.py --spaces mobile_small --runtimes onnxruntime --n 50 --json
    python benchmarks/cost_model.py --timeline 150         # how steady is this machine right now?

Run it on a quiet machine: the load average is printed with every row because other
processes inflate and scatter the timings. `--timeline S` times one network in 0.25 s windows for
S seconds and reports the bursts of slowdown that a shared host adds even when this VM is idle
(the reason the measurements keep the minimum of many short windows, see `measure_passes`).
"""

from __future__ import annotations

import os

# Single-threaded XLA:CPU, set before JAX starts: batch-1 jitted latency roughly halves and
# does not depend on other processes' load (measured on the development machine). Recorded in the cache fingerprint.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from evaluators.calibrate import calibrate, sample_archs, validate  # noqa: E402
from evaluators.lut import default_cache_path  # noqa: E402
from evaluators.timing import RUNTIMES, arch_callable, load_average, median_ms  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402
from search_spaces.errors import NasError  # noqa: E402

# Per space: n for (onnxruntime, jax), or a reason to skip.
DEFAULT_N = {"mnas_imagenet": {"onnxruntime": 20, "jax": 10}}
SKIP: dict[tuple[str, str], str] = {}


def _progress(prefix: str):
    def show(done: int, total: int, what: str) -> None:
        if done == total or done % 25 == 0:
            print(f"  {prefix}: {done}/{total} {what}", file=sys.stderr, flush=True)
    return show


def timeline(seconds: float, window_s: float = 0.25, space: str = "mobile_small") -> dict[str, float]:
    """Time one network (ONNX Runtime, batch 1) in consecutive windows; bursts = windows >= 1.3x the fastest."""
    fn = arch_callable(sample_archs(SPACES.get(space), 1, 1)[0], "onnxruntime")
    t0, ms = time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        ms.append(median_ms(fn, budget_s=window_s, warmup=2))
    rel = [m / min(ms) for m in ms]
    slow = [r >= 1.3 for r in rel]
    runs, run = [], 0
    for s in slow + [False]:
        if s:
            run += 1
        elif run:
            runs.append(run * window_s)
            run = 0
    return {"windows": len(ms), "fastest_ms": min(ms), "slow_fraction": sum(slow) / len(ms),
            "median_slowdown_in_bursts": statistics.median([r for r in rel if r >= 1.3]) if runs else 1.0,
            "bursts": len(runs), "longest_burst_s": max(runs, default=0.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", nargs="+", default=SPACES.names())
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--n", type=int, default=50, help="architectures per validation (mnas_imagenet uses fewer)")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--json", action="store_true", help="print all results as JSON at the end")
    ap.add_argument("--recalibrate", action="store_true", help="discard cached layer measurements first")
    ap.add_argument("--timeline", type=float, metavar="SECONDS", help="only measure the machine's steadiness")
    args = ap.parse_args(argv)
    if args.timeline:
        t = timeline(args.timeline)
        print(f"{t['windows']} windows of 0.25 s, fastest {t['fastest_ms']:.4f} ms: {t['slow_fraction']:.0%} of them "
              f">= 1.3x slower, in {t['bursts']} bursts (longest {t['longest_burst_s']:.1f} s, median slowdown "
              f"{t['median_slowdown_in_bursts']:.2f}x)  load {'/'.join(f'{x:.1f}' for x in load_average())}")
        if args.json:
            print(json.dumps(t))
        return 0

    results = []
    print(f"{'space':<14} {'runtime':<11} {'n':>3}  {'predictor':<8} {'tau':>6} {'rho':>6} {'MAPE%':>7} "
          f"{'<=10%':>6}  {'calib s':>7} {'valid s':>7}  load(1,5,15m)")
    for space in args.spaces:
        for rt in args.runtimes:
            if (space, rt) in SKIP:
                print(f"{space:<14} {rt:<11} skipped: {SKIP[space, rt]}")
                continue
            n = min(args.n, DEFAULT_N.get(space, {}).get(rt, args.n))
            t0 = time.monotonic()
            try:
                calibrate(space, args.profile, rt, recalibrate=args.recalibrate,
                          progress=_progress(f"calibrate {space}/{rt}"))
                t_cal = time.monotonic() - t0
                res = validate(space, args.profile, rt, n=n, progress=_progress(f"validate {space}/{rt}"))
            except NasError as e:  # e.g. a stale cache without --recalibrate: keep the rows already measured
                print(f"error: {space}/{rt}: {e}", file=sys.stderr)
                if args.json:
                    print(json.dumps(results, indent=1))
                return 2
            res["meta"]["calibration_seconds"] += t_cal
            res["meta"]["cache"] = str(default_cache_path(args.profile, rt))
            results.append(res)
            load = "/".join(f"{x:.1f}" for x in load_average())
            for pred in ("analytic", "lut"):
                m = res[pred]
                print(f"{space:<14} {rt:<11} {res['meta']['n']:>3}  {pred:<8} {m['kendall_tau']:>6.3f} "
                      f"{m['spearman']:>6.3f} {m['mape']:>7.1f} {m['within_10pct']:>6.0%}  "
                      f"{res['meta']['calibration_seconds']:>7.1f} {res['meta']['seconds']:>7.1f}  {load}", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
