"""Measured latency look-up tables (FBNet / ProxylessNAS style): calibrate, predict, validate.

Every layer a space can produce has a *signature* (block type, kernel, expansion, SE,
activation, channels in/out, stride, input resolution; plus stem and head entries).
`calibrate` builds a one-layer model per distinct signature, measures it on this machine at
batch 1 in a runtime (ONNX Runtime on the CPU by default, or jitted JAX), and stores the
medians in a JSON cache keyed by signature. Predicted latency of a network = slope x sum over
its layers of (layer time - the runtime's fixed per-call overhead, measured on a trivial model)
+ a constant; slope and constant are fitted (least squares) on 20 measured whole networks.

The cache records the machine (CPU model, core count) and library versions; loading one that
does not match raises `NasError` (recalibrate explicitly) - it is never used silently. It is
written atomically (temporary file + rename), also during calibration, so an interrupted run
leaves a valid, partial cache that the next run completes.

Runtimes run single-threaded (ONNX Runtime `intra_op_num_threads=1`): deployment targets serve
one stream per core, and on a shared machine multi-threaded timings depend on other load.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evaluators.hardware import LatencyEstimate, LayerLatency, analytic_latency, get_profile
from evaluators.onnx_export import random_variables
from search_spaces.architecture import Architecture, Layer
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.graph import conv_out, layer_names
from search_spaces.model import Block, ConvBN, build_model, input_shape
from search_spaces.space import SearchSpace, make_divisible

FORMAT = 2  # 2: activations exported as native ONNX ops (fuse_activations)
RUNTIMES = ("onnxruntime", "jax")
CALIBRATABLE = ("host",)  # calibrate() measures on this machine: only its own profile makes sense
CACHE_ENV = "COMPACT_NAS_CACHE_DIR"
REBUILD_EACH_PASS = ("onnxruntime",)  # runtimes timed with a fresh callable every pass (see measure_passes)
FIT_SAMPLES = 20  # whole networks measured to fit the slope and constant
ROUNDS = 10  # short timing windows per item per pass, spread over the pass (see measure_passes)
TIMING = f"min of medians, {ROUNDS} windows per pass"  # in the fingerprint: tables timed otherwise are stale
Progress = Callable[[int, int, str], None]


# ================================================================ signatures
@dataclass(frozen=True)
class LayerSig:
    """What a layer's latency depends on. `part` is 'stem', 'block' or 'head' (head conv + pool + classifier)."""

    part: str
    in_channels: int
    out_channels: int
    stride: int
    resolution: int  # input height = width
    block: str = ""
    kernel: int = 0
    expansion: float = 1
    se: float = 0.0
    act: str = ""
    classes: int = 0

    @property
    def identity(self) -> bool:
        """An identity skip: no operators, costs nothing, never measured."""
        return self.part == "block" and self.block == "skip" and self.stride == 1 and self.in_channels == self.out_channels

    def key(self) -> str:
        """Canonical string form, the cache key."""
        io = f"c{self.in_channels}>{self.out_channels}_s{self.stride}_r{self.resolution}"
        if self.part == "stem":
            return f"stem_k{self.kernel}_{self.act}_{io}"
        if self.part == "head":
            return f"head_{self.act}_{io}_n{self.classes}"
        layer = Layer(self.block, self.in_channels, self.out_channels, self.stride, self.kernel, self.expansion,
                      self.se, self.act)
        tok = layer.token().rsplit("_c", 1)[0] if self.block != "skip" else "skip"
        return f"{tok}_{io}"

    def in_shape(self) -> tuple[int, int, int]:
        return (self.resolution, self.resolution, self.in_channels)


def arch_signatures(arch: Architecture) -> list[LayerSig]:
    """One signature per layer index of `layer_names(arch)` (the classifier rides with the head: its
    entry is the last one and the head's carries both)."""
    r = arch.resolution
    sigs = [LayerSig("stem", arch.in_channels, arch.stem.channels, arch.stem.stride, r, kernel=arch.stem.kernel,
                     act=arch.stem.act)]
    r = conv_out(r, arch.stem.stride)
    for ly in arch.layers:
        sigs.append(LayerSig("block", ly.in_channels, ly.out_channels, ly.stride, r, ly.block, ly.kernel,
                             ly.expansion, ly.se, ly.act))
        r = conv_out(r, ly.stride)
    cin = arch.layers[-1].out_channels if arch.layers else arch.stem.channels
    sigs.append(LayerSig("head", cin, arch.head.channels, 1, r, act=arch.head.act, classes=arch.num_classes))
    return sigs


