"""Calibrate the latency look-up table on this machine, and validate it against whole networks.

`calibrate` builds a one-layer model per distinct signature of a space, measures it at batch 1
in a runtime (ONNX Runtime on the CPU by default, or jitted JAX), and stores the medians in the
cache; then fits slope and constant (least squares) on 20 measured whole networks. `validate`
measures other sampled networks end to end and scores the look-up table and the analytic
roofline against them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from evaluators.hardware import analytic_latency, get_profile
from evaluators.lut import CALIBRATABLE, LatencyTable, default_cache_path, fingerprint, load_table
from evaluators.signatures import LayerSig, arch_signatures, space_signatures
from evaluators.timing import (
    REBUILD_EACH_PASS, arch_callable, check_precision, check_runtime, load_average, measure_passes, null_callable,
    unit_callable,
)
from search_spaces.architecture import Architecture
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

FIT_SAMPLES = 20  # whole networks measured to fit the slope and constant
Progress = Callable[[int, int, str], None]


def _space(space: SearchSpace | str) -> SearchSpace:
    return load_space(space) if isinstance(space, str) else space


def sample_archs(space: SearchSpace, n: int, seed: int, exclude: Iterable[str] = ()) -> list[Architecture]:
    """Up to `n` distinct architectures (by key), none in `exclude` when the space allows it."""
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    out: list[Architecture] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        a = space.sample(rng)
        if a.key not in seen:
            seen.add(a.key)
            out.append(a)
    return out


def calibrate(space: SearchSpace | str, profile: str = "host", runtime: str = "onnxruntime", *,
              cache_path: str | Path | None = None, progress: Progress | None = None, recalibrate: bool = False,
              archs: Sequence[Architecture] | None = None, fit_samples: int = FIT_SAMPLES, seed: int = 0,
              budget_s: float = 0.15, passes: int = 3, precision: str = "fp32") -> LatencyTable:
    """Measure every layer configuration of `space` on this machine and store the look-up table.

    Args:
      space: a space name or `SearchSpace`.
      profile: must be 'host' (the measurements are of this machine).
      runtime: 'onnxruntime' (default, where exported models are deployed) or 'jax'.
      cache_path: the JSON cache; default `default_cache_path(profile, runtime)`.
      progress: called as `progress(done, total, what)` after each measurement.
      recalibrate: re-measure this space's layers; a stale or corrupt cache is replaced instead of raising.
      archs: calibrate only the layers of these architectures (for spaces too large to measure whole).
      fit_samples: whole networks measured to fit the slope and constant.
      seed: seed of those networks.
      budget_s: time spent repeating each layer measurement (median).
      passes: measure every layer this many times, spread in time, keeping the minimum median
        (ONNX Runtime: a fresh session each pass).
      precision: 'fp32', or 'int8' (ONNX Runtime only): every layer and fit network is timed as a
        QDQ model quantized like the export's model.int8.onnx; stored in its own table beside
        the fp32 one (`default_cache_path(profile, runtime, 'int8')`).

    Returns:
      The `LatencyTable` (also saved). Re-running reuses every entry already in the cache.

    Example:
      >>> table = calibrate("mobile_small")
      >>> table.predict(arch).total_ms
    """
    space = _space(space)
    check_precision(precision, runtime)
    fresh = runtime in REBUILD_EACH_PASS
    get_profile(profile)
    if profile not in CALIBRATABLE:
        raise NasError(f"profile '{profile}': calibrate() measures this machine; allowed: {', '.join(CALIBRATABLE)} "
                       f"(run it on the device itself)")
    path = Path(cache_path) if cache_path else default_cache_path(profile, runtime, precision)
    table = None
    if path.exists():
        try:
            table = load_table(path, profile=profile, runtime=runtime, precision=precision)
        except NasError:
            if not recalibrate:
                raise
    if table is None:
        table = LatencyTable(profile, runtime, fingerprint(runtime, precision), path=path, precision=precision)
    fit = sample_archs(space, fit_samples, seed)
    if archs is None:
        wanted = space_signatures(space)
    else:
        wanted = {s for a in list(archs) + fit for s in arch_signatures(a) if not s.identity}
    if recalibrate:  # re-measure this space's layers; other spaces' entries in a valid cache stay
        for s in wanted:
            table.entries.pop(s.key(), None)
        table.constants.pop(space.name, None)
        table.scales.pop(space.name, None)
    todo = sorted((s for s in wanted if s.key() not in table.entries), key=LayerSig.key)
    refit = bool(todo) or space.name not in table.constants or space.name not in table.scales or recalibrate
    total = passes * (len(todo) + (len(fit) if refit else 0)) + 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    if todo or refit or table.null_ms <= 0:
        table.null_ms = measure_passes([lambda: null_callable(runtime)], 3, budget_s, rebuild=fresh)[0]
        tick("runtime overhead")
    last_save = [time.monotonic()]

    def record(i: int, ms: float) -> None:
        key = todo[i].key()
        table.entries[key] = min(ms, table.entries.get(key, math.inf))
        tick(key)
        if time.monotonic() - last_save[0] > 5:  # an interrupted run keeps what it measured
            table.save(path)
            last_save[0] = time.monotonic()

    measure_passes([lambda s=s: unit_callable(s, runtime, precision) for s in todo], passes, budget_s, record,
                   rebuild=fresh)
    if refit:
        measured = measure_passes([lambda a=a: arch_callable(a, runtime, precision=precision) for a in fit], passes,
                                  2 * budget_s,
                                  lambda i, ms: tick(f"fit {fit[i].key}"), rebuild=fresh)
        sums = [sum(table.layer_ms(s) or 0.0 for s in arch_signatures(a)) for a in fit]
        table.scales[space.name], table.constants[space.name] = fit_affine(sums, measured)
    table.save(path)
    return table


def fit_affine(sums: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(slope, constant) of measured ~ slope x layer-sum + constant, least squares over whole networks.

    Layers timed alone are not exactly their share of a network (cold inputs, per-call copies and
    cache effects that grow with tensor size): on mobile_small the plain sum over-predicted large
    nets and under-predicted small ones by up to 20% in one validation; the fitted slopes seen
    here are 0.93-1.04 (mobile_small) and 1.25-1.26 (macro_cifar). A slope outside [0.5, 2] or fewer than
    3 networks with spread means the fit is not to be trusted: slope 1, median residual instead.
    """
    x, y = np.asarray(sums, float), np.asarray(measured, float)
    if len(x) >= 3 and np.ptp(x) > 0.05 * max(float(np.mean(x)), 1e-9):
        slope, const = np.polyfit(x, y, 1)
        if 0.5 <= slope <= 2.0:
            return float(slope), float(const)
    return 1.0, (float(np.median(y - x)) if len(x) else 0.0)


