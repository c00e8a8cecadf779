"""ONNX fp32 -> int8 with ONNX Runtime's static post-training quantization (QDQ, per-channel weights).

`quantize_static_int8(fp32, out, calibration)`: `quant_pre_process` first (folds BatchNorm into
the convolutions and infers shapes; quantizing without it keeps BN in float),
then `quantize_static` in QDQ format with per-output-channel symmetric int8 weights and uint8
activations calibrated on `calibration` images (percentile ranges by default), then `compact`.

Where the bytes of a compact int8 file go (mobile_small, 21k-86k params): per output channel,
ONNX Runtime's default QDQ stores the weight scale (fp32) and zero point (int8), and for the bias
int32 values, a scale (fp32) and a zero point (int32): 17 bytes a channel, as much as the int8
weights themselves for a 3x3 depthwise layer. So biases stay float (`QuantizeBias: False`: ONNX
Runtime still fuses every Conv into QLinearConv and quantizes the bias itself at load time),
all-zero zero points of constant DequantizeLinear inputs are dropped (optional in ONNX, default
0 of the input's type: same results), `pack_float16` stores weight scales and biases as float16
(folded back to float32 when ONNX Runtime loads the model), and `compact` keeps one copy of each
repeated scalar and drops `value_info`, default Conv attributes, empty doc strings, unused opset
domains and long generated names. Together: 2.5-3.1x -> 3.6-3.9x smaller than fp32
(`benchmarks/export.py`).

Weights are int8 in [-127, 127] ('full') or, with `weight_range='reduced'`, in [-64, 64] (ONNX
Runtime's `reduce_range`). The reduced range exists for x86-64 CPUs without VNNI (AVX2, AVX-512
without VNNI): there ONNX Runtime's uint8 x int8 convolutions multiply with `vpmaddubsw`, which adds
two u8 x s8 products into a *saturating* int16, so 255 x 127 x 2 overflows and the int8 model
computes something else than its QDQ graph says. With 7-bit weights the pair sum stays below
2^15. Measured on an AMD EPYC (AVX2, no VNNI), a QAT network on mnist5k: ONNX Runtime's optimised
int8 model agreed with the fake-quantized network on 97.7-97.9% of the test images with full-range
weights (largest logit difference 2.8), and on 99.7% with reduced ones (0.40); its unoptimised QDQ
graph agreed on 99.9% in both cases (`docs/compress.md`). `weight_range_for_cpu` says which one a
CPU needs; 'auto' in the configs means that one, for the machine that quantizes. The export's
post-training int8 defaults to 'full' (7-bit weights cost it as much as saturation does), `nas
compress --qat` to 'auto' (it trains on the grid it ships).

Dynamic quantization is not offered: it made these conv nets 3-6x slower than
float32 in ONNX Runtime (measured at batch 1 on the development machine).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from search_spaces.errors import NasError

ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_MAX = {"full": 127.0, "reduced": 64.0}  # int8 weights in [-127, 127] / [-64, 64] (ONNX Runtime's reduce_range)
WEIGHT_RANGES = tuple(WEIGHT_MAX)
WEIGHT_RANGE_CHOICES = ("auto", *WEIGHT_RANGES)  # what configs and the CLI accept ('auto': `weight_range_for_cpu`)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products into int32: no int16 saturation


def weight_range_for_cpu(flags: Sequence[str] | None = None, machine: str | None = None) -> str:
    """'reduced' where ONNX Runtime's uint8 x int8 kernels saturate (x86-64 without VNNI), else 'full'.

    `flags` are the CPU's feature flags (default: /proc/cpuinfo's; on an x86-64 machine without
    /proc/cpuinfo, 'reduced', the range that is exact everywhere); `machine` is `platform.machine()`.
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "full"
    if flags is None:
        try:
            line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
            flags = line.split(":", 1)[1].split()
        except (OSError, StopIteration):
            return "reduced"
    return "full" if any(f in VNNI_FLAGS for f in flags) else "reduced"


def resolve_weight_range(choice: str) -> str:
    """'full' or 'reduced' for a config's 'auto' | 'full' | 'reduced' ('auto': `weight_range_for_cpu()`)."""
    if choice not in WEIGHT_RANGE_CHOICES:
        raise NasError(f"int8: weight range '{choice}'; allowed: {', '.join(WEIGHT_RANGE_CHOICES)}")
    return weight_range_for_cpu() if choice == "auto" else choice


def weight_max(weight_range: str) -> float:
    """The largest int8 weight step of 'full' (127) or 'reduced' (64); a one-line error for anything else."""
    if weight_range not in WEIGHT_MAX:
        raise NasError(f"int8: weight range '{weight_range}'; allowed: {', '.join(WEIGHT_RANGES)}")
    return WEIGHT_MAX[weight_range]


