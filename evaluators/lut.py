"""The measured latency look-up table (FBNet / ProxylessNAS style) and its JSON cache.

The table holds the median latency of each layer signature measured on this machine (raw, ms),
the runtime's fixed per-call overhead, and per space a slope and constant fitted on whole
networks (see `evaluators.calibrate`). Predicted latency of a network = slope x sum over its
layers of (layer time - per-call overhead) + constant.

The cache records the machine (CPU model, core count) and library versions; loading one that
does not match raises `NasError` (recalibrate explicitly) - it is never used silently. It is
written atomically (temporary file + rename), also during calibration, so an interrupted run
leaves a valid, partial cache that the next run completes.

A table has a precision: 'fp32' (the default), or 'int8', whose layers were timed as ONNX QDQ
models quantized as the export ships int8 (`calibrate(..., precision='int8')`, `nas hw calibrate
--precision int8`). The int8 table is its own file beside the fp32 one
(`latency-host-onnxruntime-int8.json`), with the precision and quantization in its fingerprint.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from evaluators.hardware import LatencyEstimate, LayerLatency
from evaluators.signatures import LayerSig, arch_signatures
from evaluators.timing import PRECISIONS, ROUNDS, check_precision, check_runtime
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.graph import layer_names

FORMAT = 2  # 2: activations exported as native ONNX ops (fuse_activations)
CALIBRATABLE = ("host",)  # calibrate() measures on this machine: only its own profile makes sense
CACHE_ENV = "COMPACT_NAS_CACHE_DIR"
TIMING = f"min of medians, {ROUNDS} windows per pass"  # in the fingerprint: tables timed otherwise are stale


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


INT8_QUANTIZATION = "QDQ, per-channel symmetric int8 weights, uint8 activations (evaluators.quantize)"


def fingerprint(runtime: str, precision: str = "fp32") -> dict[str, Any]:
    """What a measurement depends on besides the layer: machine, library versions, runtime settings
    (and, for an int8 table, the precision and how layers were quantized)."""
    check_precision(precision, runtime)
    fp: dict[str, Any] = {"format": FORMAT, "cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                          "runtime": runtime, "threads": 1, "timing": TIMING, "jax": jax.__version__}
    if runtime == "onnxruntime":
        import jax2onnx
        import onnxruntime

        fp["onnxruntime"] = onnxruntime.__version__
        fp["jax2onnx"] = getattr(jax2onnx, "__version__", "?")
    else:
        import jaxlib

        fp["jaxlib"] = jaxlib.__version__
        fp["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if precision != "fp32":  # fp32 tables keep the fingerprint they were written with
        fp["precision"] = precision
        fp["quantization"] = INT8_QUANTIZATION
    return fp


def default_cache_path(profile: str = "host", runtime: str = "onnxruntime", precision: str = "fp32") -> Path:
    """`$COMPACT_NAS_CACHE_DIR/latency-<profile>-<runtime>.json` (`...-int8.json` for the int8 table,
    beside it), default dir `~/.cache/compact-nas`."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compact-nas")
    suffix = "" if check_precision(precision, runtime) == "fp32" else f"-{precision}"
    return base / f"latency-{profile}-{check_runtime(runtime)}{suffix}.json"


