"""Layer signatures, the latency cache (keying, invalidation, atomic writes), ONNX export of every
block type, predict_latency_ms, and one real calibrate + validate run on a tiny space."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from evaluators import lut, timing
from evaluators.calibrate import calibrate, fit_affine, validate
from evaluators.latency import latency_breakdown, latency_record, predict_latency_ms
from evaluators.lut import LatencyTable, fingerprint, load_table
from evaluators.signatures import LayerSig, LayerUnit, arch_signatures, space_signatures
from evaluators.onnx_export import arch_variables, function_to_onnx, ort_session, random_variables, run, to_onnx
from search_spaces.architecture import Architecture, Head, Layer, Stem
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError
from search_spaces.model import build_model
from search_spaces.space import SearchSpace

TINY = {
    "name": "tiny",
    # 16x16 and widths 8..48 / head 16..256: latencies spread far beyond timing noise, so the
    # rank test below measures the predictor, not the machine's jitter (at 8x8 and <= 32
    # channels every network ran in tens of microseconds and tau was noise: 0.20 once in CI).
    "input": {"resolution": 16, "channels": 1},
    "num_classes": 10,
    "stem": {"kernel": 3, "channels": 8, "stride": 1},
    "stages": [{"stride": 2, "channels": [8, 48], "depth": [1, 2],
                "ops": [{"block": "ds", "kernel": [3, 5]}, {"block": "mb", "kernel": 3, "expansion": [3, 6]},
                        {"block": "skip"}]}],
    "head": {"channels": [16, 256]},
}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Never touch the user's real cache."""
    monkeypatch.setenv(lut.CACHE_ENV, str(tmp_path / "cache"))
    lut._LOADED.clear()


# ------------------------------------------------------------------ signatures
@pytest.mark.parametrize("name", SPACES.names())
def test_every_layer_of_sampled_archs_has_a_space_signature(name):
    space = SPACES.get(name)
    sigs = {s.key() for s in space_signatures(space)}
    rng = np.random.default_rng(0)
    for _ in range(30):
        arch = space.sample(rng)
        arch_sigs = arch_signatures(arch)
        assert len(arch_sigs) == len(arch.layers) + 2
        assert {s.key() for s in arch_sigs if not s.identity} <= sigs, arch.key


def test_signature_keys_distinguish_every_field():
    base = LayerSig("block", 16, 24, 2, 14, "mb", 5, 6, 0.25, "relu")
    variants = [base, LayerSig("block", 16, 24, 1, 14, "mb", 5, 6, 0.25, "relu"),
                LayerSig("block", 16, 32, 2, 14, "mb", 5, 6, 0.25, "relu"),
                LayerSig("block", 24, 24, 2, 14, "mb", 5, 6, 0.25, "relu"),
                LayerSig("block", 16, 24, 2, 28, "mb", 5, 6, 0.25, "relu"),
                LayerSig("block", 16, 24, 2, 14, "mb", 3, 6, 0.25, "relu"),
                LayerSig("block", 16, 24, 2, 14, "mb", 5, 3, 0.25, "relu"),
                LayerSig("block", 16, 24, 2, 14, "mb", 5, 6, 0.0, "relu"),
                LayerSig("block", 16, 24, 2, 14, "mb", 5, 6, 0.25, "hswish"),
                LayerSig("block", 16, 24, 2, 14, "ds", 5, 1, 0.0, "relu"),
                LayerSig("block", 16, 24, 2, 14, "skip"),
                LayerSig("head", 16, 24, 1, 14, act="relu", classes=10),
                LayerSig("head", 16, 24, 1, 14, act="relu", classes=100),
                LayerSig("stem", 16, 24, 2, 14, kernel=5, act="relu")]
    keys = [v.key() for v in variants]
    assert len(set(keys)) == len(keys)
    assert base.key() == "mb_k5_e6_se0.25_relu_c16>24_s2_r14"
    assert LayerSig("block", 8, 8, 1, 4, "skip").identity and not LayerSig("block", 8, 16, 1, 4, "skip").identity


