"""`nas compress`: prune a winner, fine-tune it with distillation, write a folder `nas.load` loads.

A run directory is built by hand around one small model trained on digits (no Ray search); the
teacher is the run's best candidate (`distill.teacher: {best: true}`), so no extra network trains.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import nas
from evaluators.cost import analytic_cost
from nas.cli import main
from nas.compress import run_compress
from search_spaces.errors import NasError
from winner_runs import KEY, TRAIN, trained_winner_run

pytestmark = pytest.mark.slow  # trains a winner and fine-tunes its pruned copy (~2 min here)

QUIET = dict(printer=lambda *a, **k: None)


@pytest.fixture(scope="module")
def data():
    from evaluators.datasets import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    return trained_winner_run(tmp_path_factory.mktemp("compressrun"), data, distill={"teacher": {"best": True}})


@pytest.fixture(scope="module")
def compressed(run_dir):
    # int8_float_se: the option reaches the quantizer (this winner has no SE, so the graph is the default one;
    # its default, every path quantized, is the low-rank chain's, tests/test_compress_lowrank.py)
    folders = run_compress(run_dir, winner=1, options={"prune": "macs=0.5", "epochs": 1, "steps": 2, "qat": True,
                                                       "qat_epochs": 1, "latency_budget_s": 0.02,
                                                       "int8_float_se": True}, **QUIET)
    assert len(folders) == 1
    return folders[0]


def test_the_folder_holds_a_smaller_network_that_nas_load_runs_in_every_format(compressed, data):
    assert compressed.parent.name == "compressed" and compressed.name == f"01-{KEY}-prune-macs50-l1-qat"
    for f in ("architecture.json", "flax/variables.msgpack", "model.onnx", "model.int8.onnx", "metrics.json"):
        assert (compressed / f).is_file(), f
    flax_model, onnx_model = nas.load(compressed), nas.load(compressed, format="onnx")
    arch = flax_model.arch
    assert arch.key.startswith(f"{KEY}~p0.") and onnx_model.arch == arch
    m = json.loads((compressed / "metrics.json").read_text())
    assert m["macs"]["after"] == analytic_cost(arch).macs <= 0.5 * m["macs"]["before"]
    assert m["ratios"]["macs"] >= 2 and m["params"]["after"] == analytic_cost(arch).params
    x = data.x_test[:64]
    np.testing.assert_allclose(onnx_model(x), flax_model(x), atol=1e-4)
    assert flax_model.accuracy(data.x_test, data.y_test) == pytest.approx(m["test_accuracy"])
    assert len(m["steps"]) == 2 and m["steps"][-1]["kept_fraction"] <= 0.5
    # no compress.learning_rate given: each fine-tuning rewinds to the run's training rate
    assert m["options"]["learning_rate"] is None and {s["learning_rate"] for s in m["steps"]} == {TRAIN["learning_rate"]}
    assert set(m["latency_ms"]) == {"before", "after", "before_int8", "after_int8"}
    assert set(m["speedup"]) == {"batch1", "batch32"} and m["latency_int8_source"] == "model.int8.onnx"
    int8 = nas.load(compressed, format="int8")
    assert int8.accuracy(data.x_test, data.y_test) == pytest.approx(m["int8"]["test_accuracy"])
    assert m["int8"]["float_se"] is True
    # the int8 model is QAT's: its weight range, and the activation ranges it trained with
    assert m["int8"]["weight_range"] == m["qat"]["weight_range"] in ("full", "reduced")
    assert 0 < m["int8"]["ranges_carried"] <= m["int8"]["ranges_hinted"]
    assert m["ratios"]["shipped_bytes"] > m["ratios"]["onnx_bytes"] and set(m["speedup_int8"]) == {"batch1", "batch32"}
    assert m["energy_mj"]["rpi4:int8"]["after"] < m["energy_mj"]["rpi4:fp32"]["after"] < m["energy_mj"]["rpi4:fp32"]["before"]
    card = (compressed / "README.md").read_text()
    assert f"| {m['ratios']['shipped_bytes']:.2f}x |" in card and "| compressed, int8 (model.int8.onnx) |" in card
    assert m["teacher"]["kind"] and m["accuracy_drop_pt"] == pytest.approx(
        100 * (m["test_accuracy_before"] - m["test_accuracy"]))


def test_the_pruned_architecture_costs_like_any_other(compressed, capsys):
    assert main(["cost", "--arch-file", str(compressed / "architecture.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key"] == nas.load(compressed).arch.key and "energy_mj" in doc and doc["latency_ms"]["rpi4"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--prune", "macs=0.0001"], "below compress.min_keep=0.25"),
    (["--prune", "macs=0.5", "--criterion", "random"], "allowed: l1, bn, taylor"),
    (["--prune", "flops=0.5"], "unknown target 'flops'"),
    (["--prune", "macs=0.5", "--lowrank", "energy=2"], "compress.lowrank: energy=2; allowed a fraction in (0, 1]"),
    (["--prune", "macs=0.5", "--winner", "7"], "--winner: 7; allowed: 1"),
    ([], "compress.prune: no technique chosen"),
    (["--prune", "macs=0.5", "--steps", "0"], "compress.steps: must be >= 1, got 0"),
    (["--prune", "macs=0.5", "--int8-float-se"], "compress.int8_float_se: true shapes the int8 model that qat writes"),
    (["--prune", "macs=0.5", "--int8-weight-range", "reduced"],
     "compress.int8_weight_range: reduced shapes the int8 model that qat writes"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(run_dir, capsys, argv, message, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", str(run_dir), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_run_without_winners_or_checkpoints_is_refused(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("compressed"))
    w = json.loads((run / "winners.json").read_text())
    w[0]["checkpoint"] = None
    (run / "winners.json").write_text(json.dumps(w))
    with pytest.raises(NasError, match="no trained weights"):
        run_compress(run, options={"prune": "macs=0.5"}, **QUIET)
    (run / "winners.json").unlink()
    with pytest.raises(NasError, match="no winners.json"):
        run_compress(run, options={"prune": "macs=0.5"}, **QUIET)
    assert not (run / "compressed").exists()


def test_an_existing_result_is_refused_unless_forced(run_dir, compressed):
    with pytest.raises(NasError, match="already exists; use --force"):
        run_compress(run_dir, winner=1, options={"prune": "macs=0.5", "epochs": 1, "steps": 2, "qat": True}, **QUIET)
