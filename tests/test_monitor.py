"""SearchMonitor fed plain result dicts: event files read back with TensorBoard's EventAccumulator,
plain line-based progress when the output is not a terminal, a live display when it is."""

from __future__ import annotations

import io
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from evaluators.cost import analytic_cost
from nas.monitor import SearchMonitor
from search_spaces.catalog import load_space

SPACE = load_space("mobile_small").with_input(resolution=8)
KEYS = ["100-100--100--1", "113312444124440", "110012000120000", "010002000020001"]
EPOCHS = 3


def _result(key: str, epoch: int, acc: float) -> dict:
    cost = analytic_cost(SPACE.decode(key))
    return {"key": key, "params": cost.params, "macs": cost.macs, "train_loss": 2.0 / epoch, "val_loss": 2.2 / epoch,
            "val_accuracy": acc, "accuracy": acc, "score": acc * 0.9, "epochs": epoch, "wall_s": 1.0 * epoch,
            "status": "ok" if epoch == EPOCHS else "running", "node_id": "n1"}


def drive(run_dir, stream, tty=False) -> SearchMonitor:
    """4 trials: two complete (3 epochs), one fails after 1 epoch, one is stopped early; 2 infeasible."""
    mon = SearchMonitor(run_dir, SPACE, total_trials=4, stream=stream, tty=tty)
    for i, key in enumerate(KEYS):
        tid = f"t_{i:05d}"
        mon.trial_started(tid)
        last_epoch = {2: 1, 3: 2}.get(i, EPOCHS)
        for e in range(1, last_epoch + 1):
            r = _result(key, e, 0.6 + 0.05 * e + 0.01 * i)
            mon.trial_result(tid, r)
        if i == 2:
            mon.trial_failed(tid, "Traceback (most recent call last):\n  ...\nTrainingDiverged: loss is nan")
        else:
            mon.trial_completed(tid, r)
        if i == 0:  # the searcher appends to infeasible.jsonl; the monitor picks it up
            with (run_dir / "infeasible.jsonl").open("a") as f:
                f.write(json.dumps({"key": "113322444124441", "params": 226330, "error": "params 226330 > 150000"}) + "\n")
    mon.infeasible({"key": "113322444124440", "params": 216602, "error": "params 216602 > 150000"})
    mon.infeasible({"key": "113322444124440", "params": 216602, "error": "seen twice"})  # counted once
    mon.close()
    return mon


@pytest.fixture(scope="module")
def driven(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    mon = drive(run_dir, out)
    return run_dir, mon, out.getvalue()


def _acc(path) -> EventAccumulator:
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_per_trial_curves_results_and_hparams(driven):
    run_dir, _, _ = driven
    runs = sorted(p for p in (run_dir / "tensorboard" / "trials").iterdir())
    assert [p.name for p in runs] == [f"t_{i:05d}-{k}" for i, k in enumerate(KEYS)]
    expected_epochs = [EPOCHS, EPOCHS, 1, 2]
    for path, key, n in zip(runs, KEYS, expected_epochs):
        ea = _acc(path)
        tags = set(ea.Tags()["scalars"])
        for tag in ("trial/train_loss", "trial/val_loss", "trial/val_accuracy"):
            assert [e.step for e in ea.Scalars(tag)] == list(range(1, n + 1)), (path.name, tag)
        failed = key == KEYS[2]
        result_tags = {"result/accuracy", "result/score", "result/params", "result/macs", "result/latency_ms"}
        assert tags.isdisjoint(result_tags) if failed else result_tags <= tags
        if not failed:
            assert ea.Scalars("result/params")[0].value == analytic_cost(SPACE.decode(key)).params
            assert ea.Scalars("result/latency_ms")[0].value > 0  # predicted on 'host' when the result has none
        content = ea.PluginTagToContent("hparams")
        start = hp_metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
        hp = {k: v.string_value for k, v in start.hparams.items()}
        assert hp["key"] == key and hp["status"] == ("failed" if failed else "stopped" if key == KEYS[3] else "ok")
        labels = {d.name: d.labels for d in SPACE.decisions()}
        for d, ch in zip(SPACE.decisions(), key):
            assert hp[d.name] == ("-" if ch == "-" else labels[d.name][int(ch, 36)])
        end = hp_metadata.parse_session_end_info_plugin_data(content["_hparams_/session_end_info"])
        assert (end.status == 2) == failed  # STATUS_FAILURE for the crashed trial, else STATUS_SUCCESS


def test_search_summaries(driven):
    run_dir, mon, _ = driven
    ea = _acc(run_dir / "tensorboard" / "search")
    tags = ea.Tags()
    for tag in ("search/best_score", "search/best_accuracy", "search/failed", "search/infeasible"):
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3, 4], tag  # one point per finished trial
    assert [e.value for e in ea.Scalars("search/failed")] == [0, 0, 1, 1]
    assert ea.Scalars("search/infeasible")[-1].value == 1  # the jsonl one; the explicit ones came after trial 4
    assert mon.counts()["infeasible"] == 2
    best = [round(e.value, 4) for e in ea.Scalars("search/best_accuracy")]
    assert best == sorted(best) and best[-1] == round(0.6 + 0.05 * EPOCHS + 0.01, 4)
    assert tags["images"] == ["search/pareto_front"]
    images = ea.Images("search/pareto_front")
    assert [e.step for e in images] == [1, 2, 4]  # after every trial that produced a result
    assert images[-1].width > 400 and images[-1].height > 200
    exp = hp_metadata.parse_experiment_plugin_data(ea.PluginTagToContent("hparams")["_hparams_/experiment"])
    names = [h.name for h in exp.hparam_infos]
    assert names == [d.name for d in SPACE.decisions()] + ["key", "status"]
    conditional = next(h for h, d in zip(exp.hparam_infos, SPACE.decisions()) if d.layer is not None)
    assert "-" in [v.string_value for v in conditional.domain_discrete.values]
    assert "result/accuracy" in [m.name.tag for m in exp.metric_infos]


def test_plain_progress_is_line_based(driven):
    _, _, text = driven
    lines = text.splitlines()
    assert text.endswith("\n") and "\x1b" not in text and "\r" not in text
    starts = [l for l in lines if " start " in l]
    assert len(starts) == 4
    assert sum(" ok " in l for l in lines) == 2 and sum(" stopped " in l for l in lines) == 1
    failed = [l for l in lines if " failed  " in l]
    assert len(failed) == 1 and "TrainingDiverged: loss is nan" in failed[0]
    assert sum("] infeasible 11332" in l for l in lines) == 2  # each infeasible key announced once
    for l in lines[:-1]:
        assert l.startswith("[") and "/4]" in l and "running" in l and "best score" in l and "elapsed" in l
        assert "left" in l
    assert lines[-1].startswith("search finished: 4/4 done") and "failed 1" in lines[-1]
    assert lines[-2].startswith("[4/4]")


def test_terminal_mode_renders_live_display(tmp_path):
    out = io.StringIO()
    mon = SearchMonitor(tmp_path, SPACE, total_trials=2, stream=out, tty=True)
    mon.trial_started("a")
    mon.trial_result("a", _result(KEYS[0], 1, 0.7))
    mon.trial_completed("a", _result(KEYS[0], EPOCHS, 0.8))
    mon.close()
    text = out.getvalue()
    assert "\x1b[" in text  # rich drew the live status
    assert "search finished: 1/2 done" in text and KEYS[0] in text