@dataclass(frozen=True)
class RangeHints:
    """Activation ranges to use instead of calibrated ones (quantization-aware training's): every
    float tensor of the model whose values on `rows` have the signature `signatures[i]` (mean, std,
    min, max: the same whatever the layout) is quantized over `ranges[i]`. Matching by values, not by
    names, keeps the export's and ONNX Runtime's tensor names out of the trainer."""

    rows: np.ndarray
    signatures: Sequence[np.ndarray]
    ranges: Sequence[tuple[float, float]]


def value_signature(t: Any) -> np.ndarray:
    """(mean, std, min, max) of a tensor: what `RangeHints` matches tensors by."""
    t = np.asarray(t, np.float64)
    return np.array([t.mean(), t.std(), t.min(), t.max()])


def _range_overrides(model: "onnx.ModelProto", hints: RangeHints, rtol: float = 1e-3) -> tuple[dict, int]:
    """ONNX Runtime `TensorQuantOverrides` {tensor: [{rmin, rmax}]} for the float tensors of `model`
    matching a hint, and how many hints matched at least one tensor."""
    import onnx
    from onnxruntime import InferenceSession

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    consts = {t.name for t in model.graph.initializer}
    names = [model.graph.input[0].name] + [o for n in model.graph.node for o in n.output
                                          if o in floats and o not in consts]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in dict.fromkeys(names) if t not in have)
    sess = InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    values = dict(zip(outs, sess.run(outs, {model.graph.input[0].name: np.asarray(hints.rows, np.float32)})))
    values[model.graph.input[0].name] = np.asarray(hints.rows, np.float32)
    sigs = {t: value_signature(v) for t, v in values.items() if t in names}
    overrides: dict[str, list[dict[str, Any]]] = {}
    matched = 0
    for sig, (lo, hi) in zip(hints.signatures, hints.ranges):
        hit = [t for t, s in sigs.items() if np.all(np.abs(s - sig) <= rtol * (1 + np.abs(sig)))]
        matched += bool(hit)
        for t in hit:
            overrides[t] = [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(max(hi, 0.0))}]
    return overrides, matched


def _reader(name: str, x: np.ndarray, batch: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(x), batch))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {name: np.ascontiguousarray(x[i:i + batch], np.float32)}

        def rewind(self) -> None:
            self._it = iter(range(0, len(x), batch))

    return Reader()


def _has_subgraphs(g: "onnx.GraphProto") -> bool:
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute)


def drop_zero_points(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Remove all-zero zero points of DequantizeLinear nodes whose input is a constant (the
    symmetric weights' and the biases'): the input is optional and defaults to 0 of the input's
    type, so the results are identical."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if (n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[0] in inits
                and n.input[2] in inits and not numpy_helper.to_array(inits[n.input[2]]).any()):
            del n.input[2]
    if _has_subgraphs(g):
        return model  # subgraphs may read outer initializers: keep them all
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model


