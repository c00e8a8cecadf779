"""The whole pipeline once, through the CLI with its exit codes, on one real tiny run: `nas run` (search on
Ray Tune, distill, compress, export), what each stage wrote (the export loaded with `nas.load`), then
`nas report`, `nas distill`, `nas export` and its refusals, `nas hw`; and the TensorBoard files that
run's monitor wrote, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trials import trial_rows

import nas as nas_api
from evaluators.datasets import load_dataset
from nas.config import load_config
from nas.export import export_run
from nas.tune import run_search
from search_spaces.errors import NasError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NUM_TRIALS = 3


def nas(*args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """`nas run` on the quickstart, shrunk: 3 trials of 2 epochs, distillation of one epoch, pruning to half
    the MACs with one epoch of fine-tuning (the compress stage, enabled here), flax export."""
    out = tmp_path_factory.mktemp("cli")
    r = nas("run", "experiments/quickstart.yaml", "--set", f"output_dir={out}", "--set", "name=cli",
            "--set", f"num_trials={NUM_TRIALS}", "--set", "top_k=1", "--set", "train.epochs=2",
            "--set", "distill.epochs=1", "--set", "distill.seeds=1", "--set", "compress.enabled=true",
            "--set", "compress.prune=macs=0.5", "--set", "compress.epochs=1", "--set", "compress.latency_budget_s=0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = [r.stdout.index(s) for s in ("distillation:", "compression:", "export:", "winners (")]
    assert stages == sorted(stages), r.stdout[-3000:]  # search, distill, compress, export, in that order
    (out / "nas-run.stdout").write_text(r.stdout)
    return out / "cli"


def test_nas_run_writes_trials_winners_distillation_a_compressed_model_and_an_export(real_run):
    rows = trial_rows(real_run)
    trained = [r for r in rows if r["status"] != "infeasible"]
    assert len(trained) == NUM_TRIALS and all(r["status"] == "ok" for r in trained)
    for col in ("key", "status", "params", "macs", "accuracy", "score", "wall_s", "node_id"):
        assert all(r[col] != "" for r in trained), col
    saved = yaml.safe_load((real_run / "config.yaml").read_text())
    cap = saved["objective"]["constraints"]["params"]
    assert saved["name"] == "cli" and all(float(r["params"]) <= cap for r in trained)
    assert all(float(r["params"]) > cap and "params" in r["error"] for r in rows if r["status"] == "infeasible")
    stdout = (real_run.parent / "nas-run.stdout").read_text().splitlines()
    assert any(line.startswith(f"[{NUM_TRIALS}/{NUM_TRIALS}]") for line in stdout)  # a progress line per trial
    winners = json.loads((real_run / "winners.json").read_text())
    assert len(winners) == 1 and winners[0]["key"] in {r["key"] for r in trained}
    assert (real_run / winners[0]["checkpoint"] / "variables.msgpack").exists()
    assert json.loads((real_run / "distill.json").read_text())["winners"][0]["key"] == winners[0]["key"]
    assert list((real_run / "export").glob(f"01-{winners[0]['key']}/flax/variables.msgpack"))
    compressed = list((real_run / "compressed").glob(f"01-{winners[0]['key']}*"))
    assert len(compressed) == 1, compressed  # the compress stage pruned the winner to half its MACs
    m = json.loads((compressed[0] / "metrics.json").read_text())
    assert m["macs"]["after"] <= 0.5 * m["macs"]["before"] and 0 <= m["test_accuracy"] <= 1
    assert (compressed[0] / "model.onnx").is_file()


def test_the_distilled_export_loads_and_reproduces_its_test_accuracy(real_run):
    doc = json.loads((real_run / "distill.json").read_text())
    assert [w["rank"] for w in doc["winners"]] == [1]
    for w in doc["winners"]:
        assert 0 <= w["kd_acc"] <= 1 and 0 <= w["baseline_acc"] <= 1 and 0 <= w["test_accuracy_before"] <= 1
        assert w["gain"] == pytest.approx(w["kd_acc"] - w["baseline_acc"])
    folders = sorted((real_run / "export").glob("01-*"))
    assert len(folders) == 1
    data = load_dataset("digits", seed=0)
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert nas_api.load(folders[0]).accuracy(data.x_test, data.y_test) == metrics["test_accuracy"]
    assert metrics["distilled"] and "test_accuracy_before_distill" in metrics
    assert {"params", "macs", "layers"} <= set(json.loads((folders[0] / "cost.json").read_text()))
    with pytest.raises(NasError, match="output folder exists"):
        export_run(real_run, printer=lambda *a, **k: None)


def test_rerun_into_the_same_dir_is_refused_unless_resumed_or_forced(real_run):
    with pytest.raises(NasError, match="already holds this experiment; pass --resume"):
        run_search(load_config(real_run / "config.yaml"))
    with pytest.raises(NasError, match="holds a different experiment \\(differs in: seed\\)"):
        run_search(load_config(real_run / "config.yaml", ["seed=1"]))


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_the_monitor_of_a_real_search_wrote_what_tensorboard_reads(real_run):
    """Per trial a validation curve at every epoch and the final result equal to trials.csv's; for the
    search the best accuracy so far, ending at the best trial's."""
    rows = {r["key"]: r for r in trial_rows(real_run, "ok")}
    trials = sorted((real_run / "tensorboard" / "trials").iterdir())
    assert {d.name.split("-", 1)[1] for d in trials} == set(rows)  # <trial_id>-<key>, one per trial
    for d in trials:
        ea, row = _events(d), rows[d.name.split("-", 1)[1]]
        assert [e.step for e in ea.Scalars("trial/val_accuracy")] == [1, 2]
        assert ea.Scalars("trial/val_accuracy")[-1].value == pytest.approx(float(row["accuracy"]), abs=1e-6)
        assert ea.Scalars("result/params")[-1].value == float(row["params"])
    best = _events(real_run / "tensorboard" / "search").Scalars("search/best_accuracy")
    assert best[-1].value == pytest.approx(max(float(r["accuracy"]) for r in rows.values()), abs=1e-6)
    assert all(a.value <= b.value for a, b in zip(best, best[1:]))  # best so far never falls