def space_signatures(space: SearchSpace | str) -> set[LayerSig]:
    """Every distinct layer signature any architecture of `space` can contain (without enumerating it)."""
    space = load_space(space) if isinstance(space, str) else space
    out: set[LayerSig] = set()
    for res in space.resolutions:
        for w in space.width_mults:
            def scale(c: int) -> int:
                return c if w == 1 else make_divisible(c * w, space.divisor)

            st = space.stem
            out.add(LayerSig("stem", space.in_channels, scale(st.channels), st.stride, res, kernel=st.kernel, act=st.act))
            r = conv_out(res, st.stride)
            prev = {scale(st.channels)}
            for stage in space.stages:
                outs = {scale(c) for c in stage.channels}
                for li, ops in enumerate(stage.layer_ops):
                    stride = stage.stride if li == 0 else 1
                    pairs = [(ci, co) for ci in prev for co in outs] if li == 0 else [(c, c) for c in outs]
                    for ci, co in pairs:
                        for op in ops:
                            sig = LayerSig("block", ci, co, stride, r, op.block, op.kernel, op.expansion, op.se, op.act)
                            if not sig.identity:
                                out.add(sig)
                    r = conv_out(r, stride)
                prev = outs
            for hc in space.head_channels:
                for ci in prev:
                    out.add(LayerSig("head", ci, hc, 1, r, act=space.head_act, classes=space.num_classes))
    return out


class LayerUnit(nn.Module):
    """A one-layer network for a signature (reuses the model's ConvBN / Block)."""

    sig: LayerSig
    impl: str = "reference"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        s = self.sig
        if s.part == "stem":
            return ConvBN(s.out_channels, "conv", s.kernel, s.stride, s.act, self.impl, name="stem")(x, train)
        if s.part == "block":
            layer = Layer(s.block, s.in_channels, s.out_channels, s.stride, s.kernel, s.expansion, s.se, s.act)
            return Block(layer, self.impl, name="layer")(x, train)
        x = ConvBN(s.out_channels, "pwconv", act=s.act, impl=self.impl, name="head")(x, train)
        return nn.Dense(s.classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


# ================================================================ runtimes and timing
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


def _check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise NasError(f"unknown runtime '{runtime}'; allowed: {', '.join(RUNTIMES)}")
    return runtime


def _ort_callable(model: Any, shape: Sequence[int]) -> Callable[[], Any]:
    from evaluators.onnx_export import ort_session

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


def unit_callable(sig: LayerSig, runtime: str) -> Callable[[], Any]:
    """A zero-argument callable that runs the one-layer model of `sig` once at batch 1.

    ONNX Runtime: exported from the reference (lax.conv) implementation with NCHW input and output
    (except the stem's input and the head's output), so its layout transposes cancel inside as
    they do between the layers of an exported network. JAX: the 'fast' implementation, jitted.
    """
    if runtime == "onnxruntime":
        from evaluators.onnx_export import function_to_onnx

        unit = LayerUnit(sig, "reference")
        variables = random_variables(unit, sig.in_shape())
        nchw_in, nchw_out = sig.part != "stem", sig.part != "head"
        model = function_to_onnx(lambda x: unit.apply(variables, x), sig.in_shape(), batch=1, nchw_in=nchw_in,
                                 nchw_out=nchw_out, name="unit")
        r, c = sig.resolution, sig.in_channels
        return _ort_callable(model, (1, c, r, r) if nchw_in else (1, r, r, c))
    unit = LayerUnit(sig, "fast")
    return _jax_callable(unit.apply, random_variables(unit, sig.in_shape()), (1, *sig.in_shape()))


def null_callable(runtime: str) -> Callable[[], Any]:
    """A trivial model: the runtime's fixed per-call cost, subtracted from every layer entry.

    ONNX Runtime: x + 1 on 8 values. JAX: a (16 x 8) by (8 x 8) matrix product, because XLA:CPU charges
    ~60 us once per executable that contains any dot (measured: 1, 2, 5 and 10 chained tiny
    dots all cost ~66-72 us, an add alone ~8 us), which every network and every layer pays once.
    """
    if runtime == "onnxruntime":
        from evaluators.onnx_export import function_to_onnx

        return _ort_callable(function_to_onnx(lambda x: x + 1.0, (1, 1, 8), batch=1, name="null"), (1, 1, 1, 8))
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    return _jax_callable(lambda v, x: jnp.einsum("nhwc,cd->nhwd", x, v), w, (1, 4, 4, 8))


def arch_callable(arch: Architecture, runtime: str, variables: Any = None) -> Callable[[], Any]:
    """A zero-argument callable that runs the whole network once at batch 1 in `runtime`."""
    _check_runtime(runtime)
    impl = "reference" if runtime == "onnxruntime" else "fast"
    net = build_model(arch, impl)
    if variables is None:
        variables = random_variables(net, input_shape(arch)[1:])
    if runtime == "onnxruntime":
        from evaluators.onnx_export import to_onnx

        return _ort_callable(to_onnx(arch, variables, batch=1), input_shape(arch))
    return _jax_callable(lambda v, x: net.apply(v, x, train=False), variables, input_shape(arch))


def measure_latency_ms(arch: Architecture, runtime: str = "onnxruntime", *, budget_s: float = 0.3) -> float:
    """Measured end-to-end latency of `arch` on this machine (batch 1, median, single thread)."""
    return median_ms(arch_callable(arch, runtime), budget_s=budget_s)


# ================================================================ cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(runtime: str) -> dict[str, Any]:
    """What a measurement depends on besides the layer: machine, library versions, runtime settings."""
    _check_runtime(runtime)
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
    return fp


def default_cache_path(profile: str = "host", runtime: str = "onnxruntime") -> Path:
    """`$COMPACT_NAS_CACHE_DIR/latency-<profile>-<runtime>.json`, default dir `~/.cache/compact-nas`."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compact-nas")
    return base / f"latency-{profile}-{_check_runtime(runtime)}.json"


@dataclass
class LatencyTable:
    """Measured per-layer latencies (raw medians, ms) for one profile and runtime, plus the fitted slope and constant per space."""

    profile: str
    runtime: str
    fingerprint: dict[str, Any]
    null_ms: float = 0.0
    entries: dict[str, float] = field(default_factory=dict)
    constants: dict[str, float] = field(default_factory=dict)  # per space name, ms
    path: Path | None = None
    scales: dict[str, float] = field(default_factory=dict)  # per space name, fitted slope on the layer sum

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
                               precision="fp32", runtime=self.runtime, constant_ms=c, layers=tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "profile": self.profile, "runtime": self.runtime, "fingerprint": self.fingerprint,
                "null_ms": self.null_ms, "constants": self.constants, "scales": self.scales,
                "entries": dict(sorted(self.entries.items()))}

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (temporary file in the same directory, fsync, rename)."""
        path = Path(path or self.path or default_cache_path(self.profile, self.runtime))
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
               check_machine: bool = True) -> LatencyTable:
    """Read a cache file; NasError when it is corrupt, for another profile/runtime, or stale
    (measured on another machine or with other library versions, when `check_machine`)."""
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
    if check_machine:
        _check_runtime(d["runtime"])
        here = fingerprint(d["runtime"])
        for k in sorted(set(here) | set(d["fingerprint"])):
            if d["fingerprint"].get(k) != here.get(k):
                raise NasError(f"{path}: stale latency table: {k} = {d['fingerprint'].get(k)!r} when measured, "
                               f"{here.get(k)!r} here; {hint}")
    return LatencyTable(d["profile"], d["runtime"], d["fingerprint"], float(d["null_ms"]),
                        {k: float(v) for k, v in d["entries"].items()},
                        {k: float(v) for k, v in d["constants"].items()}, path,
                        {k: float(v) for k, v in scales.items()})


