"""Supernet scoring fanned out over Ray actors (`nas.tune.scoring.RayScorer`, `evaluator.workers`):
the same accuracies in the same order as the in-process scorer, the weights put into Ray once,
one-line errors for a bad `workers` value and for a worker that dies or raises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import yaml
from trials import trial_rows

from nas.batched_search import run_supernet_search
from nas.cli import main
from nas.config import config_from_dict, load_config
from nas.inherited import SupernetScorer
from nas.tune import run_search
from nas.tune.connect import init_ray
from nas.tune.scoring import RayScorer, open_scorer, split_parts
from search_spaces.errors import NasError

WORKERS = 2


@pytest.fixture(scope="module")
def local_ray(monkeypatch_module):
    """A private local Ray instance for this module (never a cluster already running on the machine)."""
    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)
    init_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _archs(scorer, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [scorer.space.sample(rng) for _ in range(n)]


def test_parts_are_contiguous_whole_chunks_covering_every_candidate():
    assert split_parts(20, 2, 8) == [slice(0, 16), slice(16, 20)]
    assert split_parts(40, 2, 8) == [slice(0, 24), slice(24, 40)]
    assert split_parts(3, 4, 8) == [slice(0, 3)]  # fewer candidates than a chunk: one task
    assert split_parts(0, 2, 8) == []
    for n in (1, 7, 8, 9, 63, 64, 65, 300):
        for w in (1, 2, 3, 5):
            parts = split_parts(n, w, 8)
            assert len(parts) <= w and parts[0].start == 0 and parts[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
            assert all((p.stop - p.start) % 8 == 0 for p in parts[:-1])


@pytest.mark.parametrize("value", [-1, "two", 1.5, True])
def test_a_bad_workers_value_is_a_one_line_error_naming_the_key(value):
    doc = {"name": "x", "space": "mobile_small", "dataset": "digits",
           "evaluator": {"kind": "supernet", "run": "/tmp", "workers": value}}
    with pytest.raises(NasError) as e:
        config_from_dict(doc, "exp.yaml")
    assert str(e.value).startswith("exp.yaml: evaluator.workers: ") and "\n" not in str(e.value)


def test_workers_default_to_scoring_in_this_process(supernet_run):
    assert config_from_dict({"name": "x", "space": "mobile_small", "dataset": "digits",
                             "evaluator": {"kind": "supernet", "run": "/tmp"}}, "x").evaluator.workers == 0
    assert isinstance(open_scorer(supernet_run, 0), SupernetScorer)  # no Ray started for it
    with pytest.raises(NasError, match=r"^--workers: -1; allowed an integer >= 0"):
        open_scorer(supernet_run, -1)


def test_a_negative_workers_flag_exits_2_with_one_line(supernet_run, capsys):
    assert main(["supernet", "eval", str(supernet_run), "--arch", "x", "--workers", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas: error: --workers: -1; allowed an integer >= 0") and "\n" not in err


@pytest.mark.slow
def test_workers_hold_the_weights_once_and_score_exactly_the_in_process_accuracies(supernet_run, local_ray,
                                                                                    monkeypatch):
    """One pool of two actors (each compiles the scoring program once, so this module keeps few pools):
    the variables and the dataset are put into Ray once; the same two actors serve every call with the
    in-process accuracies, in order; a worker that raises or dies is a one-line error naming it."""
    local = SupernetScorer.from_run(supernet_run)
    archs = _archs(local, 20)
    archs = archs + archs[:3]  # a repeat is scored again, wherever it lands
    expected = local.score(archs)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(type(value).__name__) or real_put(value, **kw))
    with RayScorer(local, WORKERS) as scorer:
        assert len(puts) == 2  # the variables and the dataset, once each, for both workers
        pids = {n["pid"] for n in scorer.nodes}
        got = scorer.score(archs)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(scorer.score(archs[5:9]), expected[5:9], rtol=0, atol=1e-6)
        assert len(scorer.score([])) == 0
        stats = scorer.worker_stats()
        assert [s["calls"] for s in stats] == [2, 1]  # 23 candidates: 16 + 7 on two workers; then 4 fit in one task
        assert {s["pid"] for s in stats} == pids and len(pids) == WORKERS  # the same two actors throughout
        assert len(puts) == 2  # scoring puts nothing more

        with pytest.raises(NasError) as e:
            scorer.score([archs[0], "not an architecture"])  # the worker itself raises
        assert str(e.value).startswith("scoring worker 0 of 2 raised AttributeError") and "\n" not in str(e.value)
        with pytest.raises(NasError, match=r"^score: split 'bogus'; allowed val, test$"):
            scorer.score(archs, split="bogus")  # the user's error, passed on as it is
        ray.kill(scorer.workers[1])
        with pytest.raises(NasError) as e:
            scorer.score(archs)
        assert str(e.value).startswith("scoring worker 1 of 2 died: ") and "\n" not in str(e.value)


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_cpus_is_a_one_line_error(supernet_run, local_ray):
    total = int(ray.cluster_resources().get("CPU", 0))
    with pytest.raises(NasError) as e:
        open_scorer(supernet_run, total + 1, what="evaluator.workers")
    assert str(e.value).startswith(f"evaluator.workers: {total + 1} scoring workers need") and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_search_with_two_workers_writes_the_accuracies_of_an_in_process_search(tmp_path, supernet_run, local_ray):
    def experiment(name, workers):
        doc = {"name": name, "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
               "num_trials": 16, "top_k": 1, "output_dir": str(tmp_path),
               "evaluator": {"kind": "supernet", "run": str(supernet_run), "batch": 16, "workers": workers},
               "search": {"algorithm": "random"}, "objective": {"cost": None}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        return load_config(tmp_path / f"{name}.yaml")

    quiet = lambda *a, **k: None  # noqa: E731
    in_process = run_supernet_search(experiment("in-process", 0), printer=quiet)
    fanned = run_search(experiment("fanned", WORKERS), printer=quiet)

    def accuracies(run_dir):
        return {r["key"]: float(r["accuracy"]) for r in trial_rows(run_dir, "ok")}

    a, b = accuracies(in_process), accuracies(fanned)
    assert len(a) == 16 and a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6
    assert json.loads((fanned / "winners.json").read_text())[0]["key"] == \
        json.loads((in_process / "winners.json").read_text())[0]["key"]


@pytest.mark.slow
def test_supernet_eval_with_workers_prints_the_in_process_accuracies(supernet_run, local_ray, capsys):
    keys = [a.key for a in _archs(SupernetScorer.from_run(supernet_run), 3, seed=3)]
    args = ["supernet", "eval", str(supernet_run), *[x for k in keys for x in ("--arch", k)], "--json"]
    assert main(args) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*args, "--workers", str(WORKERS)]) == 0
    assert json.loads(capsys.readouterr().out) == here


def test_an_in_process_search_refuses_workers_it_cannot_start(tmp_path, supernet_run):
    doc = {"name": "w", "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
           "num_trials": 4, "output_dir": str(tmp_path), "objective": {"cost": None},
           "evaluator": {"kind": "supernet", "run": str(supernet_run), "workers": 2}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(NasError, match="evaluator.workers: 2 Ray scoring workers need the Ray driver"):
        run_supernet_search(load_config(tmp_path / "w.yaml"))
