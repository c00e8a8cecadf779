"""The compression report of one compressed model: computed once when its folder is written, read
by the model card (`nas.export.card.compressed_card`) and `nas report` (its Compression section).

`compression_report(...)` measures and returns the figures that go into `metrics.json`:

| key | what |
|---|---|
| params, macs, weight_bytes_fp32 | {'before', 'after'}: analytic, of the original and the compressed network |
| onnx_bytes | {'before', 'after'[, 'after_int8']}: bytes of the fp32 ONNX file of each (and of model.int8.onnx) |
| ratios | before / after of params, macs, onnx_bytes; shipped_bytes = fp32 original / model.int8.onnx |
| energy_mj | {'PROFILE:PRECISION': {'before', 'after', 'ratio'}} per inference at batch 1 (`evaluators.energy`) |
| latency_ms | {'before', 'after', 'before_int8', 'after_int8'}: {'batch1', 'batch32'} ONNX Runtime, one thread, all alternated |
| latency_int8_source | what 'after_int8' timed: 'model.int8.onnx', or a post-training quantization made only for timing |
| speedup, speedup_int8 | before / after (fp32), before (fp32) / after_int8, per batch size |
| speedup_int8_vs_fp32 | {'before', 'after'}: {'batch1', 'batch32'}: fp32 / int8 of the same network |

`CompressionReport.from_metrics(m)` reads those back (and the accuracy keys the stage writes:
`test_accuracy_before`, `test_accuracy`, `accuracy_drop_pt`, `int8.test_accuracy`) from any
metrics.json, including one written before some keys existed (missing figures are None).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from evaluators.cost import analytic_cost
from evaluators.energy import energy
from evaluators.hardware import PROFILES
from evaluators.onnx_export import ort_session
from evaluators.quantize import quantize_model_int8
from evaluators.timing import measure_passes
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

BATCHES = ("batch1", "batch32")
METRICS = "metrics.json"
COMPRESSED_DIR = "compressed"
INT8_FILE = "model.int8.onnx"
INT8_FOR_TIMING = "post-training quantization (minmax) of model.onnx, made only for timing (not shipped)"


def ratio(before: Any, after: Any) -> float | None:
    """before / after, or None when either is missing or after is not positive."""
    try:
        b, a = float(before), float(after)
    except (TypeError, ValueError):
        return None
    return b / a if a > 0 and math.isfinite(a) and math.isfinite(b) else None


# ============================================================ computing (once, when the folder is written)
def compression_report(arch: Architecture, small: Architecture, before_onnx: onnx.ModelProto,
                       after_onnx: onnx.ModelProto, x: np.ndarray, budget_s: float,
                       int8_onnx: onnx.ModelProto | None = None, *,
                       calibration: np.ndarray | None = None) -> dict[str, Any]:
    """The figures of the compression report (see the module docstring) for `arch` -> `small`.

    Args:
      arch, small: the original and the compressed network.
      before_onnx, after_onnx: their fp32 ONNX models (dynamic batch).
      x: input rows for the latency measurements (the first one, and 32 rows).
      budget_s: time spent per latency figure; 0: no latency measured.
      int8_onnx: the shipped int8 model (model.int8.onnx), if any.
      calibration: input rows calibrating the int8 models made only for timing (the original's,
        and the compressed one's when `int8_onnx` is None); None: int8 timed only when shipped.
    """
    a, b = analytic_cost(arch), analytic_cost(small)
    sizes = {"before": before_onnx.ByteSize(), "after": after_onnx.ByteSize()}
    if int8_onnx is not None:
        sizes["after_int8"] = int8_onnx.ByteSize()
    rep: dict[str, Any] = {
        "params": {"before": a.params, "after": b.params}, "macs": {"before": a.macs, "after": b.macs},
        "weight_bytes_fp32": {"before": a.weight_bytes["fp32"], "after": b.weight_bytes["fp32"]},
        "onnx_bytes": sizes,
        "ratios": {"params": ratio(a.params, b.params), "macs": ratio(a.macs, b.macs),
                   "onnx_bytes": ratio(sizes["before"], sizes["after"])},
        "energy_mj": {},
    }
    if int8_onnx is not None:
        rep["ratios"]["shipped_bytes"] = ratio(sizes["before"], sizes["after_int8"])
    for p in PROFILES.names():
        prof = PROFILES.get(p)
        if prof.energy_pj is None:
            continue
        for q in prof.precisions:
            eb, ea = energy(arch, p, q).total_mj, energy(small, p, q).total_mj
            rep["energy_mj"][f"{p}:{q}"] = {"before": eb, "after": ea, "ratio": ratio(eb, ea)}
    if budget_s <= 0:
        return rep
    models: dict[str, Any] = {"before": before_onnx, "after": after_onnx}
    if calibration is not None:
        models["before_int8"] = quantize_model_int8(before_onnx, calibration)
    if int8_onnx is not None:
        models["after_int8"] = int8_onnx
        rep["latency_int8_source"] = INT8_FILE
    elif calibration is not None:
        models["after_int8"] = quantize_model_int8(after_onnx, calibration)
        rep["latency_int8_source"] = INT8_FOR_TIMING
    lat = measure_onnx_latency(models, x, budget_s)
    rep["latency_ms"] = lat
    rep["speedup"] = {bk: ratio(lat["before"][bk], lat["after"][bk]) for bk in BATCHES}
    if "after_int8" in lat:
        rep["speedup_int8"] = {bk: ratio(lat["before"][bk], lat["after_int8"][bk]) for bk in BATCHES}
    rep["speedup_int8_vs_fp32"] = {w: {bk: ratio(lat[w][bk], lat[f"{w}_int8"][bk]) for bk in BATCHES}
                                   for w in ("before", "after") if f"{w}_int8" in lat}
    return rep


def measure_onnx_latency(models: Mapping[str, Any], x: np.ndarray, budget_s: float) -> dict[str, dict[str, float]]:
    """{name: {'batch1': ms, 'batch32': ms}} for ONNX models (one thread), all figures interleaved
    (`evaluators.timing.measure_passes`) so their ratios compare like with like."""
    batches = {"batch1": np.ascontiguousarray(x[:1], np.float32),
               "batch32": np.resize(x, (32, *x.shape[1:])).astype(np.float32)}
    which, makers = [], []
    for name, model in models.items():
        for bk, xb in batches.items():
            def make(model=model, xb=xb):
                sess = ort_session(model, threads=1)
                feed = {sess.get_inputs()[0].name: xb}
                return lambda: sess.run(None, feed)

            which.append((name, bk))
            makers.append(make)
    out: dict[str, dict[str, float]] = {}
    for (name, bk), ms in zip(which, measure_passes(makers, 1, budget_s)):
        out.setdefault(name, {})[bk] = ms
    return out


# ============================================================ reading (card, nas report)
def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Figure:
    """One figure before and after compression, and before / after."""

    before: float | None
    after: float | None
    ratio: float | None

    @classmethod
    def of(cls, d: Any, after_key: str = "after", stored_ratio: Any = None) -> "Figure":
        d = d if isinstance(d, Mapping) else {}
        b, a = _num(d.get("before")), _num(d.get(after_key))
        r = _num(stored_ratio)
        return cls(b, a, r if r is not None else ratio(b, a))


@dataclass(frozen=True)
class CompressionReport:
    """The compression report of one compressed model folder, as read from its metrics.json."""

    name: str
    rank: int | None
    key: str
    pruned_from: str
    options: Mapping[str, Any]
    params: Figure
    macs: Figure
    onnx_bytes: Figure  # fp32 file of the original / of model.onnx
    shipped_bytes: Figure | None  # fp32 file of the original / model.int8.onnx (with QAT)
    accuracy_before: float | None
    accuracy_after: float | None
    accuracy_int8: float | None  # model.int8.onnx on the test split
    latency_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # before/after[_int8] -> batch -> ms
    latency_int8_source: str | None = None
    energy_mj: Mapping[str, Figure] = field(default_factory=dict)  # 'PROFILE:PRECISION' -> Figure

    @classmethod
    def from_metrics(cls, m: Mapping[str, Any], name: str = "") -> "CompressionReport":
        """Read a compressed folder's metrics.json (as a dict); keys it lacks give None / empty."""
        ratios = m.get("ratios") if isinstance(m.get("ratios"), Mapping) else {}
        sizes = m.get("onnx_bytes") if isinstance(m.get("onnx_bytes"), Mapping) else {}
        int8 = m.get("int8") if isinstance(m.get("int8"), Mapping) else {}
        lat = m.get("latency_ms") if isinstance(m.get("latency_ms"), Mapping) else {}
        energies = m.get("energy_mj") if isinstance(m.get("energy_mj"), Mapping) else {}
        rank = m.get("rank")
        return cls(
            name=name, rank=rank if isinstance(rank, int) else None, key=str(m.get("key", "?")),
            pruned_from=str(m.get("pruned_from", "?")),
            options=m.get("options") if isinstance(m.get("options"), Mapping) else {},
            params=Figure.of(m.get("params"), stored_ratio=ratios.get("params")),
            macs=Figure.of(m.get("macs"), stored_ratio=ratios.get("macs")),
            onnx_bytes=Figure.of(sizes, stored_ratio=ratios.get("onnx_bytes")),
            shipped_bytes=Figure.of(sizes, "after_int8", ratios.get("shipped_bytes")) if "after_int8" in sizes else None,
            accuracy_before=_num(m.get("test_accuracy_before")), accuracy_after=_num(m.get("test_accuracy")),
            accuracy_int8=_num(int8.get("test_accuracy")),
            latency_ms={k: {bk: x for bk in BATCHES if (x := _num((v or {}).get(bk))) is not None}
                        for k, v in lat.items() if isinstance(v, Mapping)},
            latency_int8_source=m.get("latency_int8_source") or (INT8_FILE if "after_int8" in lat else None),
            energy_mj={k: Figure.of(v, stored_ratio=(v or {}).get("ratio")) for k, v in energies.items()
                       if isinstance(v, Mapping)},
        )

    @property
    def accuracy_change_pt(self) -> float | None:
        """Test accuracy after minus before, in points (negative: a drop)."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return 100 * (self.accuracy_after - self.accuracy_before)

    @property
    def int8_change_pt(self) -> float | None:
        """Test accuracy of the shipped int8 model minus the original's, in points."""
        if self.accuracy_before is None or self.accuracy_int8 is None:
            return None
        return 100 * (self.accuracy_int8 - self.accuracy_before)

    def speedup(self, which: str, batch: str, over: str = "before") -> float | None:
        """Measured latency of `over` / latency of `which` at `batch` (e.g. ('after_int8', 'batch32'))."""
        return ratio(self.latency_ms.get(over, {}).get(batch), self.latency_ms.get(which, {}).get(batch))

    def techniques(self) -> str:
        """What was applied, e.g. 'prune macs=0.5 (l1, 2 steps), QAT int8'."""
        o = self.options
        parts = []
        if o.get("prune"):
            parts.append(f"prune {o['prune']} ({o.get('criterion', '?')}, {o.get('steps', 1)} step(s))")
        if o.get("lowrank"):
            parts.append(f"low-rank {o['lowrank'] if isinstance(o['lowrank'], str) else ''}".strip())
        if o.get("qat"):
            parts.append("QAT int8")
        return ", ".join(parts) or "?"


def read_compression_report(folder: str | Path) -> CompressionReport:
    """The report of a compressed model folder (its metrics.json); NasError naming the file when unreadable."""
    path = Path(folder) / METRICS
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise NasError(f"{path}: no such file (a compressed model folder holds one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NasError(f"{path}: not readable as JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(m, Mapping):
        raise NasError(f"{path}: expected a JSON object")
    return CompressionReport.from_metrics(m, Path(folder).name)


def compressed_folders(run_dir: str | Path) -> list[Path]:
    """RUN_DIR/compressed/*/ folders holding a metrics.json, sorted by name (hidden partial ones skipped)."""
    base = Path(run_dir) / COMPRESSED_DIR
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / METRICS).is_file())
