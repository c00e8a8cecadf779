"""Faults a search must survive: its driver killed (SIGKILL) at three points of a training search, a
damaged epoch checkpoint, a finished-trials log cut short, Ctrl-C in a table search. Real searches
(digits, tiny networks; NAS-Bench-Macro look-ups), the CLI in a subprocess in its own process group;
every process a test starts is ended by process id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive, descendants
from trials import trained_rows, trial_rows

from evaluators.table import TableEvaluator, resolve_table
from nas.rundir import FINAL_CHECKPOINT, FINISHED_LOG, read_finished

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
MACRO = REPO / "experiments" / "macro_bench.yaml"


# ------------------------------------------------------------------ finished.jsonl cut short
def test_a_finished_log_line_cut_short_is_named_and_that_trial_runs_again(tmp_path):
    whole = {"trial_id": "a", "result": {"suggestion": 0, "key": "k0", "wall_s": 1.5}}
    cut = json.dumps({"trial_id": "b", "result": {"suggestion": 1, "key": "k1", "wall_s": 2.5}})[:30]
    (tmp_path / FINISHED_LOG).write_text(json.dumps(whole) + "\n" + cut)
    said: list[str] = []
    records = read_finished(tmp_path, lambda *a, **k: said.append(" ".join(map(str, a))))
    assert records == {"a": whole["result"], "0:k0": whole["result"]}  # "b" is not taken as finished
    assert len(said) == 1 and "line 2 is not a whole record" in said[0] and "runs again" in said[0]
    assert str(tmp_path / FINISHED_LOG) in said[0] and "\n" not in said[0]
    # a record that names its final checkpoint hands it on, for a resumed driver to report again
    (tmp_path / FINISHED_LOG).write_text(json.dumps({**whole, "checkpoint": "/runs/x/checkpoint_000003"}) + "\n")
    assert read_finished(tmp_path)["a"] == {**whole["result"], FINAL_CHECKPOINT: "/runs/x/checkpoint_000003"}


# ------------------------------------------------------------------ SIGKILL of the driver, three times
def _kill_machine(p: subprocess.Popen) -> None:
    """SIGKILL the driver and every process under it (its own local Ray instance): as if the machine
    running the search died. By process group and process id only: other Ray instances are not ours."""
    pids = descendants(p.pid)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=60)


def _finished(run_dir: Path) -> list[dict]:
    path = run_dir / FINISHED_LOG
    return [json.loads(line)["result"] for line in path.read_text().splitlines()] if path.exists() else []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # replaced while we looked
        return 0.0


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "tune").glob("*/checkpoint_*/train_state.msgpack"))


@pytest.fixture
def search(tmp_path):
    """Start `nas search` on the quickstart (3 trials of 60 epochs, one at a time) in its own process
    group, its output in a log file; whatever is still running after the test is killed."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # snapshot every ~1 s
    args = [sys.executable, "-m", "nas.cli", "search", str(QUICKSTART), "--set", f"output_dir={tmp_path}",
            "--set", "name=kills", "--set", "num_trials=3", "--set", "max_concurrent=1", "--set", "top_k=1",
            "--set", "train.epochs=60", "--set", "resources.cpu=1"]

    def start(*extra: str) -> subprocess.Popen:
        log = (tmp_path / f"driver{len(started)}.log").open("w")
        p = subprocess.Popen(args + list(extra), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log = Path(log.name)
        started.append(p)
        return p

    yield start, tmp_path / "kills"
    for p in started:
        if p.poll() is None:
            _kill_machine(p)


def _wait(p: subprocess.Popen, what: str, cond, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, f"the search ended before {what}:\n{p.log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.serial  # kills on a schedule: away from the compile-heavy tests
@pytest.mark.timeout(1500)
def test_a_search_killed_three_times_ends_with_each_trial_once_and_none_trained_twice(search):
    """SIGKILL (1) in the first trial's training, after an epoch checkpoint, which is then damaged; (2) after
    the first trial finished; (3) after the second. Each time `--resume`. At the end: exactly num_trials
    rows, each key once; every trial recorded as finished before a kill keeps its result (same wall time
    to the microsecond: not trained again); the damaged checkpoint is named and its trial trained anew."""
    start, run_dir = search
    p = start()
    _wait(p, "the first epoch checkpoint", lambda: _checkpoints(run_dir) and not _finished(run_dir))
    first = _checkpoints(run_dir)[0].stat().st_mtime
    # a Tune state snapshot (every ~1 s here) after it, so that --resume restores the trial from it
    _wait(p, "a state snapshot", lambda: any(_mtime(f) > first + 0.2
                                             for f in (run_dir / "tune").glob("experiment_state-*.json")), 60)
    _kill_machine(p)
    assert not _finished(run_dir) and not (run_dir / "trials.csv").exists(), "no trial may have finished yet"
    for ck in _checkpoints(run_dir):  # damage every epoch checkpoint of the interrupted trial
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])

    seen: dict[str, float] = {}
    for kill_after in (1, 2):
        p = start("--resume")
        # distinct keys: a finished trial the last state snapshot missed is reported again (not retrained)
        # after a resume, and so logged twice
        _wait(p, f"{kill_after} finished trial(s)", lambda: len({r["key"] for r in _finished(run_dir)}) >= kill_after)
        _kill_machine(p)
        for r in _finished(run_dir):
            seen.setdefault(r["key"], r["wall_s"])
    p = start("--resume")
    assert p.wait(timeout=900) == 0, p.log.read_text()[-3000:]
    logs = "".join(f.read_text() for f in sorted(run_dir.parent.glob("driver*.log")))

    rows = trial_rows(run_dir)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), logs[-3000:]
    assert len({r["key"] for r in rows}) == 3 and len({r["suggestion"] for r in rows}) == 3
    by_key = {r["key"]: r for r in rows}
    kept = {k: float(by_key[k]["wall_s"]) for k in seen}
    assert len(seen) >= 2 and kept == seen, f"finished before a kill {seen}, at the end {kept}"
    assert "its epoch checkpoint cannot be restored" in logs and "training it from the first epoch" in logs, logs[-3000:]


