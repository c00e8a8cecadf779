"""Supernet training and scoring (middle floor) and the `nas supernet` commands (top floor).

A tiny two-stage space on 8x8 digits keeps the one compiled training program small; the tests that
need a trained supernet share one (module fixture) and are marked slow (its compilation is most of it).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml

from evaluators.datasets import load_dataset
from evaluators.supernet import PHASES, SupernetConfig, load_supernet, phase, sample_arch, save_supernet, train_supernet
from evaluators.supernet_score import recalibrate, score
from nas.cli import main
from nas.config import config_from_dict
from nas.supernet import SupernetJob, prepare, write_outputs
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError
from search_spaces.model import build_model
from search_spaces.space import SearchSpace
from search_spaces.supernet import candidate, extract, extreme

TINY_DECL = {
    "name": "tiny_elastic",
    "input": {"resolution": 8, "channels": 1},
    "num_classes": 10,
    "stem": {"kernel": 3, "channels": 8, "stride": 1},
    "stages": [
        {"stride": 2, "channels": [8, 16], "depth": [1, 2],
         "ops": [{"block": "ds", "kernel": [3, 5]}, {"block": "mb", "kernel": 3, "expansion": [2, 3]},
                 {"block": "skip"}]},
        {"stride": 2, "channels": [16, 24], "depth": [1, 2],
         "ops": [{"block": "mb", "kernel": [3, 5], "expansion": [2, 3], "se": [0, 0.25]}, {"block": "skip"}]},
    ],
    "head": {"channels": [32, 48], "act": "hswish", "dropout": 0.1},
}
TINY = SearchSpace.from_dict(TINY_DECL, source="<tiny>")
CFG = SupernetConfig(epochs=2, batch_size=128, candidates_per_step=1, recalibration_images=256, seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    blobs, reports = [], []
    res = train_supernet(TINY, digits, CFG, on_epoch=lambda e, m: reports.append((e, m)),
                         checkpoint=lambda e, b: blobs.append(b))
    return res, blobs, reports


# ------------------------------------------------------------------ config
def test_config_from_dict_names_the_unknown_key_on_one_line():
    with pytest.raises(NasError, match=r"exp.yaml: supernet.candidates: unknown key; allowed: batch_size, candidates_per_step, epochs") as e:
        SupernetConfig.from_dict({"candidates": 3}, source="exp.yaml: supernet")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value", [("kd_weight", 1.5), ("epochs", 0), ("optimizer", "lion"),
                                       ("progressive", "yes"), ("learning_rate", "fast")])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(NasError, match=f"supernet.{key}"):
        SupernetConfig.from_dict({key: value})


def test_config_reads_yaml_numbers_given_as_strings():
    assert SupernetConfig.from_dict({"learning_rate": "3e-3"}).learning_rate == 3e-3


# ------------------------------------------------------------------ sampling
def test_progressive_stages_open_one_dimension_after_another():
    space = SPACES.get("mobile_small").with_input(resolution=8)
    big = extreme(space, True)
    rng = np.random.default_rng(0)
    assert sample_arch(space, rng, "largest") == big
    kernel_only = [sample_arch(space, rng, "kernel") for _ in range(20)]
    assert all([(l.block, l.expansion, l.se, l.out_channels) for l in a.layers]
               == [(l.block, l.expansion, l.se, l.out_channels) for l in big.layers] for a in kernel_only)
    assert len({a.key for a in kernel_only}) > 1
    assert sample_arch(space, None, "all", "min") == extreme(space, False)


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 7, 15])
def test_progressive_phases_follow_each_other_and_the_last_epoch_trains_everything(epochs):
    cfg = SupernetConfig(epochs=epochs, progressive=True)
    phases = [phase(cfg, e) for e in range(1, epochs + 1)]
    assert phases[-1] == "all"
    assert [PHASES.index(p) for p in phases] == sorted(PHASES.index(p) for p in phases)
    assert len(set(phases)) == min(epochs, len(PHASES))  # every phase when there are enough epochs
    assert {phase(SupernetConfig(epochs=epochs), e) for e in range(1, epochs + 1)} == {"all"}


def test_block_sampling_trains_each_block_as_often_and_uniform_sampling_follows_the_option_count():
    space = SPACES.get("mobile_small").with_input(resolution=8)
    op = next(d for d in space.decisions() if d.name == "s2.l0.op")  # ds (2 options), mb (12), skip (1)
    n = {b: sum(o.block == b for o in op.options) for b in ("ds", "mb", "skip")}
    assert n == {"ds": 2, "mb": 12, "skip": 1}

    def shares(mode: str) -> dict[str, float]:
        rng = np.random.default_rng(0)
        picks = [space.to_choices(sample_arch(space, rng, op_sampling=mode))["s2.l0.op"] for _ in range(3000)]
        return {b: sum(op.options[i].block == b for i in picks) / len(picks) for b in n}

    assert all(abs(s - 1 / 3) < 0.03 for s in shares("block").values())
    assert all(abs(s - n[b] / 15) < 0.03 for b, s in shares("uniform").items())


# ------------------------------------------------------------------ training
@pytest.mark.slow
def test_training_reports_every_epoch_and_the_largest_learns(trained, digits):
    res, blobs, reports = trained
    assert [e for e, _ in reports] == [1, 2] and len(blobs) == 2
    assert all(np.isfinite(m["train_loss"]) for _, m in reports)
    # the largest candidate's inherited accuracy beats chance (0.1) clearly after two short epochs
    assert res.history[-1]["val_accuracy_largest"] > 0.5
    big = extreme(TINY, True)
    sub = extract(TINY, big, res.variables)  # batch_stats: the largest's, re-estimated
    logits = build_model(big).apply(sub, digits.x_val, train=False)
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == digits.y_val))
    assert acc == pytest.approx(score(TINY, res.variables, [big], digits, n_images=CFG.recalibration_images)[0],
                                abs=1e-6)


@pytest.mark.slow
def test_resume_after_the_first_epoch_gives_the_same_supernet(trained, digits):
    res, blobs, _ = trained
    again = train_supernet(TINY, digits, CFG, resume_from=blobs[0])
    assert [h["epoch"] for h in again.history] == [1, 2]
    for a, b in zip(jax.tree.leaves(res.variables["params"]), jax.tree.leaves(again.variables["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_from_garbage_is_a_one_line_error(digits):
    with pytest.raises(NasError, match="resume_from: not a supernet training state"):
        train_supernet(TINY, digits, CFG, resume_from=b"\x81\xa1x\x01")


# ------------------------------------------------------------------ scoring
@pytest.mark.slow
def test_score_equals_the_extracted_network_with_recalibrated_statistics(trained, digits):
    res, _, _ = trained
    rng = np.random.default_rng(1)
    archs = [TINY.sample(rng) for _ in range(3)]
    stats = recalibrate(TINY, res.variables, archs, digits, 256)
    acc = score(TINY, res.variables, archs, digits, n_images=256)
    for arch, st, a in zip(archs, stats, acc):
        sub = extract(TINY, arch, {"params": res.variables["params"], "batch_stats": st})
        logits = np.asarray(build_model(arch).apply(sub, digits.x_val, train=False))
        assert a == pytest.approx(float(np.mean(logits.argmax(-1) == digits.y_val)), abs=1.5 / len(digits.y_val))


@pytest.mark.slow
def test_scoring_many_candidates_compiles_no_new_program(trained, digits):
    from evaluators.supernet_score import _score_program

    res, _, _ = trained
    rng = np.random.default_rng(2)
    score(TINY, res.variables, [TINY.sample(rng) for _ in range(3)], digits, n_images=256)
    before = _score_program(TINY)._cache_size()
    acc = score(TINY, res.variables, [TINY.sample(rng) for _ in range(20)], digits, n_images=256)
    assert len(acc) == 20 and np.all((acc >= 0) & (acc <= 1))
    assert _score_program(TINY)._cache_size() == before  # the same data shapes: nothing new compiled


@pytest.mark.slow
def test_a_scorer_extracts_with_its_scoring_program_and_the_statistics_it_scored_with(trained, digits, tmp_path):
    """`SupernetScorer.extract` reuses the statistics re-estimated when the candidate was scored (else scores
    it): the same variables as slicing with `recalibrate`'s statistics, and no program compiled for it."""
    from evaluators.supernet_score import _score_program
    from nas.inherited import SupernetScorer

    res, _, _ = trained
    rng = np.random.default_rng(4)
    scored, unscored = TINY.sample(rng), TINY.sample(rng)
    assert scored.key != unscored.key
    want = {a.key: extract(TINY, a, {"params": res.variables["params"], "batch_stats": st})
            for a, st in zip((scored, unscored), recalibrate(TINY, res.variables, [scored, unscored], digits, 256))}
    scorer = SupernetScorer(TINY, res.variables, digits, tmp_path, 256)
    scorer.score([scored])
    before = _score_program(TINY)._cache_size()
    for arch in (scored, unscored):
        got = scorer.extract(arch)
        assert jax.tree.structure(got) == jax.tree.structure(want[arch.key])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want[arch.key])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert _score_program(TINY)._cache_size() == before


