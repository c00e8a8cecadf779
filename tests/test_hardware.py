"""Hardware profiles (every built-in one, bad files) and the roofline arithmetic on hand-computed layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from evaluators.hardware import (
    OP_CLASSES, PROFILES, analytic_latency, get_profile, op_latency, profile_from_dict, profile_from_yaml,
)
from search_spaces.architecture import Architecture, Head, Layer, Stem
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError
from search_spaces.graph import OpSpec, layer_names

UNIT = {  # 1 GFLOP/s everywhere, 1 GB/s, 2 us per kernel: latencies are easy to compute by hand
    "name": "unit",
    "precisions": ["fp32", "int8"],
    "default_precision": "fp32",
    "compute_gflops": {"fp32": {c: 1.0 for c in OP_CLASSES}, "int8": {c: 4.0 for c in OP_CLASSES}},
    "memory_bandwidth_gbs": 1.0,
    "launch_overhead_us": 2.0,
    "sources": {"compute_gflops": "test", "memory_bandwidth_gbs": "test", "launch_overhead_us": "test"},
}


@pytest.fixture
def unit():
    return profile_from_dict(UNIT)


def test_builtin_profiles_cover_the_required_targets():
    assert {"host", "rpi4", "pixel4", "jetson_nano", "a100"} <= set(PROFILES.names())


@pytest.mark.parametrize("name", PROFILES.names())
def test_every_builtin_profile_is_complete_and_predicts(name):
    p = PROFILES.get(name)
    assert p.default_precision in p.precisions
    for prec in p.precisions:
        assert all(p.peak(c, prec) > 0 for c in OP_CLASSES)
    assert p.memory_bandwidth_gbs > 0 and p.launch_overhead_us >= 0
    assert set(p.sources) >= {"compute_gflops", "memory_bandwidth_gbs", "launch_overhead_us"}
    arch = SPACES.get("mobile_small").sample(np.random.default_rng(0))
    for prec in p.precisions:
        est = analytic_latency(arch, name, prec)
        assert est.total_ms > 0 and est.method == "analytic"


def test_pointwise_conv_roofline_by_hand(unit):
    op = OpSpec(1, "pw", "pwconv", (8, 8, 16), (8, 8, 32))
    lat = op_latency(op, unit)
    # MACs 8*8*16*32 = 32768 -> 65536 FLOP at 1 GFLOP/s = 65.536 us
    # bytes (weights 512 + in 1024 + out 2048) * 4 = 14336 at 1 GB/s = 14.336 us
    assert lat.ops == 65536 and lat.bytes == 14336
    assert lat.compute_us == pytest.approx(65.536) and lat.memory_us == pytest.approx(14.336)
    assert lat.latency_us == pytest.approx(65.536 + 2.0) and lat.bound == "compute"
    q = op_latency(op, unit, "int8")  # 4 GOP/s, 1 byte per value
    assert q.compute_us == pytest.approx(16.384) and q.memory_us == pytest.approx(3.584)


def test_depthwise_and_elementwise_roofline_by_hand(unit):
    dw = op_latency(OpSpec(1, "dw", "dwconv", (8, 8, 16), (4, 4, 16), kernel=3, stride=2), unit)
    # MACs 9 * 16 * 16 = 2304 -> 4608 FLOP; bytes (144 + 1024 + 256) * 4 = 5696
    assert dw.op_class == "dwconv" and dw.ops == 4608 and dw.bytes == 5696
    assert dw.latency_us == pytest.approx(5.696 + 2.0) and dw.bound == "memory"
    add = op_latency(OpSpec(1, "add", "add", (4, 4, 16), (4, 4, 16)), unit)
    assert add.op_class == "elementwise" and add.ops == 256 and add.bytes == 3 * 256 * 4
    mul = op_latency(OpSpec(1, "se.mul", "mul", (4, 4, 16), (4, 4, 16)), unit)
    assert mul.bytes == (2 * 256 + 16) * 4
    pool = op_latency(OpSpec(1, "pool", "pool", (4, 4, 16), (16,)), unit)
    assert pool.ops == 256 and pool.bytes == (256 + 16) * 4
    fc = op_latency(OpSpec(2, "fc", "dense", (16,), (10,), bias=True), unit)
    assert fc.ops == 320 and fc.bytes == (170 + 26) * 4
    assert op_latency(OpSpec(1, "dw.bn", "bn", (4, 4, 16), (4, 4, 16)), unit) is None
    assert op_latency(OpSpec(1, "dw.act", "act", (4, 4, 16), (4, 4, 16), act="relu"), unit) is None


def test_network_latency_is_the_sum_of_its_layers(unit):
    layer = Layer("mb", 16, 16, 1, 3, 3, 0.25, "relu")  # residual, SE
    arch = Architecture("hand", "", 8, 16, 10, Stem(1, 16, 1, "relu"), (layer,), Head(32, "relu", 0.0))
    est = analytic_latency(arch, unit)
    assert [l.name for l in est.layers] == layer_names(arch)
    assert est.total_ms == pytest.approx(sum(l.latency_ms for l in est.layers))
    block = est.layers[1]
    # expand, dw, pool, reduce, expand, mul, project, add = 8 kernels
    assert len(block.ops) == 8 and block.latency_ms * 1e3 >= 8 * 2.0


def test_network_latency_by_hand(unit):
    """A network of stem, an identity layer, head conv, pool and classifier, counted by hand with the unit
    profile (1 GFLOP/s = 1 FLOP/ns, 1 GB/s = 1 byte/ns, 2 us a kernel; BN and activations are fused)."""
    arch = Architecture("hand", "", 8, 16, 10, Stem(1, 16, 1, "relu"), (Layer("skip", 16, 16, 1),),
                        Head(32, "relu", 0.0))
    stem = max(2 * 64 * 16 * 16, (16 * 16 + 64 * 16 + 64 * 16) * 4) / 1e3 + 2  # 1x1 conv 16->16 on 8x8: 34.768 us
    head = max(2 * 64 * 16 * 32, (16 * 32 + 64 * 16 + 64 * 32) * 4) / 1e3 + 2  # 1x1 conv 16->32: 67.536 us
    pool = max(64 * 32, (64 * 32 + 32) * 4) / 1e3 + 2  # global average pool: 10.32 us
    fc = max(2 * 32 * 10, (32 * 10 + 10 + 32 + 10) * 4) / 1e3 + 2  # dense 32->10 with bias: 3.488 us
    assert analytic_latency(arch, unit).total_ms == pytest.approx((stem + head + pool + fc) / 1e3)  # 0.116112


def test_identity_skip_layer_costs_nothing(unit):
    arch = Architecture("hand", "", 8, 8, 10, Stem(3, 8, 1, "relu"), (Layer("skip", 8, 8, 1),), Head(16, "relu", 0))
    assert analytic_latency(arch, unit).layers[1].latency_ms == 0


def _write(tmp_path, doc):
    p = tmp_path / "dev.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("memory_bandwidth_gbs"), "memory_bandwidth_gbs: required key is missing"),
    (lambda d: d["compute_gflops"]["fp32"].pop("dwconv"), "compute_gflops.fp32.dwconv: required key is missing"),
    (lambda d: d["compute_gflops"]["fp32"].update(conv=0), "compute_gflops.fp32.conv: 0 is not a positive number"),
    (lambda d: d.update(memory_bandwidth_gbs=-3), "memory_bandwidth_gbs: -3 is not a positive number"),
    (lambda d: d.update(launch_overhead_us="fast"), "launch_overhead_us"),
    (lambda d: d.update(precisions=["fp64"]), "precisions"),
    (lambda d: d.update(default_precision="fp16"), "default_precision"),
    (lambda d: d.update(speed=3), "speed: unknown key"),
    (lambda d: d["compute_gflops"]["fp32"].update(matmul=3.0), "matmul: unknown op class"),
    (lambda d: d["sources"].pop("memory_bandwidth_gbs"), "sources.memory_bandwidth_gbs"),
])
def test_bad_profile_files_fail_with_one_line_naming_file_and_key(tmp_path, mutate, needle):
    doc = copy.deepcopy(UNIT)
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(NasError) as e:
        profile_from_yaml(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_unknown_profile_and_precision():
    with pytest.raises(NasError, match="unknown hardware profile 'pi9'; allowed: a100, host"):
        get_profile("pi9")
    with pytest.raises(NasError, match="precision 'fp16' not supported; allowed: fp32, int8"):
        analytic_latency(SPACES.get("mobile_small").sample(np.random.default_rng(0)), "rpi4", "fp16")
    with pytest.raises(NasError, match="file not found"):
        get_profile("/nonexistent/dev.yaml")


def test_profile_file_by_path(tmp_path):
    p = get_profile(str(_write(tmp_path, UNIT)))
    assert p.name == "unit" and p.peak("conv", "int8") == 4.0
