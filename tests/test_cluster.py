"""`nas search` on a real two-node Ray cluster (tests/ray_cluster.py): trials on both nodes, a lost
worker node, a killed driver, `ray job submit`, and bad cluster input. No mocks: every test runs
the CLI in a subprocess against `ray start` nodes on 127.0.0.1, and every process it starts is
ended by the fixtures, also when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_cluster import LocalCluster, free_port
from trials import trained_rows

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
MACRO = REPO / "experiments" / "macro_bench.yaml"
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
# The node-loss (and job-submit) trials: 25 epochs at batch 8 take ~5 s on this machine (~0.2 s an epoch; at the
# quickstart's batch 64 an epoch is 0.08 s and a 10-epoch trial could finish between two polls):
# a window to kill the worker mid-training.
EPOCHS = 25
NODELOSS_BATCH = 8


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def _cluster_module(tmp_path_factory):
    cluster = LocalCluster(log_dir=tmp_path_factory.mktemp("ray-logs"))
    with cluster:
        yield cluster
    cluster.remove()


@pytest.fixture
def cluster(_cluster_module):
    """The module's cluster with both nodes alive (a test that killed the worker gets a new one)."""
    c = _cluster_module
    if not any(n["node_id"] == c.worker_node_id for n in c.alive_nodes()):
        c.start_worker()
    return c


