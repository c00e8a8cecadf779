"""Hardware profiles (declared as YAML data) and the analytic roofline latency model.

A profile names a device and gives what the roofline needs: peak compute per operator class
and precision, memory bandwidth, a per-kernel launch overhead. Built-in profiles live in
`evaluators/profiles/*.yaml`; each figure's source is named in its file.

Analytic latency of one operator = max(compute time, memory time) + launch overhead, where
compute time = 2 * MACs (or elementwise ops) / peak of its class, and memory time = (weights +
input + output activations) at the precision's byte width / bandwidth. BatchNorm and the
activations after a convolution are folded/fused into it at deployment (as ONNX Runtime,
TFLite and TensorRT do), so they cost nothing; the kernels are conv/pwconv/dwconv/dense, the
global pool, the SE scaling multiply and the residual add. Network latency = sum over layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evaluators.cost import op_macs, op_params
from search_spaces.architecture import Architecture
from search_spaces.catalog import read_yaml
from search_spaces.errors import NasError
from search_spaces.graph import OpSpec, layer_names, network_ops
from search_spaces.registry import Registry

PROFILE_DIR = Path(__file__).parent / "profiles"
OP_CLASSES = ("conv", "dwconv", "dense", "elementwise")  # conv = dense k x k and pointwise 1 x 1 conv
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
KINDS = ("cpu", "gpu", "npu")
_FIELDS = {"name", "description", "kind", "threads", "precisions", "default_precision", "compute_gflops",
           "memory_bandwidth_gbs", "launch_overhead_us", "sources"}
_REQUIRED = _FIELDS - {"description", "threads", "kind"}
_FUSED = ("bn", "act")  # folded / fused into the preceding kernel


@dataclass(frozen=True)
class Profile:
    """A named hardware target. Build with `profile_from_yaml` / `profile_from_dict` or look up `get_profile`."""

    name: str
    precisions: tuple[str, ...]
    default_precision: str
    compute_gflops: Mapping[str, Mapping[str, float]]  # precision -> op class -> GFLOP/s
    memory_bandwidth_gbs: float
    launch_overhead_us: float
    sources: Mapping[str, str]
    description: str = ""
    kind: str = "cpu"
    threads: int = 1
    source: str = "<python>"

    def peak(self, op_class: str, precision: str) -> float:
        """Peak GFLOP/s (GOP/s) of `op_class` at `precision`."""
        return self.compute_gflops[self.check_precision(precision)][op_class]

    def check_precision(self, precision: str | None) -> str:
        p = precision or self.default_precision
        if p not in self.precisions:
            raise NasError(f"profile '{self.name}': precision '{p}' not supported; allowed: {', '.join(self.precisions)}")
        return p

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["precisions"] = list(self.precisions)
        d["compute_gflops"] = {p: dict(v) for p, v in self.compute_gflops.items()}
        d["sources"] = dict(self.sources)
        return d


def _positive(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise NasError(f"{where}: {v!r} is not a positive number; allowed a number > 0")
    return float(v)


def profile_from_dict(d: Mapping[str, Any], source: str = "<python>") -> Profile:
    """Parse and validate a profile declaration (the YAML document as a dict)."""
    if not isinstance(d, Mapping):
        raise NasError(f"{source}: expected a mapping with keys {', '.join(sorted(_REQUIRED))}")
    for k in d:
        if k not in _FIELDS:
            raise NasError(f"{source}: {k}: unknown key; allowed: {', '.join(sorted(_FIELDS))}")
    for k in sorted(_REQUIRED):
        if k not in d:
            raise NasError(f"{source}: {k}: required key is missing")
    name = d["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise NasError(f"{source}: name: invalid name {name!r}; allowed letters, digits, '_' and '-'")
    precisions = d["precisions"]
    if not isinstance(precisions, list) or not precisions or any(p not in PRECISION_BYTES for p in precisions):
        raise NasError(f"{source}: precisions: {precisions!r}; allowed a non-empty list of {', '.join(PRECISION_BYTES)}")
    default = d["default_precision"]
    if default not in precisions:
        raise NasError(f"{source}: default_precision: {default!r}; allowed one of the declared precisions {precisions}")
    compute = d["compute_gflops"]
    if not isinstance(compute, Mapping):
        raise NasError(f"{source}: compute_gflops: expected a mapping precision -> {{{', '.join(OP_CLASSES)}}}")
    table: dict[str, dict[str, float]] = {}
    for p in precisions:
        if p not in compute:
            raise NasError(f"{source}: compute_gflops.{p}: required key is missing (one entry per declared precision)")
        per = compute[p]
        if not isinstance(per, Mapping):
            raise NasError(f"{source}: compute_gflops.{p}: expected a mapping with keys {', '.join(OP_CLASSES)}")
        for c in per:
            if c not in OP_CLASSES:
                raise NasError(f"{source}: compute_gflops.{p}.{c}: unknown op class; allowed: {', '.join(OP_CLASSES)}")
        table[p] = {}
        for c in OP_CLASSES:
            if c not in per:
                raise NasError(f"{source}: compute_gflops.{p}.{c}: required key is missing")
            table[p][c] = _positive(per[c], f"{source}: compute_gflops.{p}.{c}")
    for p in compute:
        if p not in precisions:
            raise NasError(f"{source}: compute_gflops.{p}: precision not listed in precisions {precisions}")
    sources = d["sources"]
    if not isinstance(sources, Mapping):
        raise NasError(f"{source}: sources: expected a mapping figure -> where it comes from")
    for k in ("compute_gflops", "memory_bandwidth_gbs", "launch_overhead_us"):
        if not isinstance(sources.get(k), str) or not sources[k].strip():
            raise NasError(f"{source}: sources.{k}: required key is missing (name where the figure comes from)")
    kind = d.get("kind", "cpu")
    if kind not in KINDS:
        raise NasError(f"{source}: kind: {kind!r}; allowed: {', '.join(KINDS)}")
    threads = d.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise NasError(f"{source}: threads: {threads!r}; allowed a positive integer")
    launch = d["launch_overhead_us"]
    if isinstance(launch, bool) or not isinstance(launch, (int, float)) or not math.isfinite(launch) or launch < 0:
        raise NasError(f"{source}: launch_overhead_us: {launch!r}; allowed a number >= 0")
    return Profile(
        name=name, precisions=tuple(precisions), default_precision=default, compute_gflops=table,
        memory_bandwidth_gbs=_positive(d["memory_bandwidth_gbs"], f"{source}: memory_bandwidth_gbs"),
        launch_overhead_us=float(launch), sources=dict(sources), description=str(d.get("description", "")),
        kind=kind, threads=threads, source=source,
    )


def profile_from_yaml(path: str | Path) -> Profile:
    """Parse one profile file (a missing file or bad YAML is a one-line error naming it)."""
    return profile_from_dict(read_yaml(path) or {}, source=str(path))


PROFILES: Registry[Profile] = Registry("hardware profile")


def register_profile(profile: Profile, *, replace: bool = False) -> Profile:
    """Add a profile (from a file or the Python API) to the registry by its name."""
    return PROFILES.register(profile.name, profile, replace=replace)


def get_profile(name_or_path: str | Profile) -> Profile:
    """A registered profile by name, a YAML file by path, or a `Profile` passed through."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return profile_from_yaml(name_or_path)
    return PROFILES.get(name_or_path)


