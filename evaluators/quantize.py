"""ONNX fp32 -> int8 with ONNX Runtime's static post-training quantization (QDQ, per-channel weights).

`quantize_static_int8(fp32, out, calibration)`: `quant_pre_process` first (folds BatchNorm into
the convolutions and infers shapes; PLATFORM-NOTES: quantizing without it keeps BN in float),
then `quantize_static` in QDQ format with per-output-channel symmetric int8 weights and uint8
activations calibrated on `calibration` images (percentile ranges by default), then `compact`.

Where the bytes of a compact int8 file go (mobile_small, 21k-86k params): per output channel,
ONNX Runtime's default QDQ stores the weight scale (fp32) and zero point (int8), and for the bias
int32 values, a scale (fp32) and a zero point (int32): 17 bytes a channel, as much as the int8
weights themselves for a 3x3 depthwise layer. So biases stay fp32 (`QuantizeBias: False`: ONNX
Runtime still fuses every Conv into QLinearConv and quantizes the bias itself at load time),
all-zero zero points of constant DequantizeLinear inputs are dropped (optional in ONNX, default
0 of the input's type: same results), and `compact` drops `value_info`, empty doc strings,
unused opset domains and long generated names. Together: 2.5-3.1x -> 3.1-3.6x smaller than fp32.

Dynamic quantization is not offered: it made these conv nets 3-6x slower (PLATFORM-NOTES).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.errors import NasError

ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


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


def compact(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Drop `value_info`, doc strings, node names and opset imports of domains no node uses, and
    give internal tensors short names (graph inputs and outputs keep theirs). Same graph, same
    results, smaller file."""
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

    for t in g.initializer:
        t.name = short(t.name)
        t.ClearField("doc_string")
    for n in g.node:
        n.ClearField("name")
        n.ClearField("doc_string")
        n.input[:] = [short(s) for s in n.input]
        n.output[:] = [short(s) for s in n.output]
    return model


def quantize_static_int8(fp32: str | os.PathLike, out: str | os.PathLike, calibration: np.ndarray, *,
                         activation_type: str = "uint8", method: str = "percentile", batch: int = 32) -> dict[str, Any]:
    """Statically quantize an fp32 ONNX model to int8 (QDQ, per-channel weights).

    Args:
      fp32: path of the fp32 model (one input, e.g. from `evaluators.onnx_export.to_onnx`).
      out: where to write the int8 model.
      calibration: input rows (e.g. N normalised training images), fed in batches of `batch`.
      activation_type: 'uint8' (default: ONNX Runtime's fast U8S8 path on x86) or 'int8'.
      method: calibration method: 'percentile' (default; clips the 0.001% tails: on mnist5k winners
        it lost 0.5-0.8 points where 'minmax' lost 0.9-1.5), 'minmax' or 'entropy'.
      batch: calibration batch size (the model needs a dynamic or matching batch dimension).

    Returns:
      {"format": "QDQ", "per_channel": True, "weight_type", "activation_type", "calibration_method",
       "calibration_images", "bytes"}.

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
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print progress
                quantize_static(str(pre), str(q), _reader(name, calibration, batch), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=act, weight_type=QuantType.QInt8,
                                calibrate_method=calib,
                                extra_options={"WeightSymmetric": True, "QuantizeBias": False})
        except Exception as e:
            raise NasError(f"int8: quantize_static failed: {_first_line(e)}") from None
        model = compact(drop_zero_points(onnx.load(str(q))))
    onnx.save(model, str(out))
    return {"format": "QDQ", "per_channel": True, "weight_type": "int8", "activation_type": activation_type,
            "calibration_method": method, "calibration_images": int(len(calibration)),
            "bytes": out.stat().st_size}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
