"""Predicted latency of an architecture on a hardware profile: the calibrated look-up table
when one covers it, else the analytic roofline (`evaluators.hardware`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from evaluators.hardware import PROFILES, LatencyEstimate, analytic_latency, get_profile
from evaluators.lut import CALIBRATABLE, cached_table, default_cache_path
from evaluators.timing import check_runtime
from search_spaces.architecture import Architecture


def latency_breakdown(arch: Architecture, profile_name: str = "host", *, lut_path: str | Path | None = None,
                      runtime: str = "onnxruntime", precision: str | None = None) -> LatencyEstimate:
    """Predicted latency of `arch` on a profile, per layer, from the LUT when one applies, else analytic.

    The LUT is used when a calibrated table exists for (profile, runtime) - `lut_path`, or the
    default cache - and covers every layer of `arch`; `.method` says which predictor was used and
    `.note` why the LUT was not. A stale or corrupt table raises NasError (never used silently).
    """
    check_runtime(runtime)
    prof = get_profile(profile_name)
    path = Path(lut_path) if lut_path else default_cache_path(prof.name, runtime)
    note = ""
    if (lut_path or prof.name in CALIBRATABLE) and (precision in (None, "fp32")):
        if path.exists() or lut_path:
            table = cached_table(path, prof.name, runtime)
            if table.covers(arch):
                return table.predict(arch)
            note = f"{path}: no entry for {len(table.missing(arch))} layer(s) of {arch.key!r}; analytic used"
        else:
            note = f"no calibration at {path}; analytic used"
    est = analytic_latency(arch, prof, precision)
    return LatencyEstimate(est.total_ms, est.method, est.profile, est.precision, runtime, 0.0, est.layers, note)


def predict_latency_ms(arch: Architecture, profile_name: str = "host", *, lut_path: str | Path | None = None,
                       runtime: str = "onnxruntime") -> float:
    """Predicted latency in ms (see `latency_breakdown` for which predictor and the per-layer terms)."""
    return latency_breakdown(arch, profile_name, lut_path=lut_path, runtime=runtime).total_ms


def latency_record(arch: Architecture, profiles: Iterable[str] | None = None, *,
                   runtime: str = "onnxruntime") -> dict[str, Any]:
    """Flat metrics for a trial result: `latency_ms@<profile>` and `latency_method@<profile>` per profile."""
    out: dict[str, Any] = {}
    for name in profiles if profiles is not None else PROFILES.names():
        est = latency_breakdown(arch, name, runtime=runtime)
        out[f"latency_ms@{name}"] = est.total_ms
        out[f"latency_method@{name}"] = est.method
    return out