def _load_builtins() -> None:
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        p = profile_from_yaml(path)
        if p.name != path.stem:
            raise NasError(f"{path}: name '{p.name}' must match the file name '{path.stem}'")
        register_profile(p)


_load_builtins()


# ============================================================== roofline
@dataclass(frozen=True)
class OpLatency:
    """Roofline terms of one kernel, in microseconds."""

    name: str
    op_class: str
    ops: int  # FLOPs (2 per MAC) or elementwise operations
    bytes: int
    compute_us: float
    memory_us: float
    overhead_us: float

    @property
    def latency_us(self) -> float:
        return max(self.compute_us, self.memory_us) + self.overhead_us

    @property
    def bound(self) -> str:
        return "compute" if self.compute_us >= self.memory_us else "memory"


@dataclass(frozen=True)
class LayerLatency:
    """Predicted latency of one layer (stem, block i, head, classifier)."""

    index: int
    name: str
    latency_ms: float
    ops: tuple[OpLatency, ...] = ()
    source: str = "analytic"  # 'analytic' | 'lut'
    signature: str = ""


@dataclass(frozen=True)
class LatencyEstimate:
    """Predicted end-to-end latency with its per-layer breakdown. `method` says how it was obtained."""

    total_ms: float
    method: str  # 'analytic' | 'lut'
    profile: str
    precision: str
    runtime: str = ""
    constant_ms: float = 0.0
    layers: tuple[LayerLatency, ...] = field(default=())
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_ms": self.total_ms, "method": self.method, "profile": self.profile,
            "precision": self.precision, "runtime": self.runtime, "constant_ms": self.constant_ms,
            "note": self.note,
            "layers": [{"index": l.index, "name": l.name, "latency_ms": l.latency_ms, "source": l.source,
                        "signature": l.signature} for l in self.layers],
        }