# ------------------------------------------------------------------ Ctrl-C, then --resume
@pytest.mark.slow
@pytest.mark.serial  # Ctrl-C: away from the compile-heavy tests
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    """experiments/macro_bench.yaml by its absolute path, run from another directory (the table it names
    ships inside the package), interrupted by Ctrl-C after 6 trials and resumed: every finished trial kept,
    and each trial's accuracy is the table's for its key."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    args = [sys.executable, "-m", "nas.cli", "search", str(MACRO), "--set", f"output_dir={tmp_path}",
            "--set", "num_trials=25", "--set", "name=resume"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    finished, ray_pids = 0, set()
    deadline = time.time() + 240
    for line in proc.stdout:  # progress lines start with [finished/total]; after 6, press Ctrl-C
        if line.startswith("[") and "/" in line:
            finished = int(line[1:line.index("/")])
        if finished >= 6 or time.time() > deadline:
            ray_pids = descendants(proc.pid)  # the search's own Ray instance: GCS, raylet, workers
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole foreground group
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert ray_pids, "no Ray process was seen under the driver"
    left = alive(ray_pids, wait_s=30)  # by process id: other Ray instances on the machine are not ours
    assert not left, f"Ray processes of the interrupted search still running: {left}"
    assert "--resume" in out
    run_dir = tmp_path / "resume"
    first = trained_rows(run_dir)
    finished_before = {r["trial_id"]: (r["key"], r["wall_s"]) for r in first if r["status"] == "ok"}
    assert 6 <= len(finished_before) < 25
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    final = trained_rows(run_dir)
    assert len(final) == 25 and all(x["status"] == "ok" for x in final)
    assert len({x["trial_id"] for x in final}) == 25 and len({x["key"] for x in final}) == 25
    # a re-run trial keeps its id and key but measures a new wall time (to the microsecond): equal
    # wall times mean the result was kept, not recomputed
    after = {x["trial_id"]: (x["key"], x["wall_s"]) for x in final}
    assert all(after[t] == kw for t, kw in finished_before.items())
    table = TableEvaluator(resolve_table("nas-bench-macro"))
    for x in final:  # the accuracy each trial reports is the packaged table's (percent -> fraction) for its key
        assert float(x["accuracy"]) == pytest.approx(table.evaluate(x["key"])["accuracy"] / 100)
