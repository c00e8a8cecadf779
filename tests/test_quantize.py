"""Static int8 quantization: what the compact file keeps, and that ONNX Runtime still runs it as int8."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from evaluators import quantize as Q
from evaluators.onnx_export import arch_variables, ort_session, run, to_onnx
from search_spaces.catalog import load_space

KEY = "100-0114-0100-0"  # mobile_small: depthwise, inverted bottlenecks with SE, a residual


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    arch = load_space("mobile_small").decode(KEY)
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    onnx.save(to_onnx(arch, arch_variables(arch)), str(path))
    x = np.random.default_rng(0).standard_normal((48, arch.resolution, arch.resolution, arch.in_channels)).astype(np.float32)
    return path, x


def _quantize(path, x, out):
    Q.quantize_static_int8(path, out, x[:32], method="minmax")
    return out


def test_dropping_zero_points_changes_no_output_and_saves_bytes(fp32, tmp_path, monkeypatch):
    path, x = fp32
    small = _quantize(path, x, tmp_path / "small.onnx")
    monkeypatch.setattr(Q, "drop_zero_points", lambda m: m)
    full = _quantize(path, x, tmp_path / "full.onnx")
    assert small.stat().st_size < full.stat().st_size
    np.testing.assert_array_equal(run(ort_session(str(small)), x), run(ort_session(str(full)), x))
    g = onnx.load(str(small)).graph
    consts = {t.name for t in g.initializer}
    assert not [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in consts and len(n.input) == 3]


def test_every_conv_still_runs_as_qlinearconv(fp32, tmp_path):
    """Float biases and dropped zero points must not stop ONNX Runtime's QDQ -> QLinearConv fusion."""
    path, x = fp32
    q = _quantize(path, x, tmp_path / "q.onnx")
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert convs > 0 and ops.count("QLinearConv") == convs and "Conv" not in ops


def test_compact_keeps_only_used_opset_domains_and_no_names(fp32, tmp_path):
    path, x = fp32
    m = onnx.load(str(_quantize(path, x, tmp_path / "q.onnx")))
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"} | {n.domain for n in m.graph.node}
    assert not any(n.name or n.doc_string for n in m.graph.node) and not m.graph.value_info