def rank_metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Kendall's tau, Spearman's rho, MAPE (%) and the fraction within +-10% of measured."""
    from scipy.stats import kendalltau, spearmanr

    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(p - m) / m
    return {"kendall_tau": float(kendalltau(p, m).statistic), "spearman": float(spearmanr(p, m).statistic),
            "mape": float(100 * rel.mean()), "within_10pct": float((rel <= 0.10).mean())}


def validate(space: SearchSpace | str, profile: str = "host", runtime: str = "onnxruntime", n: int = 50, *,
             cache_path: str | Path | None = None, seed: int = 1, calibrate_missing: bool = True,
             progress: Progress | None = None, budget_s: float = 0.3, passes: int = 3,
             precision: str = "fp32") -> dict[str, Any]:
    """Measure `n` sampled architectures end to end and score both predictors against them.

    At `precision` 'int8' the networks are timed quantized (QDQ) and scored against the int8 table
    and the roofline's int8 figures.

    Each architecture is timed in `passes` passes over the whole sample (minimum of the medians).

    Returns:
      {"analytic": {...}, "lut": {"kendall_tau", "spearman", "mape", "within_10pct"},
       "meta": {space, profile, runtime, n, load_before, load_after, seconds, calibration_seconds},
       "samples": [{"key", "measured_ms", "analytic_ms", "lut_ms"}, ...]}
      The analytic predictor is the roofline of `profile`; the LUT is the calibrated table
      (layers missing from it are calibrated first when `calibrate_missing`).
    """
    space = _space(space)
    check_precision(precision, runtime)
    t0 = time.monotonic()
    load_before = load_average()
    path = Path(cache_path) if cache_path else default_cache_path(profile, runtime, precision)
    table = load_table(path, profile=profile, runtime=runtime, precision=precision) if path.exists() else None
    fit_keys = [a.key for a in sample_archs(space, FIT_SAMPLES, 0)]  # calibrate()'s default fit set
    archs = sample_archs(space, n, seed, exclude=fit_keys)
    if len(archs) < 3:
        raise NasError(f"space '{space.name}': only {len(archs)} architectures to validate on; need at least 3")
    t_cal = 0.0
    if table is None or any(not table.covers(a) for a in archs) or space.name not in table.scales:
        if table is None and not calibrate_missing:
            raise NasError(f"{path}: latency table not found; run calibrate() (nas hw calibrate) first")
        if calibrate_missing:
            t1 = time.monotonic()
            table = calibrate(space, profile, runtime, cache_path=path, archs=archs, progress=progress,
                              precision=precision)
            t_cal = time.monotonic() - t1
    count = iter(range(1, passes * len(archs) + 1))
    measured = measure_passes([lambda a=a: arch_callable(a, runtime, precision=precision) for a in archs], passes,
                              budget_s,
                              lambda i, ms: progress and progress(next(count), passes * len(archs),
                                                                  f"measure {archs[i].key}"),
                              rebuild=runtime in REBUILD_EACH_PASS)
    samples = [{"key": a.key, "measured_ms": m, "analytic_ms": analytic_latency(a, profile, precision).total_ms,
                "lut_ms": table.predict(a).total_ms if table.covers(a) else float("nan")}
               for a, m in zip(archs, measured)]
    meas = [s["measured_ms"] for s in samples]
    lut_ok = [s for s in samples if not math.isnan(s["lut_ms"])]
    return {
        "analytic": rank_metrics([s["analytic_ms"] for s in samples], meas),
        "lut": rank_metrics([s["lut_ms"] for s in lut_ok], [s["measured_ms"] for s in lut_ok]) if len(lut_ok) > 2
        else None,
        "meta": {"space": space.name, "profile": profile, "runtime": runtime, "precision": precision,
                 "n": len(samples),
                 "load_before": list(load_before), "load_after": list(load_average()),
                 "seconds": time.monotonic() - t0, "calibration_seconds": t_cal, "cache": str(path)},
        "samples": samples,
    }
