"""Consistent teaching: the teacher inside the compiled step sees exactly the student's augmented view;
function matching; a distillation resumed after an interruption ends where an uninterrupted one does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evaluators.augment import AugmentConfig, augment_batch
from evaluators.datasets import load_dataset
from evaluators.losses import function_matching, soft_cross_entropy
from evaluators.teaching import Lesson, TeacherForward, lesson_key
from evaluators.optim import KDConfig, TrainConfig
from evaluators.predict import predict_logits
from evaluators.step import TEACHER_VARIABLES, train_epoch
from evaluators.train import train
from evaluators.variables import TrainState, initialize
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError
from search_spaces.model import build_model

SPACE = SPACES.get("mobile_small").with_input(resolution=8)
STUDENT = "000-000--000--0"
MEMBERS = ("100-100--100--1", "002-002--002--0")
MIX = AugmentConfig(crop_padding=1, mixup=1.0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def members():
    return tuple((SPACE.decode(k), initialize(SPACE.decode(k), seed=i + 7)) for i, k in enumerate(MEMBERS))


def test_pure_function_matching_is_zero_when_the_student_is_the_teacher():
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.normal(0, 3, (16, 10)), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(16) % 10, 10)
    assert float(function_matching(t, t, targets, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    grad = jax.grad(lambda s: function_matching(s, t, targets, 2.0, 1.0))(t)
    assert float(jnp.max(jnp.abs(grad))) < 1e-6
    s = jnp.asarray(rng.normal(0, 3, (16, 10)), jnp.float32)
    assert float(function_matching(s, t, targets, 2.0, 1.0)) > 0.01
    # alpha = 0: the soft cross-entropy alone, which is the usual one on one-hot targets
    assert float(function_matching(s, t, targets, 2.0, 0.0)) == pytest.approx(float(soft_cross_entropy(s, targets)))


def test_online_teacher_in_the_step_gives_the_teachers_own_logits_on_the_augmented_batch(digits, members):
    """A probe loss returns a fixed random projection of the teacher logits the step received; the
    oracle augments the same rows with the step's key and runs each member separately."""
    lesson = Lesson(MIX, TeacherForward(tuple(a for a, _ in members)), digits.num_classes)
    student = SPACE.decode(STUDENT)
    v = initialize(student, seed=0)
    model = build_model(student)
    state = TrainState.create(apply_fn=model.apply, params=v["params"], tx=optax.sgd(0.0),
                              batch_stats=v["batch_stats"], key=jax.random.PRNGKey(11))
    steps, batch = 3, 32
    idx = np.random.default_rng(0).permutation(len(digits.y_train))[: steps * batch].reshape(steps, batch)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(batch, digits.num_classes)), jnp.float32)
    data = {"x": jnp.asarray(digits.x_train), "y": jnp.asarray(digits.y_train)}
    hp = {TEACHER_VARIABLES: tuple(m for _, m in members)}
    _, seen = jax.jit(lambda s, i: train_epoch(s, data, i, hp, lambda lg, b, h: jnp.sum(b["teacher"] * probe),
                                               lesson=lesson))(state, jnp.asarray(idx, jnp.int32))
    for t in range(steps):
        rows = idx[t]
        x, _ = augment_batch(MIX, lesson_key(jax.random.PRNGKey(11), jnp.int32(t)), jnp.asarray(digits.x_train[rows]),
                             {"targets": jax.nn.one_hot(digits.y_train[rows], digits.num_classes)})
        assert not np.allclose(np.asarray(x), digits.x_train[rows])  # the view is really augmented
        oracle = np.mean([predict_logits(a, m, np.asarray(x)) for a, m in members], axis=0)
        assert float(seen[t]) == pytest.approx(float(np.sum(oracle * np.asarray(probe))), rel=1e-4, abs=1e-3)


def test_resuming_an_interrupted_distillation_gives_the_uninterrupted_weights(digits, members):
    student = SPACE.decode(STUDENT)
    cfg = TrainConfig(epochs=2, batch_size=64, learning_rate=0.005)
    kd = KDConfig(temperature=2.0, alpha=1.0)
    blobs = {}
    whole = train(student, digits, cfg, kd=kd, teacher=members, augment=MIX,
                  checkpoint=lambda e, b: blobs.__setitem__(e, b))

    class Killed(Exception):
        pass

    def die_after_first(epoch, blob):
        blobs["saved"] = blob
        raise Killed

    with pytest.raises(Killed):
        train(student, digits, cfg, kd=kd, teacher=members, augment=MIX, checkpoint=die_after_first)
    resumed = train(student, digits, cfg, kd=kd, teacher=members, augment=MIX, resume_from=blobs["saved"])
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    jax.tree.map(np.testing.assert_array_equal, resumed.variables, whole.variables)


def test_augmented_training_repeats_exactly_with_the_same_seed_and_changes_the_result(digits, members):
    student = SPACE.decode(STUDENT)
    cfg = TrainConfig(epochs=1, batch_size=64, learning_rate=0.005)
    a = train(student, digits, cfg, augment=MIX)
    b = train(student, digits, cfg, augment=MIX)
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    plain = train(student, digits, cfg)
    assert not np.allclose(plain.variables["params"]["classifier"]["kernel"],
                           a.variables["params"]["classifier"]["kernel"])


def test_online_teacher_that_does_not_fit_the_data_is_refused(digits, members):
    student = SPACE.decode(STUDENT)
    wrong = SPACES.get("mobile_small").with_input(resolution=12).decode(MEMBERS[0])
    with pytest.raises(NasError, match=r"teacher member 0 '100-100--100--1': takes"):
        train(student, digits, TrainConfig(epochs=1), teacher=[(wrong, initialize(wrong))])
    with pytest.raises(NasError, match=r"online teacher replaces teacher_logits"):
        train(student, digits, TrainConfig(epochs=1), teacher=members,
              teacher_logits=np.zeros((len(digits.y_train), 10), np.float32))
