"""End to end on a real Ray Tune runtime: search -> distill -> export -> nas.load, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

import nas
from nas.cli import main
from nas.config import config_from_dict
from nas.distill import run_distill
from nas.export import export_run
from nas.tune import run_search
from search_spaces.errors import NasError

pytestmark = pytest.mark.slow


def small_config(tmp_path, **over):
    doc = {
        "name": "e2e", "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
        "seed": 0, "num_trials": 4, "max_concurrent": 2, "output_dir": str(tmp_path), "top_k": 2,
        "train": {"epochs": 2, "batch_size": 64, "learning_rate": 0.005},
        "search": {"algorithm": "random"},
        "objective": {"cost": "params", "target": 40000, "constraints": {"params": 60000}},
        "distill": {"teacher": {"key": "100-100--100--1"}, "epochs": 1, "teacher_epochs": 3},
    }
    for k, v in over.items():
        doc[k] = v
    return doc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(small_config(tmp), source="test")
    lines: list[str] = []
    run_dir = run_search(cfg, printer=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return run_dir, lines


def test_search_writes_trials_and_winners(finished_run):
    run_dir, lines = finished_run
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    trained = [r for r in rows if r["status"] != "infeasible"]
    assert len(trained) == 4 and all(r["status"] == "ok" for r in trained)
    for col in ("key", "status", "params", "macs", "accuracy", "score", "wall_s", "node_id"):
        assert all(r[col] != "" for r in trained), col
    assert all(float(r["params"]) <= 60000 for r in trained)
    infeasible = [r for r in rows if r["status"] == "infeasible"]
    assert all(float(r["params"]) > 60000 and "params" in r["error"] for r in infeasible)
    winners = json.loads((run_dir / "winners.json").read_text())
    assert len(winners) == 2 and winners[0]["score"] >= winners[1]["score"]
    assert (run_dir / winners[0]["checkpoint"] / "variables.msgpack").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == "e2e"
    assert any(l.startswith("[4/4]") for l in lines)  # progress lines, one per finished trial


def test_distill_then_export_and_load_reproduces_test_accuracy(finished_run):
    run_dir, _ = finished_run
    report = run_distill(run_dir, printer=lambda *a, **k: None)
    assert report["teacher"]["test_accuracy"] > 0.5
    assert [w["rank"] for w in report["winners"]] == [1, 2]
    doc = json.loads((run_dir / "distill.json").read_text())
    for w in doc["winners"]:
        assert 0 <= w["kd_acc"] <= 1 and 0 <= w["baseline_acc"] <= 1 and 0 <= w["test_accuracy_before"] <= 1
        assert w["gain"] == pytest.approx(w["kd_acc"] - w["baseline_acc"])
    folders = export_run(run_dir, printer=lambda *a, **k: None)
    assert len(folders) == 2
    from evaluators.datasets import load_dataset

    data = load_dataset("digits", seed=0)
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        model = nas.load(folder)
        assert model.accuracy(data.x_test, data.y_test) == metrics["test_accuracy"]
        assert metrics["distilled"] and "test_accuracy_before_distill" in metrics
        assert {"params", "macs", "layers"} <= set(json.loads((folder / "cost.json").read_text()))
    with pytest.raises(NasError, match="output folder exists"):
        export_run(run_dir, printer=lambda *a, **k: None)


def test_rerun_into_the_same_dir_is_refused_unless_resumed_or_forced(finished_run, tmp_path):
    run_dir, _ = finished_run
    same = config_from_dict(small_config(run_dir.parent), source="test")
    with pytest.raises(NasError, match="already holds this experiment; pass --resume"):
        run_search(same)
    other = config_from_dict(small_config(run_dir.parent, seed=1), source="test")
    with pytest.raises(NasError, match="holds a different experiment \\(differs in: seed\\)"):
        run_search(other)


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(tmp_path):
    doc = small_config(tmp_path, num_trials=2, top_k=1, max_concurrent=1)
    doc["train"] = {"epochs": 1, "learning_rate": 1.0e9, "optimizer": "sgd"}
    doc["objective"] = {"cost": None}
    run_dir = run_search(config_from_dict(doc, source="test"), printer=lambda *a, **k: None)
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    assert all("diverged" in r["error"].lower() or "nan" in r["error"].lower() for r in rows)


@pytest.mark.parametrize("override,message", [
    ("dataset=imagenet", "unknown dataset 'imagenet'; allowed:"),
    ("space=tiny_space", "unknown search space 'tiny_space'; allowed:"),
    ("search.algorithm=annealing", "annealing"),
    ("train.epoch=3", "epoch"),
])
def test_bad_config_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path)))
    assert main(["search", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_or_malformed_dataset_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path, dataset={"name": "npz", "path": str(tmp_path / "x.npz")})))
    assert main(["search", str(path)]) == 2
    assert "x.npz" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", x_train=np.zeros((10, 8, 8)), y_train=np.zeros(9), x_test=np.zeros((4, 8, 8)),
             y_test=np.zeros(4))
    assert main(["search", str(path)]) == 2
    assert "x.npz" in capsys.readouterr().err
