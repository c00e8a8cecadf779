"""The precision-aware cost model: an int8 look-up table measured from ONNX QDQ layers
(`calibrate(..., precision='int8')`, `nas hw calibrate --precision int8`) and the cost
`latency_ms@PROFILE:int8`. One real int8 calibration of a two-network space (few layers, one pass)."""

from __future__ import annotations

import json

import pytest
import yaml

from evaluators import lut
from evaluators.calibrate import calibrate
from evaluators.latency import latency_breakdown
from evaluators.lut import default_cache_path, load_table
from nas.cli import main
from nas.config import ObjectiveConfig
from nas.objective import Constraint, Objective, check_cost_name, cost_value
from nas.specialize import SpecializeConfig, Target, parse_targets
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

TWO = {  # two networks, five layer signatures: stem, ds 8>8 and 8>16, head from 8 and from 16 channels
    "name": "two", "input": {"resolution": 8, "channels": 1}, "num_classes": 10,
    "stem": {"kernel": 3, "channels": 8, "stride": 1},
    "stages": [{"stride": 2, "channels": [8, 16], "depth": [1], "ops": [{"block": "ds", "kernel": 3}]}],
    "head": {"channels": [16]},
}
QUICK = dict(fit_samples=2, passes=1, budget_s=0.02)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the int8 table of TWO, measured for real (its own COMPACT_NAS_CACHE_DIR)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(lut.CACHE_ENV, str(folder))
        lut._LOADED.clear()
        table = calibrate(SearchSpace.from_dict(TWO), precision="int8", **QUICK)
        yield folder, table
    lut._LOADED.clear()