def test_space_signature_count_matches_a_hand_count():
    # stem 1; layer 0: in 8 -> {8,16} x 5 ops (ds k3/k5, mb e3/e6, skip) = 10; layer 1: {8,16} x 4 non-identity = 8;
    # head: in {8,16} x {16,32} = 4
    assert len(space_signatures(SearchSpace.from_dict(TINY))) == 1 + 10 + 8 + 4


# ------------------------------------------------------------------ cache keying and invalidation
def _table(path, **kw) -> LatencyTable:
    t = LatencyTable("host", "onnxruntime", fingerprint("onnxruntime"), null_ms=0.01,
                     entries={"stem_k3_relu_c1>8_s1_r8": 0.05}, constants={"tiny": 0.02}, path=path)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_cache_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "sub" / "lat.json"
    _table(path).save()
    t = load_table(path, profile="host", runtime="onnxruntime")
    assert t.entries == {"stem_k3_relu_c1>8_s1_r8": 0.05} and t.constants == {"tiny": 0.02}
    assert [p.name for p in path.parent.iterdir()] == ["lat.json"]  # no temporary file left behind
    sig = LayerSig("stem", 1, 8, 1, 8, kernel=3, act="relu")
    assert t.layer_ms(sig) == pytest.approx(0.04)  # raw entry minus the per-call overhead


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "lat.json"
    _table(path).save()
    before = path.read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lut.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        _table(path, null_ms=9.0).save()
    assert path.read_text() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["fingerprint"].update(cpu="Other CPU 9000"), "stale latency table: cpu = 'Other CPU 9000'"),
    (lambda d: d["fingerprint"].update(onnxruntime="0.1.0"), "stale latency table: onnxruntime = '0.1.0'"),
    (lambda d: d["fingerprint"].update(cores=64), "stale latency table: cores = 64"),
    (lambda d: d["fingerprint"].pop("timing"), "stale latency table: timing = None when measured"),
    (lambda d: d.update(format=0), "format 0"),
    (lambda d: d.pop("entries"), "key 'entries' missing"),
    (lambda d: d["entries"].update(x=-1), "entry 'x' = -1"),
    (lambda d: d["entries"].update(x="fast"), "entry 'x' = 'fast'"),
    (lambda d: d.update(runtime="jax"), "for runtime 'jax', not 'onnxruntime'"),
    (lambda d: d.update(scales={"tiny": -0.5}), "scale 'tiny' = -0.5"),
    (lambda d: d.update(profile="rpi4"), "for profile 'rpi4', not 'host'"),
])
def test_bad_or_stale_cache_is_refused_with_one_line(tmp_path, edit, needle):
    path = tmp_path / "lat.json"
    d = _table(path).to_dict()
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(NasError) as e:
        load_table(path, profile="host", runtime="onnxruntime")
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_truncated_cache_is_refused(tmp_path):
    path = tmp_path / "lat.json"
    _table(path).save()
    path.write_text(path.read_text()[:40])
    with pytest.raises(NasError, match="corrupt latency table"):
        load_table(path)


def test_timing_windows_spread_over_a_pass_escape_a_burst_of_load(monkeypatch):
    """The scheduling of timing windows, on a simulated clock (a real one measures the machine's load,
    not this logic): every item costs 0.2 ms, or 0.4 ms during a burst in the first 0.3 s of the pass;
    a window of `budget_s` moves the clock on by `budget_s`."""
    clock = [0.0]

    def window(fn, *, budget_s, **kw):
        cost = 0.4 if clock[0] < 0.3 else 0.2
        clock[0] += budget_s
        return cost

    monkeypatch.setattr(timing, "median_ms", window)
    make = lambda: object()  # noqa: E731
    # one 0.2 s window per item: the first two items timed fall inside the burst
    assert sorted(timing.measure_passes([make] * 4, 1, 0.2, rounds=1)) == [0.2, 0.2, 0.4, 0.4]
    # ten 0.02 s windows per item spread over the 0.8 s pass: each item gets some after the burst
    clock[0], seen = 0.0, []
    best = timing.measure_passes([make] * 4, 1, 0.2, lambda i, ms: seen.append(i), rounds=10)
    assert best == [0.2] * 4 and sorted(seen) == [0, 1, 2, 3]


