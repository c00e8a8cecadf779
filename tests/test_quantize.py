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


def _unpacked(path, x, out, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(Q, "pack_float16", lambda model: model)
        return _quantize(path, x, out)


def test_float16_packing_keeps_the_outputs_and_saves_four_bytes_a_channel(fp32, tmp_path, monkeypatch):
    path, x = fp32
    packed, full = _quantize(path, x, tmp_path / "packed.onnx"), _unpacked(path, x, tmp_path / "full.onnx", monkeypatch)
    g = onnx.load(str(full)).graph
    scales = {n.input[1] for n in g.node if n.op_type == "DequantizeLinear"}
    channels = sum(int(np.prod(t.dims)) for t in g.initializer if t.name in scales and len(t.dims) == 1 and t.dims[0] > 1)
    assert channels > 100
    assert full.stat().st_size - packed.stat().st_size >= 4 * channels - 600  # 2 + 2 bytes a channel, minus 2 nodes
    a, b, f = run(ort_session(str(packed)), x), run(ort_session(str(full)), x), run(ort_session(str(path)), x)
    # float16 constants move a few activations by one int8 step: far less than int8 itself moves them
    # (random weights and inputs: near-tied logits; accuracy on real data is in benchmarks/export.py)
    same = lambda u, v: (u.argmax(-1) == v.argmax(-1)).mean()  # noqa: E731
    assert np.abs(a - b).mean() <= 0.25 * np.abs(b - f).mean() and same(a, b) >= same(b, f)
    ops = [n.op_type for n in onnx.load(str(packed)).graph.node]
    assert ops[:2] == ["Cast", "Split"] and ops.count("Cast") == 1


def test_a_constant_float16_cannot_hold_stays_float32(fp32, tmp_path, monkeypatch):
    path, x = fp32
    m = onnx.load(str(_unpacked(path, x, tmp_path / "full.onnx", monkeypatch)))
    g = m.graph
    bias = next(n.input[2] for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3)
    t = next(t for t in g.initializer if t.name == bias)
    big = onnx.numpy_helper.to_array(t).copy()
    big[0] = 1e6  # beyond float16's 65504
    t.CopyFrom(onnx.numpy_helper.from_array(big, bias))
    packed = Q.pack_float16(m)
    kept = {t.name: t for t in packed.graph.initializer}
    assert kept[bias].data_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in kept.values())


def test_compact_changes_no_output_and_keeps_one_copy_of_each_scalar(fp32, tmp_path, monkeypatch):
    path, x = fp32
    small = _quantize(path, x, tmp_path / "small.onnx")
    with monkeypatch.context() as m:
        m.setattr(Q, "compact", lambda model: model)
        full = _quantize(path, x, tmp_path / "full.onnx")
    np.testing.assert_array_equal(run(ort_session(str(small)), x), run(ort_session(str(full)), x))
    g = onnx.load(str(small)).graph
    scalars = [onnx.numpy_helper.to_array(t) for t in g.initializer if np.prod(t.dims) <= 1]
    assert len({(a.dtype.str, a.tobytes()) for a in scalars}) == len(scalars) > 0
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and not any(a.name in ("dilations", "strides") and set(a.ints) == {1} for n in convs for a in n.attribute)
    assert small.stat().st_size < full.stat().st_size
