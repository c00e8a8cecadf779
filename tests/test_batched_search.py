"""`evaluator: {kind: supernet}`: a search scored on a trained supernet, many candidates per call,
with the outputs of a Tune search (trials.csv, winners.json with weights, Pareto fronts, TensorBoard)."""

from __future__ import annotations

import json

import pytest
import yaml
from trials import trial_rows

from evaluators.variables import check_variables, load_variables
from nas.batched_search import run_supernet_search
from nas.cli import main
from nas.config import load_config
from nas.objective import cost_value
from search_spaces.architecture import Architecture

CAP = 0.12  # ms on pixel4; mobile_small at 8x8 predicts 0.04-0.19 ms, so the cap binds


def _experiment(tmp_path, run, algorithm="evolution", trials=24, **extra):
    doc = {"name": f"on-supernet-{algorithm}", "space": "mobile_small", "space_input": {"resolution": 8},
           "dataset": "digits", "num_trials": trials, "top_k": 2, "output_dir": str(tmp_path),
           "evaluator": {"kind": "supernet", "run": str(run), "batch": 8},
           "search": {"algorithm": algorithm, **({"options": {"population": 8, "sample": 3}}
                                                 if algorithm == "evolution" else {})},
           "objective": {"cost": None, "constraints": {"latency_ms@pixel4": CAP}, "profiles": ["pixel4"]}, **extra}
    path = tmp_path / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["evolution", "tpe"])
def test_search_on_a_supernet_writes_trials_and_winners_with_weights(tmp_path, supernet_run, algorithm):
    cfg = load_config(_experiment(tmp_path, supernet_run, algorithm))
    run_dir = run_supernet_search(cfg, printer=lambda *a, **k: None)
    ok = trial_rows(run_dir, "ok")
    assert len(ok) == 24 and len({r["key"] for r in ok}) == 24
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in ok)
    assert all(float(r["latency_ms_at_pixel4"]) <= CAP for r in ok)  # infeasible ones never scored
    winners = json.loads((run_dir / "winners.json").read_text())
    assert [w["rank"] for w in winners] == [1, 2]
    assert winners[0]["score"] == max(float(r["score"]) for r in ok)
    for w in winners:
        arch = Architecture.from_dict(w["architecture"])
        assert cost_value("latency_ms@pixel4", arch) <= CAP
        check_variables(arch, load_variables(run_dir / w["checkpoint"] / "variables.msgpack"))
    assert (run_dir / "pareto.json").exists() or any(run_dir.glob("pareto*"))
    assert any((run_dir / "tensorboard" / "search").iterdir())


def test_a_supernet_evaluator_needs_a_run_and_the_run_needs_a_supernet(tmp_path, capsys):
    path = _experiment(tmp_path, tmp_path / "nowhere")
    doc = yaml.safe_load(path.read_text())
    doc["evaluator"].pop("run")
    path.write_text(yaml.safe_dump(doc))
    assert main(["search", str(path)]) == 2
    assert "evaluator.run: required with evaluator.kind = supernet" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("name: empty\nspace: mobile_small\n")
    assert main(["search", str(_experiment(tmp_path, tmp_path / "empty"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "no trained supernet" in err and "\n" not in err
