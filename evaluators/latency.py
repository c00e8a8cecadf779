"""Predicted latency of an architecture on a hardware profile: the calibrated look-up table
when one covers it, else the analytic roofline (`evaluators.hardware`); at int8, the measured
int8 look-up table only (`calibrate(..., precision='int8')`): there is no fallback, because the
roofline's int8 figures are peak rates that ONNX Runtime's QDQ kernels do not reach here.

The cost name is `latency_ms@PROFILE` or `latency_ms@PROFILE:PRECISION` (`parse_cost_name`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from evaluators.hardware import PROFILES, LatencyEstimate, analytic_latency, get_profile
from evaluators.lut import CALIBRATABLE, LatencyTable, cached_table, default_cache_path
from evaluators.timing import PRECISIONS, check_runtime
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

PREFIX = "latency_ms@"  # the cost name: latency_ms@PROFILE or latency_ms@PROFILE:PRECISION


def parse_cost_name(name: str) -> tuple[str, str | None]:
    """'latency_ms@PROFILE[:PRECISION]' -> (profile, precision or None); checks the profile exists and
    the precision is one a look-up table is measured at (fp32, int8)."""
    prof, sep, prec = name[len(PREFIX):].partition(":")
    PROFILES.get(prof)
    if sep and prec not in PRECISIONS:
        raise NasError(f"{name}: unknown precision '{prec}'; allowed: {', '.join(f'{PREFIX}{prof}:{p}' for p in PRECISIONS)}")
    return prof, (prec or None)


def int8_table(profile_name: str, *, lut_path: str | Path | None = None, runtime: str = "onnxruntime") -> LatencyTable:
    """The measured int8 look-up table of a profile; NasError saying how to measure it when there is none."""
    prof = get_profile(profile_name)
    path = Path(lut_path) if lut_path else default_cache_path(prof.name, runtime, "int8")
    if not path.is_file():
        how = (f"run `nas hw calibrate --space SPACE --profile {prof.name} --precision int8`" if prof.name in CALIBRATABLE
               else f"measure it on the device itself (`nas hw calibrate --precision int8` calibrates "
                    f"{', '.join(CALIBRATABLE)}: this machine)")
        raise NasError(f"{PREFIX}{prof.name}:int8: no int8 latency table at {path}; {how}")
    return cached_table(path, prof.name, runtime, "int8")


def latency_breakdown(arch: Architecture, profile_name: str = "host", *, lut_path: str | Path | None = None,
                      runtime: str = "onnxruntime", precision: str | None = None) -> LatencyEstimate:
    """Predicted latency of `arch` on a profile, per layer, from the LUT when one applies, else analytic.

    fp32 (precision None or 'fp32'): the LUT is used when a calibrated table exists for (profile,
    runtime) - `lut_path`, or the default cache - and covers every layer of `arch`; `.method` says
    which predictor was used and `.note` why the LUT was not. int8: the int8 LUT (`lut_path` or the
    default int8 cache), which must exist and cover `arch` (NasError naming the command that
    measures it). Other precisions: analytic. A stale or corrupt table raises NasError (never used
    silently).
    """
    check_runtime(runtime)
    prof = get_profile(profile_name)
    if precision == "int8":
        table = int8_table(prof.name, lut_path=lut_path, runtime=runtime)
        missing = table.missing(arch)
        if missing:
            raise NasError(f"{table.path}: no int8 entry for {len(missing)} layer(s) of {arch.key!r} (first "
                           f"'{missing[0].key()}'); run `nas hw calibrate --space {arch.space} --precision int8`")
        return table.predict(arch)
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
                       runtime: str = "onnxruntime", precision: str | None = None) -> float:
    """Predicted latency in ms (see `latency_breakdown` for which predictor and the per-layer terms)."""
    return latency_breakdown(arch, profile_name, lut_path=lut_path, runtime=runtime, precision=precision).total_ms


def latency_ms(arch: Architecture, name: str) -> float:
    """The value of the cost `latency_ms@PROFILE[:PRECISION]` for `arch`."""
    prof, prec = parse_cost_name(name)
    return predict_latency_ms(arch, prof, precision=prec)


def latency_record(arch: Architecture, profiles: Iterable[str] | None = None, *,
                   runtime: str = "onnxruntime") -> dict[str, Any]:
    """Flat metrics for a trial result: `latency_ms@<profile>` and `latency_method@<profile>` per profile."""
    out: dict[str, Any] = {}
    for name in profiles if profiles is not None else PROFILES.names():
        est = latency_breakdown(arch, name, runtime=runtime)
        out[f"latency_ms@{name}"] = est.total_ms
        out[f"latency_method@{name}"] = est.method
    return out