def _prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def op_class(op: OpSpec) -> str | None:
    """The op class a kernel is charged to, or None when fused into its predecessor."""
    if op.kind in ("conv", "pwconv"):
        return "conv"
    if op.kind in ("dwconv", "dense"):
        return op.kind
    if op.kind in ("pool", "add", "mul"):
        return "elementwise"
    if op.kind in _FUSED:
        return None
    raise NasError(f"operator {op.name}: unknown kind '{op.kind}'")


def op_work(op: OpSpec) -> tuple[int, int, int]:
    """(operations, weight elements, activation elements moved) of one kernel at batch 1."""
    if op.kind in ("conv", "pwconv", "dwconv", "dense"):
        return 2 * op_macs(op), op_params(op), _prod(op.in_shape) + _prod(op.out_shape)
    if op.kind == "pool":
        return _prod(op.in_shape), 0, _prod(op.in_shape) + _prod(op.out_shape)
    if op.kind == "add":
        return _prod(op.out_shape), 0, 3 * _prod(op.out_shape)
    if op.kind == "mul":  # x * gate[c]: read x and the gate, write x
        return _prod(op.out_shape), 0, 2 * _prod(op.out_shape) + op.out_shape[-1]
    return 0, 0, 0


def op_latency(op: OpSpec, profile: Profile, precision: str | None = None) -> OpLatency | None:
    """Roofline latency of one operator; None for BatchNorm/activations (fused)."""
    cls = op_class(op)
    if cls is None:
        return None
    prec = profile.check_precision(precision)
    ops, weights, acts = op_work(op)
    nbytes = (weights + acts) * PRECISION_BYTES[prec]
    return OpLatency(
        name=op.name, op_class=cls, ops=ops, bytes=nbytes,
        compute_us=ops / (profile.peak(cls, prec) * 1e3),
        memory_us=nbytes / (profile.memory_bandwidth_gbs * 1e3),
        overhead_us=profile.launch_overhead_us,
    )


def analytic_latency(arch: Architecture, profile: str | Profile, precision: str | None = None) -> LatencyEstimate:
    """Roofline latency of `arch` on `profile`, per layer and in total (milliseconds).

    Args:
      arch: the architecture.
      profile: a profile name (see `PROFILES`), a YAML path, or a `Profile`.
      precision: e.g. 'fp32', 'int8'; default the profile's `default_precision`.

    Returns:
      A `LatencyEstimate` with `method='analytic'` and one `LayerLatency` per layer index
      of `search_spaces.graph.layer_names(arch)` (identity skip layers cost 0).

    Example:
      >>> analytic_latency(arch, "rpi4").total_ms
    """
    prof = get_profile(profile)
    prec = prof.check_precision(precision)
    names = layer_names(arch)
    per: list[list[OpLatency]] = [[] for _ in names]
    for op in network_ops(arch):
        lat = op_latency(op, prof, prec)
        if lat is not None:
            per[op.layer].append(lat)
    layers = tuple(
        LayerLatency(i, names[i], sum(o.latency_us for o in ops) / 1e3, tuple(ops)) for i, ops in enumerate(per)
    )
    return LatencyEstimate(total_ms=sum(l.latency_ms for l in layers), method="analytic", profile=prof.name,
                           precision=prec, layers=layers)