def test_calibrate_refuses_a_stale_cache_unless_told_to_recalibrate(tmp_path, monkeypatch):
    path = tmp_path / "lat.json"
    d = _table(path).to_dict()
    d["fingerprint"]["cpu"] = "Other CPU"
    path.write_text(json.dumps(d))
    with pytest.raises(NasError, match="stale latency table"):
        calibrate(SearchSpace.from_dict(TINY), cache_path=path)
    # recalibrate=True discards it (measurements stubbed: only the bookkeeping is under test here)
    monkeypatch.setattr(timing, "median_ms", lambda fn, **kw: 0.5)
    monkeypatch.setattr("evaluators.calibrate.unit_callable", lambda sig, rt, *a: None)
    monkeypatch.setattr("evaluators.calibrate.null_callable", lambda rt: None)
    monkeypatch.setattr("evaluators.calibrate.arch_callable", lambda a, rt, **k: None)
    t = calibrate(SearchSpace.from_dict(TINY), cache_path=path, recalibrate=True, fit_samples=3)
    assert t.fingerprint == fingerprint("onnxruntime") and len(t.entries) == 23
    assert "stem_k3_relu_c1>8_s1_r16" in load_table(path).entries


def test_a_corrupt_cache_is_named_with_the_way_out_and_recalibrating_replaces_it(tmp_path, monkeypatch):
    path = tmp_path / "lat.json"
    _table(path).save()
    path.write_bytes(path.read_bytes()[:57])  # cut short, as a full disk or a kill mid-write leaves it
    with pytest.raises(NasError) as e:
        calibrate(SearchSpace.from_dict(TINY), cache_path=path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: corrupt latency table") and "--recalibrate" in msg and "\n" not in msg
    monkeypatch.setattr(timing, "median_ms", lambda fn, **kw: 0.5)  # measurements stubbed: bookkeeping under test
    monkeypatch.setattr("evaluators.calibrate.unit_callable", lambda sig, rt, *a: None)
    monkeypatch.setattr("evaluators.calibrate.null_callable", lambda rt: None)
    monkeypatch.setattr("evaluators.calibrate.arch_callable", lambda a, rt, **k: None)
    calibrate(SearchSpace.from_dict(TINY), cache_path=path, recalibrate=True, fit_samples=3)
    assert len(load_table(path).entries) == 23


def test_calibrate_only_for_this_machine_and_known_runtimes():
    with pytest.raises(NasError, match="profile 'rpi4': calibrate\\(\\) measures this machine; allowed: host"):
        calibrate("mobile_small", "rpi4")
    with pytest.raises(NasError, match="unknown runtime 'tflite'; allowed: onnxruntime, jax"):
        calibrate("mobile_small", "host", "tflite")
    with pytest.raises(NasError, match="unknown hardware profile"):
        predict_latency_ms(SPACES.get("mobile_small").sample(np.random.default_rng(0)), "nope")


# ------------------------------------------------------------------ predict
def test_predict_uses_analytic_without_a_calibration_and_lut_with_one(tmp_path):
    space = SearchSpace.from_dict(TINY)
    arch = space.sample(np.random.default_rng(0))
    est = latency_breakdown(arch, "host")
    assert est.method == "analytic" and "no calibration" in est.note
    assert 0 < predict_latency_ms(arch, "a100") < predict_latency_ms(arch, "rpi4")  # a slower device, slower
    entries = {s.key(): 0.1 for s in space_signatures(space)}
    path = _table(tmp_path / "lat.json", entries=entries).save()
    est = latency_breakdown(arch, "host", lut_path=path)
    n_real = sum(not s.identity for s in arch_signatures(arch))
    assert est.method == "lut" and est.total_ms == pytest.approx(n_real * 0.09 + 0.02)
    assert [l.index for l in est.layers] == list(range(len(arch.layers) + 3))
    # the default cache location is picked up too
    _table(None, entries=entries).save(lut.default_cache_path("host", "onnxruntime"))
    assert predict_latency_ms(arch, "host") == pytest.approx(est.total_ms)
    rec = latency_record(arch, ["host", "rpi4"])
    assert rec["latency_method@host"] == "lut" and rec["latency_method@rpi4"] == "analytic"
    assert rec["latency_ms@host"] == pytest.approx(est.total_ms)


def test_predict_applies_the_fitted_slope_to_every_layer(tmp_path):
    space = SearchSpace.from_dict(TINY)
    arch = space.sample(np.random.default_rng(0))
    entries = {s.key(): 0.1 for s in space_signatures(space)}
    path = _table(tmp_path / "lat.json", entries=entries, scales={"tiny": 0.5}).save()
    est = latency_breakdown(arch, "host", lut_path=path)
    n_real = sum(not s.identity for s in arch_signatures(arch))
    assert est.total_ms == pytest.approx(0.5 * n_real * 0.09 + 0.02)
    assert sum(l.latency_ms for l in est.layers) + est.constant_ms == pytest.approx(est.total_ms)


def test_a_table_written_before_slopes_loads_with_slope_one(tmp_path):
    path = tmp_path / "lat.json"
    d = _table(path).to_dict()
    del d["scales"]
    path.write_text(json.dumps(d))
    t = load_table(path)
    assert t.scales == {} and t.scale("tiny") == 1.0


def test_affine_fit_recovers_slope_and_constant_and_falls_back_when_degenerate():
    sums = [0.1, 0.2, 0.3, 0.5]
    slope, const = fit_affine(sums, [0.9 * x + 0.01 for x in sums])
    assert slope == pytest.approx(0.9) and const == pytest.approx(0.01)
    assert fit_affine([0.2, 0.2, 0.2], [0.25, 0.27, 0.26]) == (1.0, pytest.approx(0.06))  # no spread
    assert fit_affine([0.1, 0.2, 0.3], [0.9, 0.5, 0.1]) == (1.0, pytest.approx(0.3))  # slope < 0.5: refused


def test_predict_falls_back_to_analytic_when_the_lut_lacks_a_layer(tmp_path):
    arch = SPACES.get("mobile_small").sample(np.random.default_rng(0))
    path = _table(tmp_path / "lat.json").save()
    est = latency_breakdown(arch, "host", lut_path=path)
    assert est.method == "analytic" and "no entry for" in est.note
    with pytest.raises(NasError, match="latency table not found"):
        latency_breakdown(arch, "host", lut_path=tmp_path / "missing.json")


# ------------------------------------------------------------------ ONNX export
def _every_block_arch() -> Architecture:
    layers = (
        Layer("ds", 8, 8, 1, 3, act="relu"),
        Layer("ds", 8, 16, 2, 5, act="relu6"),
        Layer("mb", 16, 16, 1, 3, 3, 0.0, "relu"),  # residual add
        Layer("mb", 16, 24, 2, 5, 6, 0.25, "relu"),  # SE, sigmoid gate
        Layer("mb", 24, 24, 1, 7, 4, 0.25, "hswish"),  # SE, hard-sigmoid gate, residual
        Layer("mb", 24, 24, 1, 9, 1, 0.0, "relu6"),  # no expansion conv
        Layer("skip", 24, 24, 1),  # identity
        Layer("skip", 24, 32, 2),  # 1x1 projection, stride 2
        Layer("skip", 32, 40, 1),  # 1x1 projection, stride 1
        Layer("mb", 40, 40, 1, 1, 2, 0.0, "hswish"),
    )
    return Architecture("every", "x", 16, 3, 10, Stem(3, 8, 2, "hswish"), layers, Head(32, "hswish", 0.1))


def _forward(arch):
    net = build_model(arch, "reference")
    return jax.jit(lambda v, x: net.apply(v, x, train=False))


def test_onnx_export_matches_jax_for_every_block_type_dynamic_batch():
    arch = _every_block_arch()
    variables = arch_variables(arch, seed=1)
    model = to_onnx(arch, variables)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"
    sess = ort_session(model)
    x = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
    want = np.asarray(_forward(arch)(variables, x))
    got = run(sess, x)
    assert np.abs(want).max() > 0.1  # a meaningful comparison, not zeros against zeros
    assert np.abs(got - want).max() < 1e-4
    assert run(sess, x[:1]).shape == (1, 10)


@pytest.mark.parametrize("name", SPACES.names())
def test_onnx_export_of_a_sampled_network_per_space(name):
    space = SPACES.get(name)
    if min(space.resolutions) > 64:  # same graph at a smaller input: export and compare faster
        space = space.with_input(resolution=64)
    arch = space.sample(np.random.default_rng(4))
    variables = arch_variables(arch)
    sess = ort_session(to_onnx(arch, variables, batch=1))
    x = np.random.default_rng(1).standard_normal((1, arch.resolution, arch.resolution, arch.in_channels))
    want = np.asarray(_forward(arch)(variables, x.astype(np.float32)))
    assert np.abs(run(sess, x) - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_single_layer_export_with_nchw_boundaries_matches_jax():
    sig = LayerSig("block", 8, 16, 2, 8, "mb", 5, 3, 0.25, "hswish")
    unit = LayerUnit(sig)
    v = random_variables(unit, sig.in_shape())
    sess = ort_session(function_to_onnx(lambda x: unit.apply(v, x), sig.in_shape(), nchw_in=True, nchw_out=True))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype(np.float32)
    want = np.asarray(unit.apply(v, x)).transpose(0, 3, 1, 2)
    assert np.abs(run(sess, x.transpose(0, 3, 1, 2)) - want).max() < 1e-4


# ------------------------------------------------------------------ integration
def test_calibrate_and_validate_a_tiny_space_for_real(tmp_path):
    space = SearchSpace.from_dict(TINY)
    path = tmp_path / "lat.json"
    seen = []
    table = calibrate(space, cache_path=path, fit_samples=4, budget_s=0.08,
                      progress=lambda d, t, w: seen.append((d, t)))
    assert len(table.entries) == 23 and seen[-1][0] == seen[-1][1]
    assert table.null_ms > 0 and "tiny" in table.constants and 0.5 <= table.scale("tiny") <= 2.0
    # re-running reuses the cache: nothing is measured
    seen.clear()
    calibrate(space, cache_path=path, fit_samples=4, progress=lambda d, t, w: seen.append(w))
    assert seen == []
    res = validate(space, cache_path=path, n=20, budget_s=0.1)  # 190 pairs: tau's spread shrinks
    assert res["meta"]["n"] == 20 and res["meta"]["calibration_seconds"] == 0
    for pred in ("analytic", "lut"):
        assert set(res[pred]) == {"kendall_tau", "spearman", "mape", "within_10pct"}
    print("tiny space validation:", {k: round(v, 3) for k, v in res["lut"].items()})
    # How well the LUT ranks networks is a figure of the machine and its load (benchmarks/cost_model.py
    # prints it); what must hold anywhere: the figures are well-formed, and the LUT built from this
    # machine's layer timings predicts the space's largest network slower than its smallest (their
    # MACs differ ~100x, far beyond the 2x bursts the min-over-windows timing already absorbs).
    for pred in ("analytic", "lut"):
        assert -1 <= res[pred]["kendall_tau"] <= 1 and -1 <= res[pred]["spearman"] <= 1
        assert res[pred]["mape"] >= 0 and 0 <= res[pred]["within_10pct"] <= 1
    small, large = _extreme_archs(space)
    lut = lambda a: latency_breakdown(a, "host", lut_path=path)  # noqa: E731
    assert lut(small).method == lut(large).method == "lut"
    assert lut(large).total_ms > lut(small).total_ms


def _extreme_archs(space):
    """The smallest and the largest by MACs of 200 sampled networks of `space`."""
    from evaluators.cost import analytic_cost

    archs = [space.sample(np.random.default_rng(s)) for s in range(200)]
    archs.sort(key=lambda a: analytic_cost(a).macs)
    assert analytic_cost(archs[-1]).macs > 20 * analytic_cost(archs[0]).macs
    return archs[0], archs[-1]


def test_jax_runtime_layer_and_network_callables_run():
    sig = LayerSig("block", 8, 8, 1, 4, "mb", 3, 3, 0.25, "relu")
    timing.unit_callable(sig, "jax")()
    timing.null_callable("jax")()
    arch = SearchSpace.from_dict(TINY).sample(np.random.default_rng(0))
    timing.arch_callable(arch, "jax")()
    from importlib.metadata import version

    fp = fingerprint("jax")
    assert fp["jaxlib"] == version("jaxlib") and fp["runtime"] == "jax" and "onnxruntime" not in fp
    assert fingerprint("onnxruntime")["onnxruntime"] == version("onnxruntime")
