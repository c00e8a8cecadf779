"""Pareto fronts and 2-D hypervolume for accuracy-vs-cost trade-offs (pure NumPy).

Points are mappings (a trial's result dict) or rows of an array; objectives are
``(name, 'max' | 'min')`` pairs. Internally every objective is turned into one to minimise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from search_spaces.errors import NasError

Criterion = tuple[str, str]  # (column, "max" | "min"): one axis of a Pareto front
DEFAULT_OBJECTIVES: tuple[Criterion, ...] = (("accuracy", "max"), ("latency", "min"))
COST_COLUMNS = ("params", "flops", "macs", "latency", "latency_ms", "activation_bytes", "weight_bytes",
                "weight_bytes_fp32", "weight_bytes_int8", "size_bytes", "memory_bytes")


def _check_objectives(objectives: Sequence[Criterion]) -> None:
    if not objectives:
        raise NasError("pareto: give at least one objective")
    for obj in objectives:
        if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and obj[1] in ("max", "min")):
            raise NasError(f"pareto: objective {obj!r}; allowed (name, 'max' | 'min')")


def _matrix(points: Sequence[Mapping[str, Any]] | np.ndarray, objectives: Sequence[Criterion]) -> np.ndarray:
    """(n, k) array to minimise; NaN where a value is missing or not a finite number."""
    _check_objectives(objectives)
    if isinstance(points, np.ndarray) or (len(points) and not isinstance(points[0], Mapping)):
        arr = np.asarray(points, dtype=float).reshape(len(points), -1)
        if arr.shape[1] != len(objectives):
            raise NasError(f"pareto: points have {arr.shape[1]} columns for {len(objectives)} objectives")
    else:
        arr = np.array([[_num(p.get(name)) for name, _ in objectives] for p in points], dtype=float).reshape(
            len(points), len(objectives))
    sign = np.array([-1.0 if mode == "max" else 1.0 for _, mode in objectives])
    arr = arr * sign
    arr[~np.isfinite(arr)] = np.nan
    return arr


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return math.nan
    return float(v)


def pareto_front(points: Sequence[Mapping[str, Any]] | np.ndarray,
                 objectives: Sequence[Criterion] = DEFAULT_OBJECTIVES) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    A point dominates another when it is at least as good in every objective and strictly
    better in one; equal points are all kept. Points lacking a finite value for some
    objective are never on the front.

    Example:
        >>> pareto_front([{"accuracy": 90, "latency": 2}, {"accuracy": 89, "latency": 3}])
        [0]
    """
    arr = _matrix(points, objectives)
    valid = np.flatnonzero(~np.isnan(arr).any(axis=1))
    v = arr[valid]
    front = []
    for j, row in enumerate(v):
        le = (v <= row).all(axis=1)
        lt = (v < row).any(axis=1)
        if not (le & lt).any():
            front.append(int(valid[j]))
    return front


def hypervolume(points: Sequence[Mapping[str, Any]] | np.ndarray, reference: Sequence[float],
                objectives: Sequence[Criterion] = DEFAULT_OBJECTIVES) -> float:
    """Exact 2-D hypervolume dominated by `points` and bounded by `reference`.

    `reference` is given in the objectives' own units (e.g. (min accuracy, max latency)); points
    that do not strictly improve on it in both objectives contribute nothing.

    Example:
        >>> hypervolume([[2, 1], [1, 0]], reference=(0, 2), objectives=[("a", "max"), ("c", "min")])
        3.0
    """
    if len(objectives) != 2:
        raise NasError(f"hypervolume: exact computation supports 2 objectives, got {len(objectives)}")
    arr = _matrix(points, objectives)
    ref = _matrix(np.asarray([reference], dtype=float), objectives)[0]
    if np.isnan(ref).any():
        raise NasError(f"hypervolume: reference point {tuple(reference)!r} must be two finite numbers")
    arr = arr[~np.isnan(arr).any(axis=1)]
    arr = arr[(arr < ref).all(axis=1)]
    if not len(arr):
        return 0.0
    arr = arr[np.lexsort((arr[:, 1], arr[:, 0]))]  # by first objective, then second
    volume, best_second = 0.0, ref[1]
    for a, b in arr:  # sweep: each front point adds the strip between its and the previous level
        if b < best_second:
            volume += (ref[0] - a) * (best_second - b)
            best_second = b
    return float(volume)


def cost_columns(results: Sequence[Mapping[str, Any]], accuracy: str = "accuracy") -> list[str]:
    """The known cost columns present (as numbers) in at least one result."""
    return [c for c in COST_COLUMNS if c != accuracy and any(math.isfinite(_num(r.get(c))) for r in results)]


def write_pareto(results: Sequence[Mapping[str, Any]], directory: str | Path, accuracy: str = "accuracy",
                 costs: Sequence[str] | None = None) -> Path:
    """Write ``<directory>/pareto.json``: accuracy vs each cost column, front and hypervolume.

    The hypervolume reference is (lowest accuracy, highest cost) among the valid results.
    Each front lists result indices, sorted by cost, and the points themselves.
    """
    cols = list(costs) if costs is not None else cost_columns(results, accuracy)
    out: dict[str, Any] = {"accuracy": accuracy, "n_results": len(results), "fronts": {}}
    for col in cols:
        objectives = [(accuracy, "max"), (col, "min")]
        idx = pareto_front(results, objectives)
        valid = [r for r in results if math.isfinite(_num(r.get(accuracy))) and math.isfinite(_num(r.get(col)))]
        idx.sort(key=lambda i: (_num(results[i][col]), -_num(results[i][accuracy])))
        entry: dict[str, Any] = {"indices": idx, "points": [dict(results[i]) for i in idx]}
        if valid:
            ref = (min(_num(r[accuracy]) for r in valid), max(_num(r[col]) for r in valid))
            entry["reference"] = list(ref)
            entry["hypervolume"] = hypervolume(valid, ref, objectives)
        out["fronts"][col] = entry
    path = Path(directory) / "pareto.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=_json_default))
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return str(x)
