"""Energy per inference: a profile's per-operation figures applied to the operator list."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from evaluators.cost import analytic_cost
from evaluators.energy import energy
from evaluators.hardware import PROFILE_DIR, get_profile, profile_from_dict
from nas.objective import check_cost_name, cost_value
from search_spaces.architecture import Architecture, Head, Layer, Stem
from search_spaces.errors import NasError

ARCH = Architecture(
    space="mobile_small", key="e", resolution=8, in_channels=1, num_classes=10, stem=Stem(3, 8, 1, "relu"),
    layers=(Layer("mb", 8, 8, 1, kernel=3, expansion=3, se=0.25, act="relu"), Layer("ds", 8, 16, 2, kernel=3)),
    head=Head(32, "hswish", 0.0))


def test_every_builtin_profile_has_energy_figures_with_a_source():
    for path in PROFILE_DIR.glob("*.yaml"):
        p = get_profile(path.stem)
        assert p.energy_pj is not None, path
        assert "Horowitz" in p.sources["energy_pj"], path
        assert set(p.energy_pj["mult"]) == set(p.precisions)


def test_arithmetic_term_is_macs_times_multiply_plus_add_plus_elementwise():
    """fp32 on rpi4: 3.7 + 0.9 pJ per MAC; the rest is pooling/residual adds and the SE multiply."""
    e = energy(ARCH, "rpi4", "fp32")
    macs_pj = analytic_cost(ARCH).macs * (3.7 + 0.9)
    assert e.arithmetic_mj * 1e9 >= macs_pj
    assert e.arithmetic_mj * 1e9 < macs_pj * 1.05  # elementwise work is small next to the convolutions
    assert e.total_mj == pytest.approx(e.arithmetic_mj + e.weights_mj + e.activations_mj)
    # weights: every parameter that is not BatchNorm (folded) read once from DRAM at 640 pJ per fp32 word
    bn = sum(2 * c for c in (8, 24, 24, 8, 8, 16, 32))
    assert e.weights_mj * 1e9 == pytest.approx((analytic_cost(ARCH).params - bn) * 640)


def test_int8_costs_less_energy_than_fp32_in_every_term():
    f, i = energy(ARCH, "host", "fp32"), energy(ARCH, "host", "int8")
    assert i.arithmetic_mj < f.arithmetic_mj / 10
    assert i.weights_mj == pytest.approx(f.weights_mj / 4)
    assert i.activations_mj == pytest.approx(f.activations_mj / 4)


def test_energy_is_a_cost_the_objective_can_use():
    check_cost_name("energy_mj@rpi4", "objective.cost")
    check_cost_name("energy_mj@host:int8", "objective.constraints")
    assert cost_value("energy_mj@rpi4", ARCH) == energy(ARCH, "rpi4").total_mj
    assert cost_value("energy_mj@host:int8", ARCH) == energy(ARCH, "host", "int8").total_mj


@pytest.mark.parametrize("name, message", [
    ("energy_mj@nowhere", "nowhere"), ("energy_mj@jetson_nano:int8", "precision 'int8' not supported"),
    ("energy_j@rpi4", "energy_mj@PROFILE"),
])
def test_bad_energy_cost_names_are_refused_naming_what_is_allowed(name, message):
    with pytest.raises(NasError, match=message):
        check_cost_name(name, "objective.cost")


def test_bad_energy_figures_are_refused_naming_the_key():
    doc = yaml.safe_load((PROFILE_DIR / "rpi4.yaml").read_text())
    doc["energy_pj"]["mult"].pop("int8")
    with pytest.raises(NasError, match="energy_pj.mult.int8"):
        profile_from_dict(doc, "x.yaml")
    doc = yaml.safe_load((PROFILE_DIR / "rpi4.yaml").read_text())
    doc["sources"].pop("energy_pj")
    with pytest.raises(NasError, match="sources.energy_pj"):
        profile_from_dict(doc, "x.yaml")
    doc.pop("energy_pj")  # optional: a profile without energy figures still loads, but has no energy cost
    p = profile_from_dict(doc, "x.yaml")
    with pytest.raises(NasError, match="no energy figures"):
        energy(ARCH, p)


def test_nas_cost_reports_energy_for_an_architecture_file(tmp_path):
    f = tmp_path / "architecture.json"
    f.write_text(json.dumps({"architecture": ARCH.to_dict()}))
    out = subprocess.run([sys.executable, "-m", "nas.cli", "cost", "--arch-file", str(f), "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert doc["params"] == analytic_cost(ARCH).params
    assert doc["energy_mj"]["rpi4:int8"] == pytest.approx(energy(ARCH, "rpi4", "int8").total_mj)