@pytest.fixture
def calibrated(cache, monkeypatch):
    monkeypatch.setenv(lut.CACHE_ENV, str(cache[0]))
    lut._LOADED.clear()
    return cache[1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(lut.CACHE_ENV, str(tmp_path / "cache"))
    lut._LOADED.clear()


def test_the_int8_table_is_stored_beside_the_fp32_one_and_round_trips(calibrated):
    path = default_cache_path("host", "onnxruntime", "int8")
    assert calibrated.path == path and path.parent == default_cache_path("host", "onnxruntime").parent
    assert path.name == "latency-host-onnxruntime-int8.json"
    assert len(calibrated.entries) == 5 and min(calibrated.entries.values()) > 0 and calibrated.null_ms > 0
    back = load_table(path, profile="host", runtime="onnxruntime", precision="int8")
    assert back.to_dict() == calibrated.to_dict() and back.precision == "int8"
    assert back.fingerprint["precision"] == "int8" and "QDQ" in back.fingerprint["quantization"]
    with pytest.raises(NasError, match="is for precision 'int8', not 'fp32'"):
        load_table(path, precision="fp32")


def test_an_fp32_table_written_without_a_precision_key_still_loads_as_fp32(tmp_path, empty_cache):
    table = lut.LatencyTable("host", "onnxruntime", lut.fingerprint("onnxruntime"), 0.01, {"x": 0.2}, {"two": 0.0})
    d = table.to_dict()
    d.pop("precision")
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert load_table(tmp_path / "old.json", precision="fp32").precision == "fp32"


def test_latency_ms_at_host_int8_is_the_int8_table_prediction(calibrated):
    space = SearchSpace.from_dict(TWO)
    for key in ("0", "1"):
        arch = space.decode(key)
        est = latency_breakdown(arch, "host", precision="int8")
        assert est.method == "lut" and est.precision == "int8"
        assert cost_value("latency_ms@host:int8", arch) == est.total_ms == calibrated.predict(arch).total_ms
    check_cost_name("latency_ms@host:int8", "objective.cost")


def test_an_objective_can_aim_at_and_constrain_int8_latency(calibrated):
    arch = SearchSpace.from_dict(TWO).decode("1")
    cfg = ObjectiveConfig(cost="latency_ms@host:int8", target=1.0, constraints={"latency_ms@host:int8": 100.0})
    obj = Objective.from_config(cfg)
    costs = obj.costs(arch)
    assert costs["latency_ms@host:int8"] == calibrated.predict(arch).total_ms
    assert obj.feasible(arch) and obj.score(0.9, costs) == pytest.approx(0.9 * costs["latency_ms@host:int8"] ** -0.07)


def test_nas_cost_shows_the_int8_column_when_the_table_exists(calibrated, tmp_path, capsys):
    space_file = tmp_path / "two.yaml"
    space_file.write_text(yaml.safe_dump(TWO))
    assert main(["cost", "--space", str(space_file), "--arch", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    arch = SearchSpace.from_dict(TWO).decode("1")
    assert doc["latency_ms"]["host:int8"] == calibrated.predict(arch).total_ms
    assert doc["latency_method"]["host:int8"] == "lut"
    # a network the table has no layers for: the column says why, the rest is costed
    assert main(["cost", "--space", "mobile_small", "--arch", "100-100--100--1"]) == 0
    out = capsys.readouterr().out
    assert "latency host:int8: n/a" in out and "--precision int8" in out and "params" in out


def test_without_an_int8_table_the_cost_is_refused_saying_how_to_measure_it(empty_cache):
    with pytest.raises(NasError) as e:
        Objective.from_config(ObjectiveConfig(cost="latency_ms@host:int8", target=1.0))
    msg = str(e.value)
    assert msg.startswith("objective.cost: latency_ms@host:int8: no int8 latency table")
    assert "nas hw calibrate" in msg and "--precision int8" in msg and "\n" not in msg
    with pytest.raises(NasError, match="objective.constraints.latency_ms@rpi4:int8: .*on the device itself"):
        Objective.from_config(ObjectiveConfig(cost=None, constraints={"latency_ms@rpi4:int8": 1.0}))


def test_a_specialization_target_can_be_constrained_on_its_int8_latency(calibrated):
    """`nas specialize --constraint` and `specialize.targets` take `latency_ms[@PROFILE]:int8` (the model
    that ships is int8); the short form is each target's own int8 latency."""
    own = Target("host", (Constraint("latency_ms@host:int8", 0.5),))
    assert parse_targets(["host"], ["latency_ms@host:int8=0.5"]) == [own]
    assert parse_targets(["host"], ["latency_ms:int8<=0.5"]) == [own]
    cfg = SpecializeConfig.from_dict({"targets": {"host": {"latency_ms:int8": 0.5, "latency_ms@host": 2}}})
    assert cfg.constraints() == {"host": {"latency_ms@host:int8": 0.5, "latency_ms@host": 2.0}}
    arch = SearchSpace.from_dict(TWO).decode("1")
    costs = own.objective().costs(arch)
    assert costs["latency_ms@host:int8"] == calibrated.predict(arch).total_ms


def test_an_int8_target_without_its_table_or_of_another_profile_is_one_line(empty_cache):
    with pytest.raises(NasError, match="--constraint 'latency_ms:int8=0.5': latency_ms@host:int8: no int8 latency "
                                       "table .*--precision int8") as e:
        parse_targets(["host"], ["latency_ms:int8=0.5"])
    assert "\n" not in str(e.value)
    with pytest.raises(NasError, match="profile 'host' is not a target"):
        parse_targets(["pixel4"], ["latency_ms@host:fp32=0.5"])
    with pytest.raises(NasError, match="specialize.targets: host.latency_ms:int8: latency_ms@host:int8: no int8"):
        SpecializeConfig.from_dict({"targets": {"host": {"latency_ms:int8": 0.5}}})
    with pytest.raises(NasError, match="pixel4.latency_ms@rpi4:fp32: another profile's latency"):
        SpecializeConfig.from_dict({"targets": {"pixel4": {"latency_ms@rpi4:fp32": 0.5}}})


@pytest.mark.parametrize("name, message", [
    ("latency_ms@host:fp16", "latency_ms@host:fp16: unknown precision 'fp16'; allowed: latency_ms@host:fp32, latency_ms@host:int8"),
    ("latency_ms@nowhere:int8", "unknown hardware profile 'nowhere'"),
    ("latency@host:int8", "unknown cost 'latency@host:int8'; allowed: .*latency_ms@PROFILE\\[:int8\\]"),
])
def test_bad_latency_cost_names_are_refused_naming_what_is_allowed(empty_cache, name, message):
    with pytest.raises(NasError, match=f"objective.cost: {message}"):
        check_cost_name(name, "objective.cost")


def test_bad_calibration_requests_are_refused(empty_cache, capsys):
    space = SearchSpace.from_dict(TWO)
    with pytest.raises(NasError, match="precision 'int8' is timed in ONNX Runtime"):
        calibrate(space, runtime="jax", precision="int8")
    with pytest.raises(NasError, match="unknown precision 'int4'; allowed: fp32, int8"):
        calibrate(space, precision="int4")
    assert main(["hw", "calibrate", "--space", "mobile_small", "--profile", "rpi4", "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibrate() measures this machine; allowed: host" in err and len(err.splitlines()) == 1


def test_a_network_with_layers_missing_from_the_int8_table_is_refused(calibrated):
    arch = load_space("mobile_small").with_input(resolution=8).decode("100-100--100--1")
    with pytest.raises(NasError, match="no int8 entry for .* run `nas hw calibrate --space mobile_small --precision int8`"):
        cost_value("latency_ms@host:int8", arch)


def test_the_report_predicts_an_int8_latency_column_from_the_table_or_says_why_not(calibrated, monkeypatch, tmp_path):
    """A search aiming at latency_ms@host:int8 records the column `latency_ms_at_host:int8`; the report's
    predictions for it come from the int8 table, or from the int8 roofline with a note saying why."""
    from evaluators.hardware import analytic_latency
    from nas.plots import predicted_latency_ms

    arch = SearchSpace.from_dict(TWO).decode("1")
    assert predicted_latency_ms(arch, "host:int8") == calibrated.predict(arch).total_ms
    monkeypatch.setenv(lut.CACHE_ENV, str(tmp_path / "none"))
    notes: set[str] = set()
    assert predicted_latency_ms(arch, "host:int8", notes) == analytic_latency(arch, "host", "int8").total_ms
    assert any("--precision int8" in n for n in notes)