@dataclass
class LatencyTable:
    """Measured per-layer latencies (raw medians, ms) for one profile, runtime and precision, plus the
    fitted slope and constant per space."""

    profile: str
    runtime: str
    fingerprint: dict[str, Any]
    null_ms: float = 0.0
    entries: dict[str, float] = field(default_factory=dict)
    constants: dict[str, float] = field(default_factory=dict)  # per space name, ms
    path: Path | None = None
    scales: dict[str, float] = field(default_factory=dict)  # per space name, fitted slope on the layer sum
    precision: str = "fp32"  # 'int8': layers timed as QDQ models (evaluators.timing.unit_callable)

    def layer_ms(self, sig: LayerSig) -> float | None:
        """Latency charged to one layer in a network (raw median minus the per-call overhead)."""
        if sig.identity:
            return 0.0
        raw = self.entries.get(sig.key())
        return None if raw is None else max(raw - self.null_ms, 0.0)

    def constant_ms(self, space: str) -> float:
        if space in self.constants:
            return self.constants[space]
        return float(np.median(list(self.constants.values()))) if self.constants else self.null_ms

    def scale(self, space: str) -> float:
        """Fitted slope on the sum of layer entries (1.0 for a space fitted before slopes were kept)."""
        return self.scales.get(space, 1.0)

    def missing(self, arch: Architecture) -> list[LayerSig]:
        return [s for s in arch_signatures(arch) if not s.identity and s.key() not in self.entries]

    def covers(self, arch: Architecture) -> bool:
        return not self.missing(arch)

    def predict(self, arch: Architecture) -> LatencyEstimate:
        """Fitted slope x sum of the layers' entries + the fitted constant (each layer's share in the
        breakdown is its entry x the slope); raises NasError when a layer is missing."""
        missing = self.missing(arch)
        if missing:
            raise NasError(f"{self.path or 'latency table'}: no entry for layer '{missing[0].key()}' "
                           f"({len(missing)} missing); run calibrate() for space '{arch.space}'")
        names = layer_names(arch)
        sigs = arch_signatures(arch)
        k = self.scale(arch.space)
        layers = [LayerLatency(i, names[i], k * (self.layer_ms(s) or 0.0), source="lut", signature=s.key())
                  for i, s in enumerate(sigs)]
        layers.append(LayerLatency(len(names) - 1, names[-1], 0.0, source="lut", signature="(in head)"))
        c = self.constant_ms(arch.space)
        return LatencyEstimate(total_ms=sum(l.latency_ms for l in layers) + c, method="lut", profile=self.profile,
                               precision=self.precision, runtime=self.runtime, constant_ms=c, layers=tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "profile": self.profile, "runtime": self.runtime, "precision": self.precision,
                "fingerprint": self.fingerprint,
                "null_ms": self.null_ms, "constants": self.constants, "scales": self.scales,
                "entries": dict(sorted(self.entries.items()))}

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (temporary file in the same directory, fsync, rename)."""
        path = Path(path or self.path or default_cache_path(self.profile, self.runtime, self.precision))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = path
        return path


def load_table(path: str | Path, *, profile: str | None = None, runtime: str | None = None,
               precision: str | None = None, check_machine: bool = True) -> LatencyTable:
    """Read a cache file; NasError when it is corrupt, for another profile/runtime/precision, or stale
    (measured on another machine or with other library versions, when `check_machine`). A table
    without a `precision` key is fp32 (written before int8 tables existed)."""
    path = Path(path)
    hint = "delete it or recalibrate (calibrate(..., recalibrate=True) / nas hw calibrate --recalibrate)"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise NasError(f"{path}: latency table not found; run calibrate() (nas hw calibrate) first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NasError(f"{path}: corrupt latency table ({type(e).__name__}: {str(e).splitlines()[0]}); {hint}") from None
    required = {"format": int, "profile": str, "runtime": str, "fingerprint": dict, "null_ms": (int, float),
                "constants": dict, "entries": dict}
    if not isinstance(d, dict):
        raise NasError(f"{path}: corrupt latency table (not a JSON object); {hint}")
    for k, t in required.items():
        if not isinstance(d.get(k), t):
            raise NasError(f"{path}: corrupt latency table: key '{k}' missing or of the wrong type; {hint}")
    scales = d.get("scales", {})  # absent in tables written before slopes were fitted: calibrate() refits
    if not isinstance(scales, dict):
        raise NasError(f"{path}: corrupt latency table: key 'scales' of the wrong type; {hint}")
    for k, v in scales.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise NasError(f"{path}: corrupt latency table: scale '{k}' = {v!r}, allowed a finite number > 0; {hint}")
    if d["format"] != FORMAT:
        raise NasError(f"{path}: latency table format {d['format']}, this version reads {FORMAT}; {hint}")
    for k, v in list(d["entries"].items()) + list(d["constants"].items()) + [("null_ms", d["null_ms"])]:
        negative_ok = k in d["constants"]  # a fitted constant may be negative
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (v < 0 and not negative_ok):
            raise NasError(f"{path}: corrupt latency table: entry '{k}' = {v!r}, allowed a finite number"
                           f"{'' if negative_ok else ' >= 0'}; {hint}")
    if profile is not None and d["profile"] != profile:
        raise NasError(f"{path}: latency table is for profile '{d['profile']}', not '{profile}'")
    if runtime is not None and d["runtime"] != runtime:
        raise NasError(f"{path}: latency table is for runtime '{d['runtime']}', not '{runtime}'")
    prec = d.get("precision", "fp32")
    if prec not in PRECISIONS:
        raise NasError(f"{path}: corrupt latency table: precision {prec!r}, allowed: {', '.join(PRECISIONS)}; {hint}")
    if precision is not None and prec != precision:
        raise NasError(f"{path}: latency table is for precision '{prec}', not '{precision}'")
    if check_machine:
        check_runtime(d["runtime"])
        here = fingerprint(d["runtime"], prec)
        for k in sorted(set(here) | set(d["fingerprint"])):
            if d["fingerprint"].get(k) != here.get(k):
                raise NasError(f"{path}: stale latency table: {k} = {d['fingerprint'].get(k)!r} when measured, "
                               f"{here.get(k)!r} here; {hint}")
    return LatencyTable(d["profile"], d["runtime"], d["fingerprint"], float(d["null_ms"]),
                        {k: float(v) for k, v in d["entries"].items()},
                        {k: float(v) for k, v in d["constants"].items()}, path,
                        {k: float(v) for k, v in scales.items()}, prec)


_LOADED: dict[tuple[Any, ...], LatencyTable] = {}  # per process, by (path, mtime, size, what was asked)


def cached_table(path: Path, profile: str, runtime: str, precision: str = "fp32") -> LatencyTable:
    """`load_table(path, ...)`, read once per process while the file is unchanged (prediction per trial)."""
    if not path.is_file():
        return load_table(path, profile=profile, runtime=runtime, precision=precision)  # raises 'not found'
    st = path.stat()
    k = (str(path.resolve()), st.st_mtime_ns, st.st_size, profile, runtime, precision)
    if k not in _LOADED:
        _LOADED[k] = load_table(path, profile=profile, runtime=runtime, precision=precision)
    return _LOADED[k]
