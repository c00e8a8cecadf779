"""Distillation stage: losses, teachers (ensemble, checkpoint checks), config validation, and a tiny
end-to-end run on a hand-made run directory (no Ray) that writes distill.json with both arms.

Compilation dominates on a small CPU: one teacher, one student architecture and one student
config serve every test that trains, so each training program compiles once.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from evaluators.datasets import load_dataset
from evaluators.losses import cross_entropy, kd_loss
from evaluators.optim import KDConfig, TrainConfig
from evaluators.predict import predict_logits
from evaluators.step import HINT, make_loss
from evaluators.variables import initialize, load_variables, save_variables
from nas.config import config_from_dict
from nas.config import DistillConfig
from nas.distill import mean_std, run_distill
from nas.rundir import StudentState
from nas.teacher import Teacher, ensemble_logits, resolve_teacher, search_candidates
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError

SPACE = SPACES.get("mobile_small").with_input(resolution=8)
STUDENT = "002-002--002--0"  # one mb_k3_e3 layer per stage, 16/24/48 channels, head 128: ~13k params
TEACHER = "100-100--100--1"  # wider: 24/40/64 channels, head 256
TINY_TEACHER = {"key": TEACHER}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def make_run(root, distill: dict, winners=(STUDENT,), name="e2e"):
    """A finished-search run directory by hand: config.yaml, trials.csv, winners.json, winners/NN/."""
    doc = {"name": name, "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
           "seed": 0, "num_trials": 4, "output_dir": str(root), "top_k": len(winners),
           "train": {"epochs": 1, "batch_size": 64, "learning_rate": 0.005},
           "objective": {"cost": None}, "distill": distill}
    cfg = config_from_dict(doc, source="test")
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rows, entries = ["trial_id,key,status,accuracy"], []
    for rank, key in enumerate(winners, 1):
        arch = SPACE.decode(key)
        folder = run_dir / "winners" / f"{rank:02d}"
        save_variables(folder / "variables.msgpack", initialize(arch, seed=rank))
        (folder / "architecture.json").write_text(arch.to_json(indent=2))
        acc = 0.9 - 0.1 * rank
        rows.append(f"t{rank},{key},ok,{acc}")
        entries.append({"rank": rank, "key": key, "val_accuracy": acc, "score": acc,
                        "architecture": arch.to_dict(), "checkpoint": f"winners/{rank:02d}"})
    (run_dir / "trials.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "winners.json").write_text(json.dumps(entries))
    return run_dir


# ------------------------------------------------------------------ losses
def test_kd_loss_is_cross_entropy_at_alpha_zero_and_minimised_by_the_teacher_at_alpha_one():
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.normal(0, 2, (8, 10)).astype(np.float32)) for _ in range(2))
    y = jnp.arange(8) % 10
    assert float(kd_loss(s, t, y, temperature=3.0, alpha=0.0)) == pytest.approx(float(cross_entropy(s, y)), rel=1e-6)
    at_teacher = float(kd_loss(t, t, y, temperature=3.0, alpha=1.0))
    assert abs(at_teacher) < 1e-6 and float(kd_loss(s, t, y, temperature=3.0, alpha=1.0)) > at_teacher + 0.01
    grad = jax.grad(lambda z: kd_loss(z, t, y, temperature=3.0, alpha=1.0))(t)
    assert float(jnp.max(jnp.abs(grad))) < 1e-6


def test_hint_term_of_the_training_loss_sends_gradient_into_the_projection():
    rng = np.random.default_rng(1)
    batch = {"y": jnp.arange(6) % 10, "teacher": jnp.asarray(rng.normal(size=(6, 10)), jnp.float32),
             "teacher_features": jnp.asarray(rng.normal(size=(6, 12)), jnp.float32),
             "student_features": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    logits = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
    proj = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
    loss = make_loss(TrainConfig(), distill=True, hints=True)
    hp = {"temperature": 4.0, "alpha": 0.9, "beta": 0.5}
    g = jax.grad(lambda p: loss(logits, {**batch, HINT: p}, hp))(proj)
    assert float(jnp.max(jnp.abs(g))) > 0
    g0 = jax.grad(lambda p: loss(logits, {**batch, HINT: p}, {**hp, "beta": 0.0}))(proj)
    assert float(jnp.max(jnp.abs(g0))) == 0.0  # beta = 0: response-based KD only
    plain = make_loss(TrainConfig(), distill=True)(logits, batch, hp)
    assert float(loss(logits, {**batch, HINT: proj}, {**hp, "beta": 0.0})) == pytest.approx(float(plain))


# ------------------------------------------------------------------ config
def test_distill_config_defaults_and_schedule():
    d = DistillConfig.from_dict({"teacher": {"ensemble": 3}, "warmup_epochs": 1, "epochs": 4, "seeds": 5,
                                 "beta": "0.5", "init": "scratch", "teacher_outputs": "cached"})
    cfg = d.student_train(TrainConfig(batch_size=32))
    assert (cfg.schedule, cfg.warmup_epochs, cfg.epochs, cfg.batch_size) == ("warmup_cosine", 1, 4, 32)
    assert d.kd().beta == 0.5 and d.seeds == 5
    assert DistillConfig.from_dict({"warmup_epochs": 0}).student_train(TrainConfig()).schedule == "cosine"
    default = DistillConfig.from_dict(None).student_train(TrainConfig())  # patience: warm-up + cosine
    assert (default.schedule, default.warmup_epochs, default.epochs) == ("warmup_cosine", 1, 12)
    short = DistillConfig.from_dict({"epochs": 2}).student_train(TrainConfig())  # too short for a warm-up
    assert (short.schedule, short.warmup_epochs) == ("cosine", 0)
    # a budget in steps: whole epochs of the training rows that cover it (100 rows / batch 32 = 3 steps each)
    by_steps = DistillConfig.from_dict({"steps": 10, "warmup_epochs": 1}).student_train(TrainConfig(batch_size=32), 100)
    assert by_steps.epochs == 4
    aug = DistillConfig.from_dict({"augment": {"crop_padding": 1, "mixup": 0.5}}).augment_config()
    assert (aug.crop_padding, aug.flip, aug.mixup, aug.cutmix) == (1, False, 0.5, 0.0)


def test_distill_stage_and_trainer_share_the_kd_defaults():
    # nas.distill keeps JAX out of its import, so it repeats KDConfig's defaults: they must agree
    d, kd = DistillConfig(), KDConfig()
    assert (d.temperature, d.alpha, d.beta) == (kd.temperature, kd.alpha, kd.beta) == (2.0, 0.5, 0.0)


@pytest.mark.parametrize("bad, match", [
    ({"temperature": 0}, r"run\.yaml: distill\.temperature: must be > 0"),
    ({"temperature": -2}, r"distill\.temperature"),
    ({"alpha": 1.5}, r"distill\.alpha: must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"distill\.alpha"),
    ({"beta": -1}, r"distill\.beta: must be >= 0"),
    ({"seeds": 0}, r"distill\.seeds: must be >= 1"),
    ({"init": "random"}, r"distill\.init: 'random'; allowed: search, scratch"),
    ({"tau": 2}, r"distill\.tau: unknown key; allowed: alpha, augment, beta"),
    ({"warmup_epochs": 3, "epochs": 3}, r"distill\.warmup_epochs: .*below epochs"),
    ({"schedule": "step"}, r"distill\.schedule: .*allowed one of constant, cosine, warmup_cosine"),
    ({"teacher": "largest"}, r"distill\.teacher: expected a mapping"),
    ({"teacher": {"key": "largest", "best": True}}, r"distill\.teacher: give exactly one of"),
    ({"teacher": {"ensemble": 1}}, r"distill\.teacher\.ensemble: must be >= 2, got 1"),
    ({"teacher": {"best": "yes"}}, r"distill\.teacher\.best"),
    ({"teacher": {"checkpoint": "x", "space": "mobile_small"}}, r"distill\.teacher\.space: only allowed with key"),
    ({"teacher": {"kee": "largest"}}, r"distill\.teacher\.kee: unknown key"),
    ({"teacher": {"best": True, "seeds": 2}}, r"distill\.teacher\.seeds: only allowed with key"),
    ({"teacher": {"key": "largest", "seeds": 0}}, r"distill\.teacher\.seeds: must be >= 1, got 0"),
    ({"teacher_outputs": "stored"}, r"distill\.teacher_outputs: 'stored'; allowed: online, cached"),
    ({"beta": 0.5}, r"distill\.beta: 0\.5; the hint loss needs teacher_outputs: cached"),
    ({"augment": {"mixup": -1}}, r"distill\.augment\.mixup: must be >= 0, got -1"),
    ({"augment": {"jitter": 1}}, r"distill\.augment\.jitter: unknown key; allowed: crop_padding, cutmix, cutout"),
    ({"steps": 0}, r"distill\.steps: must be >= 1, got 0"),
    ({"resume": "yes"}, r"distill\.resume: expected true or false"),
])
def test_bad_distill_config_is_a_one_line_error(bad, match):
    with pytest.raises(NasError, match=match) as e:
        DistillConfig.from_dict(bad, "run.yaml: distill")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ teachers
def test_ensemble_teacher_averages_member_logits(digits, tmp_path):
    arch = SPACE.decode(STUDENT)
    members = tuple((arch, initialize(arch, seed=s)) for s in (1, 2))
    x = digits.x_val[:16]
    each = [predict_logits(a, v, x) for a, v in members]
    t = Teacher("ensemble", "a+b", members, 0.0, "test")
    np.testing.assert_allclose(t.logits(x), (each[0] + each[1]) / 2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ensemble_logits(each), (each[0] + each[1]) / 2)
    logits, feats = t.outputs(x)
    np.testing.assert_allclose(logits, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-5)
    assert feats.shape == (16, 2 * arch.head.channels)  # members' features side by side
    # resolved from a run's candidates: the top-2 by validation accuracy
    run_dir = make_run(tmp_path, {}, winners=(STUDENT, "001-002--002--0", "000-002--002--0"))
    cands = search_candidates(run_dir)
    assert [c["key"] for c in cands] == [STUDENT, "001-002--002--0", "000-002--002--0"]
    ens = resolve_teacher({"ensemble": 2}, SPACE, digits, TrainConfig(), tmp_path / "t", candidates=cands)
    assert ens.kind == "ensemble" and [a.key for a, _ in ens.members] == [STUDENT, "001-002--002--0"]
    want = ensemble_logits([predict_logits(a, v, digits.x_test) for a, v in ens.members]).argmax(1)
    assert ens.test_accuracy == pytest.approx(float((want == digits.y_test).mean()))
    best = resolve_teacher({"best": True}, SPACE, digits, TrainConfig(), tmp_path / "t", candidates=cands)
    assert best.kind == "best" and best.key == STUDENT
    with pytest.raises(NasError, match=r"distill\.teacher\.ensemble: needs 5 trained search candidate"):
        resolve_teacher({"ensemble": 5}, SPACE, digits, TrainConfig(), tmp_path / "t", candidates=cands)


def test_reference_teacher_with_seeds_averages_its_independent_trainings(digits, tmp_path):
    cfg = TrainConfig(epochs=1, learning_rate=0.005)
    one = resolve_teacher({"key": TEACHER}, SPACE, digits, cfg, tmp_path / "t")
    ens = resolve_teacher({"key": TEACHER, "seeds": 2}, SPACE, digits, cfg, tmp_path / "t")
    assert (ens.kind, ens.key) == ("ensemble", TEACHER) and [a.key for a, _ in ens.members] == [TEACHER] * 2
    assert ens.params == 2 * one.params
    first, second = (jax.tree.leaves(v) for _, v in ens.members)
    assert all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(one.variables)))  # seed 0: the cached one
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # seed 1: its own training
    want = ensemble_logits([predict_logits(a, v, digits.x_test) for a, v in ens.members]).argmax(1)
    assert ens.test_accuracy == pytest.approx(float((want == digits.y_test).mean()))
    lines: list[str] = []
    again = resolve_teacher({"key": TEACHER, "seeds": 2}, SPACE, digits, cfg, tmp_path / "t",
                            printer=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert not any("training teacher" in line for line in lines), lines  # both trainings reused from the cache
    assert all(np.array_equal(a, b) for a, b in zip(second, jax.tree.leaves(again.members[1][1])))


def test_mismatched_teacher_checkpoint_fails_before_training(digits, tmp_path):
    five = SPACES.get("mobile_small").with_input(resolution=8, num_classes=5).decode(STUDENT)
    wrong_classes = tmp_path / "five"
    save_variables(wrong_classes / "variables.msgpack", initialize(five))
    (wrong_classes / "architecture.json").write_text(five.to_json())
    wrong_weights = tmp_path / "swapped"  # architecture.json of one net, weights of another
    save_variables(wrong_weights / "variables.msgpack", initialize(SPACE.decode(STUDENT)))
    (wrong_weights / "architecture.json").write_text(SPACE.decode(TEACHER).to_json())
    for folder, match in ((wrong_classes, "-> 5 classes, dataset 'digits' gives 8x8x1 -> 10 classes"),
                          (wrong_weights, "variables.msgpack: .*this architecture needs")):
        run_dir = make_run(tmp_path, {"teacher": {"checkpoint": str(folder)}}, name=folder.name + "-run")
        with pytest.raises(NasError, match=r"distill\.teacher\.checkpoint .*" + match):
            run_distill(run_dir, printer=lambda *a, **k: None)
        assert not (run_dir / "distill.json").exists()
        assert not (run_dir / "winners" / "01" / "baselines.json").exists()  # nothing was trained
    with pytest.raises(NasError, match="not a model checkpoint"):
        resolve_teacher({"checkpoint": str(tmp_path)}, SPACE, digits, TrainConfig(), tmp_path / "t")
    run_dir = make_run(tmp_path, {}, name="seeds")
    with pytest.raises(NasError, match="--seeds: 0"):
        run_distill(run_dir, seeds=0)


# ------------------------------------------------------------------ end to end
def test_tiny_distillation_run_writes_both_arms_and_reuses_caches(tmp_path):
    lines: list[str] = []
    distill = {"teacher": TINY_TEACHER, "teacher_epochs": 1, "epochs": 1, "learning_rate": 0.005, "beta": 0.5,
               "teacher_outputs": "cached", "warmup_epochs": 0}
    run_dir = make_run(tmp_path, distill)
    report = run_distill(run_dir, printer=lambda *a, **k: lines.append(" ".join(map(str, a))))
    doc = json.loads((run_dir / "distill.json").read_text())
    assert doc == json.loads(json.dumps(report))
    t = doc["teacher"]
    assert (t["kind"], t["key"]) == ("reference", TEACHER) and 0 <= t["test_accuracy"] <= 1
    assert (run_dir / t["outputs_cache"]).exists() and doc["seeds"] == 1
    (w,) = doc["winners"]
    for k in ("rank", "key", "test_accuracy_before", "teacher_acc", "baseline_acc", "baseline_std", "kd_acc",
              "kd_std", "gain", "gain_std", "distilled", "per_seed"):
        assert k in w, k
    assert w["key"] == STUDENT and w["teacher_acc"] == t["test_accuracy"] and w["params"] < t["params"]
    assert w["gain"] == pytest.approx(w["kd_acc"] - w["baseline_acc"]) and w["baseline_std"] == 0.0
    assert w["baseline_acc"] > 0.3 and w["kd_acc"] > 0.3  # both arms trained (digits, one epoch)
    assert (run_dir / "winners" / "01" / w["distilled"]).exists()
    assert any("gain" in line for line in lines)

    # two seeds: teacher, its outputs and the seed-0 baseline are reused; the programs are compiled
    report2 = run_distill(run_dir, seeds=2, printer=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert report2["seeds"] == 2 and report2["teacher"]["source"].startswith("cached")
    assert any("reused from" in line for line in lines)
    (w2,) = report2["winners"]
    assert w2["baselines_reused"] == 1 and [r["seed"] for r in w2["per_seed"]] == [0, 1]
    assert w2["per_seed"][0]["baseline_acc"] == w["baseline_acc"]
    assert w2["per_seed"][0]["kd_acc"] == pytest.approx(w["kd_acc"])  # same seed, same KD student
    mean, std = mean_std([r["gain"] for r in w2["per_seed"]])
    assert (w2["gain"], w2["gain_std"]) == (pytest.approx(mean), pytest.approx(std))


@pytest.mark.slow
def test_killed_distillation_resumes_where_it_stopped_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    """An online, augmented distillation killed after the KD student's first epoch was saved: the re-run
    reuses the finished baseline, continues the KD student, and ends exactly where an uninterrupted run
    ends (same data order, augmentation draws and optimizer state; one compiled program, CPU)."""
    teacher = SPACE.decode(TEACHER)
    folder = tmp_path / "teacher"
    save_variables(folder / "variables.msgpack", initialize(teacher, seed=5))
    (folder / "architecture.json").write_text(teacher.to_json())
    distill = {"teacher": {"checkpoint": str(folder)}, "epochs": 2, "learning_rate": 0.005, "alpha": 1.0,
               "augment": {"crop_padding": 1, "mixup": 1.0}, "teacher_outputs": "online"}
    quiet = lambda *a, **k: None  # noqa: E731
    whole = make_run(tmp_path, distill, name="whole")
    run_distill(whole, printer=quiet)

    class Killed(BaseException):
        pass

    saves = []
    real_save = StudentState.save

    def save_then_die(self, epoch, blob):
        real_save(self, epoch, blob)
        saves.append(epoch)
        if len(saves) == 2:  # the baseline's epoch 1, then the KD student's epoch 1
            raise Killed

    killed = make_run(tmp_path, distill, name="killed")
    monkeypatch.setattr(StudentState, "save", save_then_die)
    with pytest.raises(Killed):
        run_distill(killed, printer=quiet)
    monkeypatch.undo()
    assert len(list((killed / "winners" / "01" / "students").glob("*.state"))) == 1
    lines: list[str] = []
    report = run_distill(killed, printer=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("resumed" in line for line in lines)
    assert not list((killed / "winners" / "01" / "students").glob("*.state"))  # finished: state removed
    (w,) = report["winners"]
    (w0,) = json.loads((whole / "distill.json").read_text())["winners"]
    assert (w["baseline_acc"], w["kd_acc"]) == (w0["baseline_acc"], w0["kd_acc"])
    a, b = (load_variables(r / "winners" / "01" / "distilled.msgpack") for r in (killed, whole))
    jax.tree.map(np.testing.assert_array_equal, a, b)
