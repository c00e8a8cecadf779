"""Static int8 quantization: what the compact file keeps, and that ONNX Runtime still runs it as int8."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from evaluators import quantize as Q
from evaluators.onnx_export import arch_variables, ort_session, run, to_onnx
from search_spaces.catalog import load_space
from search_spaces.errors import NasError

KEY = "100-0114-0100-0"  # mobile_small: depthwise, an inverted bottleneck with a residual, hard-swish (no SE)


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


# Exact comparisons below compare two graphs with the same arithmetic on the same machine: ONNX Runtime
# picks the same int8 kernel for both, so their outputs are equal on any CPU (not equal across CPUs).
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


def test_float16_packing_saves_four_bytes_a_channel_behind_one_cast_and_one_split(fp32, tmp_path, monkeypatch):
    path, x = fp32
    packed, full = _quantize(path, x, tmp_path / "packed.onnx"), _unpacked(path, x, tmp_path / "full.onnx", monkeypatch)
    g = onnx.load(str(full)).graph
    scales = {n.input[1] for n in g.node if n.op_type == "DequantizeLinear"}
    channels = sum(int(np.prod(t.dims)) for t in g.initializer if t.name in scales and len(t.dims) == 1 and t.dims[0] > 1)
    assert channels > 100
    assert full.stat().st_size - packed.stat().st_size >= 4 * channels - 600  # 2 + 2 bytes a channel, minus 2 nodes
    ops = [n.op_type for n in onnx.load(str(packed)).graph.node]
    assert ops[:2] == ["Cast", "Split"] and ops.count("Cast") == 1


def _unpacked_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float32 values the leading Cast + Split of a packed model give each constant (what ONNX Runtime
    folds at load), computed here with NumPy."""
    g = model.graph
    cast, split = g.node[0], g.node[1]
    assert (cast.op_type, split.op_type) == ("Cast", "Split")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    values = inits[cast.input[0]].astype(np.float32)
    sizes = inits[split.input[1]]
    return dict(zip(split.output, np.split(values, np.cumsum(sizes)[:-1])))