# ================================================================ calibrate
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
              budget_s: float = 0.15, passes: int = 3) -> LatencyTable:
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

    Returns:
      The `LatencyTable` (also saved). Re-running reuses every entry already in the cache.

    Example:
      >>> table = calibrate("mobile_small")
      >>> table.predict(arch).total_ms
    """
    space = _space(space)
    _check_runtime(runtime)
    fresh = runtime in REBUILD_EACH_PASS
    get_profile(profile)
    if profile not in CALIBRATABLE:
        raise NasError(f"profile '{profile}': calibrate() measures this machine; allowed: {', '.join(CALIBRATABLE)} "
                       f"(run it on the device itself)")
    path = Path(cache_path) if cache_path else default_cache_path(profile, runtime)
    table = None
    if path.exists():
        try:
            table = load_table(path, profile=profile, runtime=runtime)
        except NasError:
            if not recalibrate:
                raise
    if table is None:
        table = LatencyTable(profile, runtime, fingerprint(runtime), path=path)
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

    measure_passes([lambda s=s: unit_callable(s, runtime) for s in todo], passes, budget_s, record, rebuild=fresh)
    if refit:
        measured = measure_passes([lambda a=a: arch_callable(a, runtime) for a in fit], passes, 2 * budget_s,
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


# ================================================================ predict
_LOADED: dict[tuple[str, int, int], LatencyTable] = {}


def _cached_table(path: Path, profile: str, runtime: str) -> LatencyTable:
    if not path.is_file():
        return load_table(path, profile=profile, runtime=runtime)  # raises 'not found'
    st = path.stat()
    k = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if k not in _LOADED:
        _LOADED[k] = load_table(path, profile=profile, runtime=runtime)
    return _LOADED[k]


def latency_breakdown(arch: Architecture, profile_name: str = "host", *, lut_path: str | Path | None = None,
                      runtime: str = "onnxruntime", precision: str | None = None) -> LatencyEstimate:
    """Predicted latency of `arch` on a profile, per layer, from the LUT when one applies, else analytic.

    The LUT is used when a calibrated table exists for (profile, runtime) - `lut_path`, or the
    default cache - and covers every layer of `arch`; `.method` says which predictor was used and
    `.note` why the LUT was not. A stale or corrupt table raises NasError (never used silently).
    """
    _check_runtime(runtime)
    prof = get_profile(profile_name)
    path = Path(lut_path) if lut_path else default_cache_path(prof.name, runtime)
    note = ""
    if (lut_path or prof.name in CALIBRATABLE) and (precision in (None, "fp32")):
        if path.exists() or lut_path:
            table = _cached_table(path, prof.name, runtime)
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
    from evaluators.hardware import PROFILES

    out: dict[str, Any] = {}
    for name in profiles if profiles is not None else PROFILES.names():
        est = latency_breakdown(arch, name, runtime=runtime)
        out[f"latency_ms@{name}"] = est.total_ms
        out[f"latency_method@{name}"] = est.method
    return out


# ================================================================ validate
def rank_metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Kendall's tau, Spearman's rho, MAPE (%) and the fraction within +-10% of measured."""
    from scipy.stats import kendalltau, spearmanr

    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(p - m) / m
    return {"kendall_tau": float(kendalltau(p, m).statistic), "spearman": float(spearmanr(p, m).statistic),
            "mape": float(100 * rel.mean()), "within_10pct": float((rel <= 0.10).mean())}


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load averages (what `uptime` prints)."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def validate(space: SearchSpace | str, profile: str = "host", runtime: str = "onnxruntime", n: int = 50, *,
             cache_path: str | Path | None = None, seed: int = 1, calibrate_missing: bool = True,
             progress: Progress | None = None, budget_s: float = 0.3, passes: int = 3) -> dict[str, Any]:
    """Measure `n` sampled architectures end to end and score both predictors against them.

    Each architecture is timed in `passes` passes over the whole sample (minimum of the medians).

    Returns:
      {"analytic": {...}, "lut": {"kendall_tau", "spearman", "mape", "within_10pct"},
       "meta": {space, profile, runtime, n, load_before, load_after, seconds, calibration_seconds},
       "samples": [{"key", "measured_ms", "analytic_ms", "lut_ms"}, ...]}
      The analytic predictor is the roofline of `profile`; the LUT is the calibrated table
      (layers missing from it are calibrated first when `calibrate_missing`).
    """
    space = _space(space)
    _check_runtime(runtime)
    t0 = time.monotonic()
    load_before = load_average()
    path = Path(cache_path) if cache_path else default_cache_path(profile, runtime)
    table = load_table(path, profile=profile, runtime=runtime) if path.exists() else None
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
            table = calibrate(space, profile, runtime, cache_path=path, archs=archs, progress=progress)
            t_cal = time.monotonic() - t1
    count = iter(range(1, passes * len(archs) + 1))
    measured = measure_passes([lambda a=a: arch_callable(a, runtime) for a in archs], passes, budget_s,
                              lambda i, ms: progress and progress(next(count), passes * len(archs),
                                                                  f"measure {archs[i].key}"),
                              rebuild=runtime in REBUILD_EACH_PASS)
    samples = [{"key": a.key, "measured_ms": m, "analytic_ms": analytic_latency(a, profile).total_ms,
                "lut_ms": table.predict(a).total_ms if table.covers(a) else float("nan")}
               for a, m in zip(archs, measured)]
    meas = [s["measured_ms"] for s in samples]
    lut_ok = [s for s in samples if not math.isnan(s["lut_ms"])]
    return {
        "analytic": rank_metrics([s["analytic_ms"] for s in samples], meas),
        "lut": rank_metrics([s["lut_ms"] for s in lut_ok], [s["measured_ms"] for s in lut_ok]) if len(lut_ok) > 2
        else None,
        "meta": {"space": space.name, "profile": profile, "runtime": runtime, "n": len(samples),
                 "load_before": list(load_before), "load_after": list(load_average()),
                 "seconds": time.monotonic() - t0, "calibration_seconds": t_cal, "cache": str(path)},
        "samples": samples,
    }