def test_nas_report_of_the_real_run(real_run):
    r = nas("report", str(real_run), "--no-references")
    assert r.returncode == 0, r.stderr
    text = (real_run / "report" / "report.md").read_text()
    assert json.loads((real_run / "winners.json").read_text())[0]["key"] in text
    assert (real_run / "report" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_nas_distill_again_and_bad_run_directories(real_run, tmp_path):
    r = nas("distill", str(real_run), "--seeds", "1")
    assert r.returncode == 0, r.stderr
    for cmd in ("distill", "export", "report"):
        r = nas(cmd, str(tmp_path / "missing"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert str(tmp_path / "missing") in r.stderr


def test_nas_export_writes_onnx_and_refuses_bad_requests(real_run, tmp_path):
    out = tmp_path / "exp"
    r = nas("export", str(real_run), "--out", str(out), "--format", "flax,onnx")
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("01-*/model.onnx"))) == 1
    refusals = [
        (["--out", str(out), "--format", "flax"], "--force"),  # existing output
        (["--out", str(tmp_path / "a"), "--format", "tflite"], "unknown format 'tflite'"),
        (["--out", str(tmp_path / "b"), "--format", "flax", "--int8"], "int8"),  # int8 needs onnx
        (["--out", str(tmp_path / "c"), "--winner", "7"], "7"),
    ]
    for args, needle in refusals:
        r = nas("export", str(real_run), *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_nas_hw_profiles_and_its_errors(tmp_path):
    r = nas("hw", "profiles")
    assert r.returncode == 0 and {"host", "rpi4", "pixel4", "jetson_nano", "a100"} <= {
        line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    r = nas("hw", "calibrate")
    assert r.returncode == 2 and "--space is required" in r.stderr
    r = nas("hw", "calibrate", "--space", "mobile_small", "--profile", "rpi4", "--cache", str(tmp_path / "l.json"))
    assert r.returncode == 2 and "allowed: host" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.json").write_text("{not json")
    r = nas("hw", "validate", "--space", "mobile_small", "--cache", str(tmp_path / "bad.json"), "--n", "2")
    assert r.returncode == 2 and "bad.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = nas("hw", "reticulate")
    assert r.returncode == 2  # argparse: invalid choice