def pack_float16(model: "onnx.ModelProto", *, rtol: float = 1e-3) -> "onnx.ModelProto":
    """Store the per-channel float constants (weight scales of DequantizeLinear, Conv/Gemm biases)
    as float16, all in one initializer, expanded back by one Cast and one Split.

    ONNX Runtime folds Cast and Split of constants at session load (graph optimisation level 1,
    before its QDQ fusions at level 2), so the session sees float32 initializers as before and
    still runs every Conv as QLinearConv. A tensor whose float16 round trip is off by more than
    `rtol` relatively (float16 overflow or subnormal range) stays float32. Saves 4 bytes per
    output channel, the size of the int8 weights of a 2x2 depthwise filter.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    if _has_subgraphs(g):
        return model
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list[tuple[Any, int]]] = {}
    for n in g.node:
        for k, name in enumerate(n.input):
            users.setdefault(name, []).append((n, k))

    graph_inputs = {v.name for v in g.input}

    def per_channel(name: str) -> bool:  # used only as a constant weight's scale or as a bias
        t = inits.get(name)
        if (t is None or name in graph_inputs or t.data_type != onnx.TensorProto.FLOAT
                or len(t.dims) != 1 or t.dims[0] < 2):
            return False
        return all((n.op_type == "DequantizeLinear" and k == 1 and n.input[0] in inits)
                   or (n.op_type in ("Conv", "Gemm") and k == 2) for n, k in users.get(name, []))

    names, parts = [], []
    for name in [t.name for t in g.initializer if per_channel(t.name)]:
        x = numpy_helper.to_array(inits[name])
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        if np.all(np.abs(h.astype(np.float32) - x) <= rtol * np.abs(x)):
            names.append(name)
            parts.append(h)
    if len(names) < 2:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    taken = set(inits) | set(users) | graph_inputs | {o for n in g.node for o in n.output} | {v.name for v in g.output}
    packed, sizes = _unique(taken, "packed_f16", ("", "_f32", "_sizes")), [len(p) for p in parts]
    moved = set(names)
    kept = [t for t in g.initializer if t.name not in moved]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.initializer.append(numpy_helper.from_array(np.concatenate(parts), packed))
    cast = helper.make_node("Cast", [packed], [packed + "_f32"], to=onnx.TensorProto.FLOAT)
    if opset >= 13:
        g.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), packed + "_sizes"))
        split = helper.make_node("Split", [packed + "_f32", packed + "_sizes"], names, axis=0)
    else:
        split = helper.make_node("Split", [packed + "_f32"], names, axis=0, split=sizes)
    g.node.insert(0, split)
    g.node.insert(0, cast)
    return model


def _unique(taken: set[str], name: str, suffixes: tuple[str, ...] = ("",)) -> str:
    """`name`, lengthened until no name + suffix is taken."""
    while any(name + s in taken for s in suffixes):
        name += "_"
    return name


def compact(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Drop `value_info`, doc strings, node names, opset imports of domains no node uses and Conv
    attributes equal to their defaults; keep one initializer per distinct scalar (activation
    scales and zero points repeat); give internal tensors short names (graph inputs and outputs
    keep theirs). Same graph, same results, smaller file."""
    from onnx import numpy_helper

    g = model.graph
    del g.value_info[:]
    g.ClearField("doc_string")
    model.ClearField("doc_string")
    if _has_subgraphs(g):
        return model  # subgraphs see outer names: leave the names alone
    domains = {n.domain for n in g.node} | {""}
    kept = [o for o in model.opset_import if o.domain in domains]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names):x}"
        return names[name]

    # one initializer per distinct scalar (activation scales and zero points repeat)
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    kept = []
    for t in g.initializer:
        if len(t.dims) <= 1 and math.prod(t.dims) <= 1 and t.name not in keep:
            k = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            if k in first:
                alias[t.name] = first[k]
                continue
            first[k] = t.name
        kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    for t in g.initializer:
        t.name = short(t.name)
        t.ClearField("doc_string")
    for n in g.node:
        n.ClearField("name")
        n.ClearField("doc_string")
        n.input[:] = [short(alias.get(s, s)) for s in n.input]
        n.output[:] = [short(s) for s in n.output]
        if n.op_type == "Conv" and n.domain in ("", "ai.onnx"):
            kept_attrs = [a for a in n.attribute if not _conv_default(a)]
            del n.attribute[:]
            n.attribute.extend(kept_attrs)
    return model


def _conv_default(a: "onnx.AttributeProto") -> bool:
    """A Conv attribute equal to its ONNX default (dilations/strides all 1, pads all 0, group 1)."""
    if a.name in ("dilations", "strides"):
        return all(v == 1 for v in a.ints)
    if a.name == "pads":
        return not any(a.ints)
    if a.name == "group":
        return a.i == 1
    return a.name == "auto_pad" and a.s in (b"", b"NOTSET")


