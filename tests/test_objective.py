"""The objective: MnasNet soft penalty, hard constraints, cost names."""

from __future__ import annotations

import pytest

from nas.config import ObjectiveConfig
from nas.objective import Constraint, Objective, SoftPenalty
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError


def test_soft_penalty_uses_alpha_under_target_and_beta_over():
    p = SoftPenalty("params", target=100.0, alpha=-0.07, beta=-0.5)
    assert p.factor({"params": 50.0}) == pytest.approx(0.5 ** -0.07)
    assert p.factor({"params": 200.0}) == pytest.approx(2.0 ** -0.5)
    assert p.factor({"params": 100.0}) == 1.0


def test_score_is_accuracy_times_every_penalty():
    obj = Objective(penalties=(SoftPenalty("params", 100.0, -0.1, -0.1), SoftPenalty("macs", 10.0, 0.0, -1.0)))
    costs = {"params": 400.0, "macs": 20.0}
    assert obj.score(0.9, costs) == pytest.approx(0.9 * 4.0 ** -0.1 * 0.5)
    assert Objective().score(0.9, costs) == 0.9  # no penalty: accuracy alone


def test_hard_constraints_report_each_violation():
    obj = Objective(constraints=(Constraint("params", 1000.0), Constraint("macs", 5.0)))
    assert obj.violations({"params": 999.0, "macs": 5.0}) == []
    assert obj.violations({"params": 2000.0, "macs": 6.0}) == ["params 2000 > 1000", "macs 6 > 5"]


def test_objective_from_config_computes_costs_of_an_architecture():
    cfg = ObjectiveConfig(cost="macs", target=40e6, alpha=-0.07, beta=-0.07, constraints={"params": 1e6})
    obj = Objective.from_config(cfg)
    arch = SPACES.get("macro_cifar").decode("02012100")  # 890,666 params, 47,327,744 MACs
    costs = obj.costs(arch)
    assert costs["params"] == 890666 and costs["macs"] == 47327744
    assert obj.feasible(arch)
    assert not obj.feasible(SPACES.get("macro_cifar").decode("22222222"))
    assert obj.score(0.9, costs) == pytest.approx(0.9 * (47327744 / 40e6) ** -0.07)


def test_unknown_cost_name_is_a_clear_error():
    with pytest.raises(NasError, match="unknown cost 'latency'; allowed: activation_bytes, macs, params"):
        Objective.from_config(ObjectiveConfig(cost="latency", target=1.0))
    with pytest.raises(NasError, match="constraints.flops"):
        Objective.from_config(ObjectiveConfig(cost=None, constraints={"flops": 1.0}))


def test_predicted_latency_on_a_named_profile_is_a_cost():
    from evaluators.hardware import analytic_latency

    cfg = ObjectiveConfig(cost="latency_ms@rpi4", target=1.0, alpha=-0.07, beta=-0.5,
                          constraints={"latency_ms@pixel4": 50.0}, profiles=("host",))
    obj = Objective.from_config(cfg)
    arch = SPACES.get("mobile_small").decode("0155007--0153-1")
    costs = obj.costs(arch)
    assert set(costs) == {"params", "macs", "latency_ms@host", "latency_ms@rpi4", "latency_ms@pixel4"}
    assert costs["latency_ms@rpi4"] == pytest.approx(analytic_latency(arch, "rpi4").total_ms)
    ratio = costs["latency_ms@rpi4"] / 1.0
    assert obj.score(0.9, costs) == pytest.approx(0.9 * ratio ** (-0.07 if ratio <= 1 else -0.5))
    assert obj.feasible(arch)
    tight = Objective.from_config(ObjectiveConfig(cost=None, constraints={"latency_ms@pixel4": 1e-6}))
    assert not tight.feasible(arch)


def test_unknown_hardware_profile_is_a_clear_error():
    with pytest.raises(NasError, match="unknown hardware profile 'tpu9'; allowed: a100, host"):
        Objective.from_config(ObjectiveConfig(cost="latency_ms@tpu9", target=1.0))