@pytest.fixture
def drivers():
    """Start CLI subprocesses in their own process groups; end whatever is left after the test."""
    started: list[subprocess.Popen] = []

    def start(args, env, **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _search_args(cfg: Path, *sets: str, address: str | None = None) -> list[str]:
    args = [sys.executable, "-m", "nas.cli", "search", str(cfg)]
    if address:
        args += ["--address", address]
    for s in sets:
        args += ["--set", s]
    return args


def _macro_sets(tmp_path, macro_table_path, name, n, *extra) -> list[str]:
    return [f"output_dir={tmp_path}", f"evaluator.table={macro_table_path}", f"name={name}", f"num_trials={n}",
            "search.algorithm=random", "max_concurrent=2", "resources.cpu=1", "top_k=1", *extra]


def _finish(p: subprocess.Popen, timeout: float) -> str:
    out = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, out[-4000:]
    return out


def _finished_keys(lines: list[str]) -> list[str]:
    """Keys of the trials a driver reported finished (its "[k/N] ... KEY acc A score S | ..." lines)."""
    keys = []
    for line in lines:
        words = line.split()
        if line.startswith("[") and "acc" in words[2:]:
            keys.append(words[words.index("acc", 2) - 1])
    return keys


# ------------------------------------------------------------------ tests
def test_job_submit_runs_the_quickstart_with_trials_on_both_nodes(cluster, tmp_path, drivers):
    """`ray job submit --working-dir REPO -- python -m nas.cli search ...`: the job's driver runs on the
    head node (no --address: Ray's RAY_ADDRESS is used), its two concurrent trials need a whole 1-CPU
    node each, so one runs on each node, and the run directory stays behind. The trials train for
    seconds (EPOCHS at batch NODELOSS_BATCH): a 2-epoch trial could end on the head before a busy
    machine has started the second trial's worker process, which then takes the freed head."""
    runtime_env = {"excludes": ["/.venv/", "/runs/", "/.git/", "__pycache__/", "*.egg-info/", ".pytest_cache/"]}
    entry = ["python", "-m", "nas.cli", "search", "experiments/quickstart.yaml", "--set", f"output_dir={tmp_path}",
             "--set", "num_trials=2", "--set", "max_concurrent=2", "--set", f"train.epochs={EPOCHS}",
             "--set", f"train.batch_size={NODELOSS_BATCH}", "--set", "top_k=1"]
    t = time.time()
    p = drivers([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard_url,
                 "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *entry],
                cluster.env)
    out = _finish(p, timeout=720)
    assert "succeeded" in out, out[-4000:]
    run_dir = tmp_path / "quickstart"
    rows = trained_rows(run_dir, once=False)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert {r["node_id"] for r in rows} == {cluster.head_node_id, cluster.worker_node_id}
    assert (run_dir / "winners.json").exists() and (run_dir / "config.yaml").exists()
    print(f"job submit: 2 training trials on 2 nodes in {time.time() - t:.0f} s")


def test_search_survives_the_loss_of_the_worker_node(cluster, tmp_path, drivers):
    """SIGKILL every process of the worker node while it trains a trial: that trial is retried on the
    head (FailureConfig max_failures), continues from its last epoch checkpoint (not from epoch 1),
    ends where an uninterrupted training of it ends, the search completes its budget, and every trial
    that had finished is kept. Training trials: table look-ups end before the worker's first actor is up."""
    n = 3
    sets = [f"output_dir={tmp_path}", "name=nodeloss", f"num_trials={n}", "max_concurrent=2", f"train.epochs={EPOCHS}",
            f"train.batch_size={NODELOSS_BATCH}", "resources.cpu=1", "max_failures=2", "top_k=1"]
    p = drivers(_search_args(QUICKSTART, *sets, address=cluster.address), cluster.env)
    run_dir = tmp_path / "nodeloss"
    worker = cluster.worker_node_id
    deadline = time.time() + 600
    while not cluster.alive_actors(worker):  # a trial actor is up on the worker node
        assert p.poll() is None, "the search ended before a trial ran on the worker node:\n" + p.stdout.read()
        assert time.time() < deadline, "no trial actor started on the worker node"
        time.sleep(0.5)
    # into a trial's training on the worker: its first epoch reported (an epoch checkpoint exists), not its last
    while not any(1 <= e < EPOCHS for e in _epochs(run_dir, worker, last=True).values()):
        assert p.poll() is None, "the search ended before a trial was seen mid-training on the worker node:\n" + \
            p.stdout.read()[-3000:]
        assert time.time() < deadline, "no trial seen mid-training on the worker node"
        time.sleep(0.1)
    seen_mid_training = [d for d, e in _epochs(run_dir, worker, last=True).items() if 1 <= e < EPOCHS]
    killed_at = time.time()
    cluster.kill_worker()
    # the epoch checkpoints the worker had persisted: a checkpoint can reach the run directory before its
    # result reaches the driver's result.json, and Tune restores the last checkpoint it registered
    persisted = _checkpoint_epochs(run_dir)
    out = _finish(p, timeout=900)
    rows = trained_rows(run_dir, once=False)
    assert len(rows) == n and all(r["status"] == "ok" for r in rows), out[-3000:]
    assert len({r["trial_id"] for r in rows}) == n and set(_finished_keys(out.splitlines())) == {r["key"] for r in rows}
    retried = {d.parent.name: d.parent.name.split("_")[2] for d in (run_dir / "tune").glob("*/error.txt")}
    assert retried, "no trial was lost with the worker node:\n" + out[-3000:]
    by_id = {r["trial_id"]: r for r in rows}
    assert all(by_id[t]["node_id"] == cluster.head_node_id for t in retried.values())  # finished on the head
    assert set(seen_mid_training) <= set(retried)
    on_worker, on_head = _epochs(run_dir, worker, last=True), _epochs(run_dir, cluster.head_node_id, last=False)
    for dirname, trial_id in retried.items():
        # continued from an epoch checkpoint the worker persisted, at most one epoch older than the last
        # epoch the driver recorded from the worker. Each reported epoch carries a checkpoint, yet the last
        # recorded epoch's checkpoint is not always the one restored (a rehearsal on 2026-12-07: epoch 3
        # recorded from the worker, resumed on the head after epoch 2; the node died as epoch 3 was being
        # reported). So at most the last recorded epoch is trained again, and a trial seen mid-training
        # does not start over
        resumed_after = on_head[dirname] - 1
        assert resumed_after >= on_worker.get(dirname, 0) - 1, (dirname, on_head, on_worker)
        assert resumed_after in {0, *persisted.get(dirname, ())}, (dirname, on_head, persisted)
        assert int(by_id[trial_id]["epochs"]) == EPOCHS
    assert all(on_head[d] > 1 for d in seen_mid_training)
    # and ends as an uninterrupted training of the same network does (same program, same data order)
    dirname = seen_mid_training[0]
    trial_id = retried[dirname]
    uninterrupted = _train_in_process(run_dir / "tune" / dirname, sets)
    assert abs(float(by_id[trial_id]["accuracy"]) - uninterrupted.val_accuracy) <= 1 / 270 + 1e-9, \
        (by_id[trial_id]["accuracy"], uninterrupted.val_accuracy)
    print(f"node loss: {len(retried)} trial(s) retried on the head from epochs "
          f"{sorted(on_head[d] for d in retried)}; search finished {time.time() - killed_at:.0f} s after the kill")


def _train_in_process(trial_dir: Path, sets: list[str]):
    """Train the trial's network here, uninterrupted, as the search's config says."""
    from evaluators.datasets import load
    from evaluators.train import train
    from nas.config import load_config
    from nas.rundir import experiment_of
    from search_spaces.architecture import Architecture

    arch = Architecture.from_json(max(trial_dir.glob("checkpoint_*/architecture.json")).read_text())
    cfg = load_config(QUICKSTART, sets)
    exp = experiment_of(cfg)
    data = load(cfg.dataset, seed=cfg.seed, resolution=arch.resolution, channels=arch.in_channels)
    assert len(data.y_val) == 270  # the tolerance above is one validation image
    return train(arch, data, exp.train)


def _checkpoint_epochs(run_dir: Path) -> dict[str, set[int]]:
    """The epochs of the complete epoch checkpoints on disk, by trial directory (one being copied is skipped)."""
    from flax import serialization

    seen: dict[str, set[int]] = {}
    for f in (run_dir / "tune").glob("*/checkpoint_*/train_state.msgpack"):
        try:
            epoch = int(serialization.msgpack_restore(f.read_bytes())["epoch"])
        except Exception:  # a partial copy, left by the SIGKILLed node
            continue
        seen.setdefault(f.parent.parent.name, set()).add(epoch)
    return seen


def _epochs(run_dir: Path, node_id: str, *, last: bool) -> dict[str, int]:
    """The last (or first) epoch each trial has reported from `node_id` so far (Tune's per-trial
    result.json lines, keyed by trial directory)."""
    seen: dict[str, int] = {}
    for f in (run_dir / "tune").glob("*/result.json"):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if r.get("node_id") == node_id and r.get("epochs"):
                e, d = int(r["epochs"]), f.parent.name
                seen[d] = e if d not in seen else (max if last else min)(seen[d], e)
    return seen


def test_killed_driver_resumes_without_rerunning_finished_trials(cluster, tmp_path, macro_table_path, drivers):
    """SIGKILL the driver mid-search (no chance to clean up), then `--resume` on the same cluster: the
    search completes with exactly the budget, and no trial the driver had seen finish runs again:
    each keeps the very result (wall time, node) it had before the kill."""
    n = 40
    args = _search_args(MACRO, *_macro_sets(tmp_path, macro_table_path, "driverkill", n), address=cluster.address)
    p = drivers(args, cluster.env)
    first: list[str] = []
    for line in p.stdout:
        first.append(line.rstrip())
        if len(_finished_keys(first)) >= 15:
            break
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    run_dir = tmp_path / "driverkill"
    assert not (run_dir / "trials.csv").exists()  # the killed driver wrote nothing at the end
    before = {}  # trial_id -> result, as the killed driver recorded them when the trials finished
    for line in (run_dir / "finished.jsonl").read_text().splitlines():
        rec = json.loads(line)
        before[rec["trial_id"]] = rec["result"]
    assert set(_finished_keys(first)) <= {r["key"] for r in before.values()}

    t = time.time()
    out = _finish(drivers(args + ["--resume"], cluster.env), timeout=600)
    rows = trained_rows(run_dir, once=False)
    assert len(rows) == n and all(r["status"] == "ok" for r in rows), out[-3000:]
    assert len({r["trial_id"] for r in rows}) == n and len({r["key"] for r in rows}) == n
    by_key = {r["key"]: r for r in rows}  # a trial the last state snapshot missed comes back under a new id
    for result in before.values():  # kept, not re-run: the very same result
        row = by_key[result["key"]]
        assert float(row["wall_s"]) == result["wall_s"] and row["node_id"] == result["node_id"]
    print(f"driver kill: {len(before)} trials finished before SIGKILL, all kept; resume took {time.time() - t:.0f} s")


def test_bad_cluster_input_fails_fast_with_a_clear_message(cluster, tmp_path, macro_table_path, drivers):
    sets = _macro_sets(tmp_path, macro_table_path, "bad", 2)

    def run(*extra, address=cluster.address) -> tuple[str, float]:
        t = time.time()
        p = drivers(_search_args(MACRO, *sets, *extra, address=address), cluster.env)
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 2, out[-3000:]
        return out, time.time() - t

    out, took = run(address=f"127.0.0.1:{free_port()}")  # nothing listens there
    assert "cannot reach a Ray cluster" in out and took < 90
    out, _ = run("resources.cpu=2", "resources.memory_gb=0.5")  # each node has 1 CPU
    assert "no node of the cluster can host a trial needing CPU 2" in out
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out, _ = run(f"storage_path={blocker}/tune")
    assert "storage_path" in out and "not writable" in out
    assert not (tmp_path / "bad" / "tune").exists()