def squeeze_excite_nodes(model: "onnx.ModelProto") -> list[str]:
    """Names of the nodes of every squeeze-and-excite path: from a ReduceMean or GlobalAveragePool
    forward to the Mul that gates the block's features with its result (the pool, both dense
    layers, their activations, the broadcast shape arithmetic and the gating Mul)."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names: set[str] = set()
    for start in model.graph.node:
        if start.op_type not in ("ReduceMean", "GlobalAveragePool"):
            continue
        path, stack, seen = [], [start], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            path.append(n)
            if n.op_type != "Mul":  # the gate ends the path
                stack.extend(c for o in n.output for c in consumers.get(o, []))
        if any(n.op_type == "Mul" for n in path) and not any(n.op_type in ("Conv", "Add") for n in path):
            names |= {n.name for n in path}  # a head's pool leads to the classifier, not to a gate
    return sorted(names)


def quantize_static_int8(fp32: str | os.PathLike, out: str | os.PathLike, calibration: np.ndarray, *,
                         activation_type: str = "uint8", method: str = "percentile", batch: int = 32,
                         float_se: bool = False, range_hints: RangeHints | None = None,
                         weight_range: str = "full") -> dict[str, Any]:
    """Statically quantize an fp32 ONNX model to int8 (QDQ, per-channel weights).

    Args:
      fp32: path of the fp32 model (one input, e.g. from `evaluators.onnx_export.to_onnx`).
      out: where to write the int8 model.
      calibration: input rows (e.g. N normalised training images), fed in batches of `batch`.
      activation_type: 'uint8' (default: ONNX Runtime's fast U8S8 path on x86) or 'int8'.
      method: calibration method: 'percentile' (default; clips the 0.001% tails: on mnist5k winners
        it lost 0.5-0.8 points where 'minmax' lost 0.9-1.5), 'minmax' or 'entropy'.
      batch: calibration batch size (the model needs a dynamic or matching batch dimension).
      float_se: keep every squeeze-and-excite path in float (`squeeze_excite_nodes`): no Q/DQ pairs
        around its pool, dense layers and gates, fp32 SE weights (a bigger file).
      range_hints: activation ranges to keep instead of calibrating them (`RangeHints`: the ranges a
        quantization-aware training trained with); tensors no hint matches are calibrated.
      weight_range: 'full' (int8 weights in [-127, 127]) or 'reduced' ([-64, 64]: exact on x86-64
        CPUs without VNNI, see the module docstring and `weight_range_for_cpu`).

    Returns:
      {"format": "QDQ", "per_channel": True, "weight_type", "weight_range", "activation_type",
       "calibration_method", "calibration_images", "float_se", "bytes"}, and with `range_hints`
      "ranges_carried" (hints matched) and "ranges_hinted".

    Raises:
      NasError: bad arguments, or ONNX Runtime failed to pre-process or quantize (one line).

    Example:
      >>> quantize_static_int8("model.onnx", "model.int8.onnx", data.x_train[:256])
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    if activation_type not in ACTIVATION_TYPES:
        raise NasError(f"int8: activation type '{activation_type}'; allowed: {', '.join(ACTIVATION_TYPES)}")
    if method not in CALIBRATION_METHODS:
        raise NasError(f"int8: calibration method '{method}'; allowed: {', '.join(CALIBRATION_METHODS)}")
    weight_max(weight_range)
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim < 1 or len(calibration) == 0:
        raise NasError("int8: no calibration images")
    fp32, out = Path(fp32), Path(out)
    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    act = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="quant-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        try:
            # ONNX shape inference handles the symbolic batch; ORT's symbolic one would import
            # onnxruntime.tools, which imports torch when installed (+7 s) for nothing here
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # ORT raises many types; keep the first line
            raise NasError(f"int8: quant_pre_process failed: {_first_line(e)}") from None
        exclude: list[str] = []
        if float_se:  # nodes are excluded by name: name the unnamed ones (inlined HardSwish) first
            model = onnx.load(str(pre))
            taken = {n.name for n in model.graph.node}
            for k, n in enumerate(model.graph.node):
                if not n.name:
                    n.name = _unique(taken, f"{n.op_type}_{k}")
                    taken.add(n.name)
            onnx.save(model, str(pre))
            exclude = squeeze_excite_nodes(model)
        overrides: dict[str, Any] = {}
        if range_hints is not None:
            overrides, carried = _range_overrides(onnx.load(str(pre)), range_hints)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print progress
                quantize_static(str(pre), str(q), _reader(name, calibration, batch), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=act, weight_type=QuantType.QInt8,
                                calibrate_method=calib, nodes_to_exclude=exclude,
                                reduce_range=weight_range == "reduced",
                                extra_options={"WeightSymmetric": True, "QuantizeBias": False,
                                               **({"TensorQuantOverrides": overrides} if overrides else {})})
        except Exception as e:
            raise NasError(f"int8: quantize_static failed: {_first_line(e)}") from None
        model = compact(pack_float16(drop_zero_points(onnx.load(str(q)))))
    onnx.save(model, str(out))
    info = {"format": "QDQ", "per_channel": True, "weight_type": "int8", "weight_range": weight_range,
            "activation_type": activation_type, "calibration_method": method,
            "calibration_images": int(len(calibration)), "float_se": float_se, "bytes": out.stat().st_size}
    if range_hints is not None:
        info.update(ranges_carried=carried, ranges_hinted=len(range_hints.ranges))
    return info


def quantize_model_int8(model: "onnx.ModelProto", calibration: np.ndarray, *, method: str = "minmax",
                        batch: int = 32, weight_range: str = "full") -> "onnx.ModelProto":
    """`quantize_static_int8` of an in-memory fp32 model (through a temporary folder), returning the
    int8 QDQ model: the same quantization the export ships, for timing a model as it will run."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        quantize_static_int8(src, dst, calibration, method=method, batch=batch, weight_range=weight_range)
        return onnx.load(str(dst))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
