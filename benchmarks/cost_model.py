"""How well do the latency predictors rank and predict real latency on this machine?

For each built-in space and runtime: calibrate the host look-up table (reusing the cache),
then validate both predictors (analytic roofline of the `host` profile, calibrated LUT) against
end-to-end measurements of N sampled architectures (batch 1, median, one thread).

    python benchmarks/cost_model.py                       # all spaces, both runtimes
    python benchmarks/cost_model.py --spaces mobile_small --runtimes onnxruntime --n 50 --json

Run it on a quiet machine: the load average is printed with every row because other
processes inflate and scatter the timings.
"""

from __future__ import annotations

import os

# Single-threaded XLA:CPU, set before JAX starts: batch-1 jitted latency roughly halves and
# does not depend on other processes' load (PLATFORM-NOTES). Recorded in the cache fingerprint.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from evaluators.latency import RUNTIMES, calibrate, default_cache_path, load_average, validate  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402

# Per space: n for (onnxruntime, jax), or a reason to skip.
DEFAULT_N = {"mnas_imagenet": {"onnxruntime": 20, "jax": 10}}
SKIP: dict[tuple[str, str], str] = {}


def _progress(prefix: str):
    def show(done: int, total: int, what: str) -> None:
        if done == total or done % 25 == 0:
            print(f"  {prefix}: {done}/{total} {what}", file=sys.stderr, flush=True)
    return show


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", nargs="+", default=SPACES.names())
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--n", type=int, default=50, help="architectures per validation (mnas_imagenet uses fewer)")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--json", action="store_true", help="print all results as JSON at the end")
    ap.add_argument("--recalibrate", action="store_true", help="discard cached layer measurements first")
    args = ap.parse_args(argv)

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
            calibrate(space, args.profile, rt, recalibrate=args.recalibrate,
                      progress=_progress(f"calibrate {space}/{rt}"))
            t_cal = time.monotonic() - t0
            res = validate(space, args.profile, rt, n=n, progress=_progress(f"validate {space}/{rt}"))
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
