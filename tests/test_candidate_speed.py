"""benchmarks/candidate_speed.py: paired per-round ratios, and a JAX child that runs JAX alone.

Needs no PyTorch (the `bench` extra): the aggregation is plain Python, and the smoke run
measures JAX only.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "candidate_speed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("candidate_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratios_pair_the_children_of_one_round_and_carry_a_failed_framework_as_its_error():
    bench = _bench()
    runs = {"step": {
        "jax": [{"step_s": 0.2}, {"step_s": 0.3}, {"error": "exit 1: boom"}],
        "torch": [{"step_s": 0.4}, {"step_s": 0.2}, {"step_s": 0.1}],
        "torch_compile": [{"error": "exit 1: no compiler"}],
    }}
    figs = bench.summarize_network(runs, ["jax", "torch", "torch_compile"])
    step = figs["step_s"]
    assert step["ratios_torch"] == pytest.approx([0.5, 1.5])  # round 3 has no JAX figure: not paired
    assert step["ratio_torch"] == pytest.approx({"min": 0.5, "median": 1.0, "max": 1.5})
    assert step["torch"] == pytest.approx({"min": 0.1, "median": 0.2, "max": 0.4})
    assert step["torch_compile"] == {"error": "exit 1: no compiler"}
    assert "ratio_torch_compile" not in step
    ratios = bench.per_network_ratios(figs)
    assert ratios["train_step_ratio"] == pytest.approx(1.0)
    assert ratios["train_step_ratio_compile"] is None and ratios["candidate_wall_ratio"] is None


def test_the_summary_is_the_median_over_networks_of_those_that_have_the_figure():
    bench = _bench()
    per_network = {"a": {"train_step_ratio": 0.8}, "b": {"train_step_ratio": 1.4},
                   "c": {"train_step_ratio": 1.0}, "d": {"train_step_ratio": None}}
    assert bench.median_over(per_network, "train_step_ratio") == pytest.approx(1.0)
    assert bench.median_over({"a": {"x": None}}, "x") is None


@pytest.mark.slow
def test_quick_jax_only_run_spawns_a_child_that_runs_jax_alone_and_ends_with_a_json_line():
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--frameworks", "jax", "--measures", "step"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(summary["per_network"]) == ["mbv2_6"]
    (run,) = summary["networks"]["mbv2_6"]["runs"]["step"]["jax"]
    assert run["frameworks_started"] == ["jax"]
    assert 0 < run["step_s"] < run["process_s"]
    assert len(summary["loadavg_start"]) == 3