@pytest.mark.slow
def test_score_refuses_a_key_of_another_space(trained, digits):
    res, _, _ = trained
    other = SPACES.get("mobile_small").with_input(resolution=8).sample(np.random.default_rng(0))
    with pytest.raises(NasError, match="not of the supernet's space 'tiny_elastic'"):
        score(TINY, res.variables, [other], digits)


@pytest.mark.slow
def test_save_and_load_round_trip(trained, tmp_path):
    res, _, _ = trained
    save_supernet(tmp_path, TINY, res.variables, space_ref="unused", config=CFG, history=res.history)
    back = load_supernet(tmp_path, lambda ref: TINY)
    assert back.manifest["config"] == CFG.to_dict() and back.manifest["history"] == res.history
    for a, b in zip(jax.tree.leaves(res.variables), jax.tree.leaves(back.variables)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ the CLI
def _experiment(tmp_path, **extra) -> dict:
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(yaml.safe_dump(TINY_DECL))
    return {"name": "sn", "space": str(space_file), "dataset": "digits", "output_dir": str(tmp_path / "runs"),
            "objective": {"cost": None},
            "supernet": {"epochs": 1, "batch_size": 128, "candidates_per_step": 1, "recalibration_images": 256},
            **extra}


@pytest.mark.slow
def test_nas_supernet_eval_prints_inherited_accuracies(trained, tmp_path, capsys):
    res, _, _ = trained
    cfg = config_from_dict(_experiment(tmp_path), source=str(tmp_path / "exp.yaml"))
    job = prepare(cfg)
    assert isinstance(job, SupernetJob)
    write_outputs(job, res.variables, res.history)
    assert (job.out_dir / "tensorboard").is_dir() and any((job.out_dir / "tensorboard").iterdir())
    big = extreme(job.space, True).key
    small = extreme(job.space, False).key
    assert main(["supernet", "eval", str(cfg.run_dir), "--arch", big, "--arch", small, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == [big, small] and all(0 <= r["val_accuracy"] <= 1 for r in rows)
    # a key of another space is one line, exit 2
    assert main(["supernet", "eval", str(cfg.run_dir), "--arch", "002-002--002--0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas: error:") and "\n" not in err


def test_nas_supernet_eval_without_a_supernet_exits_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["supernet", "eval", str(tmp_path / "run"), "--arch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no trained supernet" in err and "\n" not in err


def test_nas_supernet_train_rejects_an_unknown_supernet_key(tmp_path, capsys):
    doc = _experiment(tmp_path)
    doc["supernet"]["kd"] = 1
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["supernet", "train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "supernet.kd: unknown key" in err and "\n" not in err
