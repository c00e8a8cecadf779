"""A search on a real Ray Tune runtime whose trials all diverge, and bad input. (The whole pipeline, search ->
distill -> compress -> export -> nas.load, runs once, in tests/test_cli_run.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from trials import trial_rows

from nas.cli import main
from nas.config import config_from_dict
from nas.tune import run_search

pytestmark = pytest.mark.slow


def small_config(tmp_path, **over):
    doc = {
        "name": "e2e", "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
        "seed": 0, "num_trials": 4, "max_concurrent": 2, "output_dir": str(tmp_path), "top_k": 2,
        "train": {"epochs": 2, "batch_size": 64, "learning_rate": 0.005},
        "search": {"algorithm": "random"},
        "objective": {"cost": "params", "target": 40000, "constraints": {"params": 60000}},
    }
    for k, v in over.items():
        doc[k] = v
    return doc


# A space of one small stage: each trial's compile takes a fraction of a mobile_small candidate's
TINY_SPACE = """
name: tiny
input: {resolution: 8, channels: 1}
num_classes: 10
stem: {kernel: 3, channels: 8, stride: 1, act: relu}
stages:
  - {stride: 2, channels: [8, 12, 16], depth: [1], ops: [{block: ds, kernel: [3, 5]}]}
head: {channels: [16], act: relu, dropout: 0.0}
"""


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    doc = small_config(tmp_path, num_trials=2, top_k=1, max_concurrent=1, space=str(tmp_path / "tiny.yaml"))
    doc["train"] = {"epochs": 1, "learning_rate": 1.0e9, "optimizer": "sgd"}
    doc["objective"] = {"cost": None}
    run_dir = run_search(config_from_dict(doc, source="test"), printer=lambda *a, **k: None)
    rows = trial_rows(run_dir)
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    assert all("diverged" in r["error"].lower() or "nan" in r["error"].lower() for r in rows)
    assert len({r["key"] for r in rows}) == 2  # two trials, two networks: the search went on after the first


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
