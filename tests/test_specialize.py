"""Specialization without training: targets from the command line, constraints respected, winners a run
directory `nas distill`/`nas export` read, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluators.hardware import PROFILES
from evaluators.variables import check_variables, load_variables
from nas.cli import main
from nas.config import load_config
from nas.objective import Constraint, cost_value
from nas.rundir import experiment_from_run_dir, load_winners
from nas.specialize import Target, parse_targets
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from supernet_quickstart import QUICKSTART, train_quickstart


def test_constraints_pair_with_their_profiles():
    targets = parse_targets(["pixel4", "rpi4"], ["latency_ms@pixel4=3.0", "latency_ms@rpi4<=9", "params=50000"])
    assert targets == [
        Target("pixel4", (Constraint("latency_ms@pixel4", 3.0), Constraint("params", 50000.0))),
        Target("rpi4", (Constraint("latency_ms@rpi4", 9.0), Constraint("params", 50000.0))),
    ]


def test_all_profiles_with_a_latency_budget_each():
    targets = parse_targets([], ["latency_ms=2.5"], all_profiles=True)
    assert [t.profile for t in targets] == PROFILES.names()
    assert all(t.constraints == (Constraint(f"latency_ms@{t.profile}", 2.5),) for t in targets)


@pytest.mark.parametrize("profiles, constraints, message", [
    (["pixel5"], [], "unknown hardware profile 'pixel5'"),
    (["pixel4"], ["latency_ms@rpi4=3"], "profile 'rpi4' is not a target"),
    (["pixel4"], ["latency_ms@pixel4"], "expected COST=MAX"),
    (["pixel4"], ["latency_ms@pixel4=-1"], "positive number"),
    (["pixel4"], ["flops=3"], "unknown cost 'flops'"),
    ([], [], "at least one --profile"),
])
def test_bad_targets_are_one_line_errors(profiles, constraints, message):
    with pytest.raises(NasError, match=message) as e:
        parse_targets(profiles, constraints)
    assert "\n" not in str(e.value)


def test_cli_unknown_profile_and_run_without_supernet_exit_2(tmp_path, capsys):
    assert main(["specialize", str(tmp_path), "--profile", "nope", "--constraint", "latency_ms=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas: error:") and "unknown hardware profile 'nope'" in err and "\n" not in err
    (tmp_path / "config.yaml").write_text("name: x\nspace: mobile_small\n")
    assert main(["specialize", str(tmp_path), "--profile", "pixel4", "--constraint", "latency_ms=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no trained supernet" in err and "\n" not in err


@pytest.mark.slow
def test_a_constraint_no_candidate_meets_is_one_line_exit_2(supernet_run, capsys):
    assert main(["specialize", str(supernet_run), "--profile", "pixel4", "--constraint",
                 "latency_ms@pixel4=0.00001"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no candidate of space 'mobile_small' meets latency_ms@pixel4 <= 1e-05" in err and "\n" not in err


def test_the_config_declares_targets_validated_at_load(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nspace: mobile_small\nspecialize:\n  targets:\n    pixel4: {latency_ms: 3}\n"
                    "    rpi4: {latency_ms@rpi4: 9, params: 5e4}\n")
    cfg = load_config(path)
    assert cfg.specialize.constraints() == {"pixel4": {"latency_ms@pixel4": 3.0},
                                            "rpi4": {"latency_ms@rpi4": 9.0, "params": 50000.0}}
    for bad, message in ((["specialize.targets.pixel5.latency_ms=3"], "unknown hardware profile 'pixel5'"),
                         (["specialize.targets.pixel4.latency_ms@rpi4=3"], "another profile's latency"),
                         (["specialize.targets.pixel4.latency_ms=0"], "must be a positive number"),
                         (["specialize.confirm=2"], "top_k: 3 exceeds confirm")):
        with pytest.raises(NasError, match=message) as e:
            load_config(path, bad)
        assert str(e.value).startswith(f"{path}: specialize.") and "\n" not in str(e.value)


@pytest.mark.slow
def test_specialize_without_a_profile_nor_declared_targets_is_one_line_exit_2(supernet_run, capsys):
    assert main(["specialize", str(supernet_run)]) == 2  # the fixture's experiment declares no targets
    err = capsys.readouterr().err.strip()
    assert "no target" in err and "specialize.targets" in err and "\n" not in err


@pytest.mark.slow
def test_the_supernet_quickstart_trains_and_specializes_for_its_two_profiles(tmp_path, capsys):
    """`nas supernet train experiments/supernet_quickstart.yaml` at a reduced budget: one Ray trial trains
    the supernet into RUN_DIR/supernet/, then each declared profile gets a winners.json whose winners meet
    its constraints, ranked by measured accuracy, with stand-alone weights and a run directory `nas distill`
    and `nas export` read (the supernet's largest candidate as teacher); a second `train` of the same run
    refuses. (Last in this file: the `supernet_run` fixture has compiled the same training program by then.)"""
    targets = load_config(QUICKSTART).specialize.constraints()
    assert len(targets) == 2
    small = ["specialize.budget=120", "specialize.batch=40", "specialize.population=20", "specialize.sample=5",
             "specialize.confirm=4", "specialize.top_k=2", "specialize.measure=30"]
    assert train_quickstart(tmp_path, *small) == 0
    run = tmp_path / "supernet_quickstart"
    for name in ("weights.msgpack", "manifest.json", "history.json", "config.yaml"):
        assert (run / "supernet" / name).is_file(), name
    assert [h["epoch"] for h in json.loads((run / "supernet" / "history.json").read_text())] == [1]
    for profile, limits in targets.items():
        folder = run / "specialized" / profile
        winners = json.loads((folder / "winners.json").read_text())
        assert [w["rank"] for w in winners] == [1, 2]
        assert winners[0]["val_accuracy"] >= winners[1]["val_accuracy"]  # ranked by measured accuracy
        for w in winners:
            arch = Architecture.from_dict(w["architecture"])
            for cost, cap in limits.items():
                assert cost_value(cost, arch) <= cap, (profile, w["key"], cost)
            variables = load_variables(folder / w["checkpoint"] / "variables.msgpack")
            check_variables(arch, variables)  # the stand-alone tree build_model(arch) expects
        exp = experiment_from_run_dir(folder)  # what nas distill / nas export read first
        assert exp.space.name == "mobile_small"
        assert [(w.rank, w.key, w.checkpoint) for w in load_winners(folder)] == \
            [(w["rank"], w["key"], w["checkpoint"]) for w in winners]
        assert (Path(exp.cfg.distill.teacher.checkpoint) / "variables.msgpack").exists()
    out = capsys.readouterr().out
    assert all(f"{p}: " in out for p in targets)  # one line per profile naming its winner
    assert train_quickstart(tmp_path, *small) == 2  # already trained: --resume or --force
    assert "already holds this supernet" in capsys.readouterr().err