def test_float16_packing_moves_no_dequantized_weight_by_a_whole_int8_step(fp32, tmp_path, monkeypatch):
    """What `pack_float16` promises, checked on the constants themselves (no kernel involved, so it holds
    on every CPU): each packed value is within rtol = 1e-3 of the float32 one, hence a dequantized weight
    q * scale (|q| <= 127) moves by at most 0.127 of its int8 step, and a bias by 0.1%."""
    path, x = fp32
    full = onnx.load(str(_unpacked(path, x, tmp_path / "full.onnx", monkeypatch)))
    before = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    packed = _unpacked_constants(Q.pack_float16(onnx.load(str(tmp_path / "full.onnx"))))
    assert len(packed) > 10
    weight_scales = 0
    for n in full.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[1] in packed:
            q, s, s16 = before[n.input[0]].astype(np.float64), before[n.input[1]], packed[n.input[1]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % q.ndim
            shape = [-1 if d == axis else 1 for d in range(q.ndim)]
            step, moved = s.reshape(shape), np.abs(q * (s16 - s).reshape(shape))
            assert np.all(moved <= 127 * 1e-3 * step) and np.all(moved < step)
            weight_scales += 1
    for name, v in packed.items():
        assert np.all(np.abs(v - before[name]) <= 1e-3 * np.abs(before[name])), name
    assert weight_scales > 5 and weight_scales < len(packed)  # both weight scales and biases were packed


# ONNX Runtime runs a QDQ model along one of two paths. "fused" (its default) turns DequantizeLinear ->
# Conv -> QuantizeLinear into QLinearConv, whose int8 kernel it picks by the CPU's instruction set
# (x86-64: AVX2 u8s8 with 16-bit intermediate saturation, AVX-512, AVX-512 VNNI, AMX; aarch64: NEON
# dot products): results differ by CPU. "reference" (graph optimisations off) runs the QDQ nodes as
# written, in float32, with no int8 kernel: the same on every CPU. Output checks run on both paths.
ORT_PATHS = {"fused": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "reference": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def _session(path, ort_path: str):
    so = ort.SessionOptions()
    so.graph_optimization_level = ORT_PATHS[ort_path]
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small mobile_small network trained on digits (8x8), its fp32 ONNX file and the test images."""
    from evaluators.datasets import load_dataset
    from evaluators.train import TrainConfig, train

    data = load_dataset("digits", seed=0)
    arch = load_space("mobile_small").with_input(resolution=8).decode("100-100--100--1")
    res = train(arch, data, TrainConfig.from_dict({"epochs": 3, "batch_size": 64, "learning_rate": 0.005}))
    path = tmp_path_factory.mktemp("qt") / "model.onnx"
    onnx.save(to_onnx(arch, res.variables), str(path))
    return path, data


@pytest.mark.parametrize("ort_path", sorted(ORT_PATHS))
def test_float16_packing_keeps_the_predictions_on_real_data(trained, tmp_path, monkeypatch, ort_path):
    """Moving weights by < 0.13 int8 steps must not change what a trained network predicts, except for an
    image whose two best logits are nearly tied: at most 2% of the 270 test images (5; 1 was seen on both
    paths of an AVX-512 VNNI/AMX CPU), on either ONNX Runtime path. A packing that mixed up or lost
    constants changes most predictions. (Random weights and inputs give near-tied logits: real data.)"""
    path, data = trained
    calib = data.x_train[:256]
    packed, full = tmp_path / "packed.onnx", tmp_path / "full.onnx"
    Q.quantize_static_int8(path, packed, calib)
    with monkeypatch.context() as m:
        m.setattr(Q, "pack_float16", lambda model: model)
        Q.quantize_static_int8(path, full, calib)
    a, b = (run(_session(p, ort_path), data.x_test).argmax(-1) for p in (packed, full))
    f = run(_session(path, "reference"), data.x_test).argmax(-1)
    assert (f == data.y_test).mean() > 0.6  # the network learnt something: its logits are not near-tied
    assert (a != b).sum() <= 0.02 * len(a), f"{(a != b).sum()} of {len(a)} predictions changed"


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


def test_float_se_keeps_exactly_the_squeeze_and_excite_paths_in_float(tmp_path):
    """`float_se`: no Q/DQ inside an SE path (its dense layers take float inputs and fp32 weights), every
    convolution still QLinearConv, the hard-swish gates outside SE still quantized, and the outputs still
    those of the fp32 network within int8 error."""
    arch = load_space("mobile_small").decode("1131001--11d7-1")  # SE in two inverted bottlenecks, hard-swish
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(to_onnx(arch, arch_variables(arch)), str(fp32))
    x = np.random.default_rng(0).standard_normal((64, 28, 28, 1)).astype(np.float32)

    def optimized(fs: bool):
        q = tmp_path / f"q{fs}.onnx"
        info = Q.quantize_static_int8(fp32, q, x, float_se=fs)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt{fs}.onnx")
        ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        return info, onnx.load(so.optimized_model_filepath).graph, q

    (qi, qg, qpath), (fi, fg, fpath) = optimized(False), optimized(True)
    model = onnx.load(str(fp32))
    se = Q.squeeze_excite_nodes(model)
    gemms_in_se = sum(1 for n in model.graph.node if n.op_type == "Gemm" and n.name in se)
    assert gemms_in_se == 4  # two SE blocks, two dense layers each; the classifier is not SE
    producers = {o: n.op_type for n in fg.node for o in n.output}
    dense = [n for n in fg.node if n.op_type in ("Gemm", "FusedGemm")]
    assert sum(producers.get(n.input[0]) != "DequantizeLinear" for n in dense) >= gemms_in_se
    count = lambda g, op: sum(n.op_type == op for n in g.node)  # noqa: E731
    assert count(fg, "QLinearConv") == count(qg, "QLinearConv") == 15
    assert count(qg, "QLinearMul") - count(fg, "QLinearMul") == 2  # only the two SE gates left int8
    assert count(fg, "DequantizeLinear") < count(qg, "DequantizeLinear")
    assert fi["float_se"] and not qi["float_se"] and fi["bytes"] > qi["bytes"]  # fp32 SE weights
    want = run(ort_session(str(fp32)), x)
    for path in (qpath, fpath):
        assert np.mean(np.argmax(run(ort_session(str(path)), x), 1) == np.argmax(want, 1)) >= 0.9


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", ["sse2", "avx2", "fma"], "reduced"),  # AVX2 only: u8 x s8 pairs add into a saturating int16
    ("x86_64", ["avx2", "avx512f", "avx512bw"], "reduced"),  # AVX-512 without VNNI: the same instruction
    ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "full"),  # VNNI accumulates into int32
    ("AMD64", ["avx2", "avx_vnni"], "full"),
    ("aarch64", [], "full"),
])
def test_weight_range_for_cpu_reduces_only_where_int8_kernels_saturate(machine, flags, expected):
    assert Q.weight_range_for_cpu(flags, machine) == expected


def test_reduced_weight_range_ships_7_bit_weights(fp32, tmp_path):
    """`weight_range='reduced'`: every int8 weight in [-64, 64] and 64 reached (full: [-127, 127], 127 reached)."""
    path, x = fp32
    most = {}
    for wr in ("full", "reduced"):
        out = tmp_path / f"{wr}.onnx"
        assert Q.quantize_static_int8(path, out, x[:32], method="minmax", weight_range=wr)["weight_range"] == wr
        ints = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 1]
        most[wr] = max(int(np.abs(a.astype(np.int32)).max()) for a in ints)
    assert most == {"full": 127, "reduced": 64}
    with pytest.raises(NasError, match="weight range 'seven'; allowed: full, reduced"):
        Q.quantize_static_int8(path, tmp_path / "x.onnx", x[:32], weight_range="seven")
    with pytest.raises(NasError, match="allowed: auto, full, reduced"):
        Q.resolve_weight_range("seven")
