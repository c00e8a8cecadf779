"""Losses: cross-entropy, Hinton distillation (values, gradients, validation) and hint loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.losses import cross_entropy, hint_loss, kd_loss
from search_spaces.errors import NasError


def _logits(seed: int, shape=(6, 5), scale=2.0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32))


LABELS = jnp.asarray([0, 1, 2, 3, 4, 1], dtype=jnp.int32)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy(smoothing):
    z = np.asarray(_logits(0), np.float64)
    y = np.asarray(LABELS)
    target = np.eye(5)[y] * (1 - smoothing) + smoothing / 5
    expected = -(target * _np_log_softmax(z)).sum(axis=1).mean()
    assert float(cross_entropy(_logits(0), LABELS, smoothing)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_kd_at_alpha_zero_is_cross_entropy(smoothing):
    s, t = _logits(1), _logits(2)
    kd = kd_loss(s, t, LABELS, temperature=4.0, alpha=0.0, label_smoothing=smoothing)
    assert float(kd) == pytest.approx(float(cross_entropy(s, LABELS, smoothing)), rel=1e-6)


def test_kd_at_alpha_one_is_minimised_by_the_teacher_logits():
    t = _logits(3)

    def f(s):
        return kd_loss(s, t, LABELS, temperature=3.0, alpha=1.0)

    assert abs(float(f(t))) < 1e-6
    assert float(jnp.max(jnp.abs(jax.grad(f)(t)))) < 1e-6
    assert float(f(_logits(4))) > 0.01  # any other student pays
    # and it is the Hinton form: T^2 * KL(softmax(t/T) || softmax(s/T))
    s = np.asarray(_logits(4), np.float64)
    lt, ls = _np_log_softmax(np.asarray(t, np.float64) / 3.0), _np_log_softmax(s / 3.0)
    expected = 9.0 * (np.exp(lt) * (lt - ls)).sum(axis=1).mean()
    assert float(f(_logits(4))) == pytest.approx(expected, rel=1e-4)


def test_kd_gradient_matches_finite_differences():
    s, t = _logits(5, (3, 4)), _logits(6, (3, 4))
    labels = jnp.asarray([1, 0, 3], dtype=jnp.int32)

    def f(x):
        return kd_loss(x, t, labels, temperature=2.0, alpha=0.7, label_smoothing=0.1)

    grad = np.asarray(jax.grad(f)(s))
    eps = 1e-2
    num = np.zeros_like(grad)
    base = np.asarray(s)
    for idx in np.ndindex(*base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        num[idx] = (float(f(jnp.asarray(plus))) - float(f(jnp.asarray(minus)))) / (2 * eps)
    np.testing.assert_allclose(grad, num, atol=2e-4, rtol=2e-3)


def test_kd_teacher_gets_no_gradient():
    s, t = _logits(7), _logits(8)
    g = jax.grad(lambda tt: kd_loss(s, tt, LABELS, temperature=4.0, alpha=0.5))(t)
    assert float(jnp.max(jnp.abs(g))) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0, "alpha": 0.5}, "temperature"),
    ({"temperature": -1.0, "alpha": 0.5}, "temperature"),
    ({"temperature": 2.0, "alpha": 1.5}, "alpha"),
    ({"temperature": 2.0, "alpha": -0.1}, "alpha"),
])
def test_kd_validates_temperature_and_alpha(kwargs, match):
    with pytest.raises(NasError, match=match):
        kd_loss(_logits(0), _logits(1), LABELS, **kwargs)


def test_cross_entropy_rejects_bad_smoothing():
    with pytest.raises(NasError, match="label_smoothing"):
        cross_entropy(_logits(0), LABELS, 1.0)


def test_hint_loss_value_and_gradient_reach_the_projection():
    rng = np.random.default_rng(9)
    s = jnp.asarray(rng.normal(size=(4, 3, 3, 6)).astype(np.float32))  # feature maps: a 1x1 projection
    t = jnp.asarray(rng.normal(size=(4, 3, 3, 8)).astype(np.float32))
    p = jnp.asarray(rng.normal(size=(6, 8)).astype(np.float32))
    sn, tn, pn = (np.asarray(a, np.float64) for a in (s, t, p))
    diff = sn @ pn - tn
    assert float(hint_loss(s, t, p)) == pytest.approx((diff ** 2).mean(), rel=1e-5)
    gp, gs, gt = jax.grad(hint_loss, argnums=(2, 0, 1))(s, t, p)
    expected = 2 * np.einsum("nhwc,nhwd->cd", sn, diff) / diff.size
    np.testing.assert_allclose(np.asarray(gp), expected, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(gp))) > 0 and float(jnp.max(jnp.abs(gs))) > 0
    assert float(jnp.max(jnp.abs(gt))) == 0.0  # the teacher is a constant
    # a projection that maps the student onto the teacher gives zero loss
    t2 = jnp.einsum("nhwc,cd->nhwd", s, p)
    assert float(hint_loss(s, t2, p)) == pytest.approx(0.0, abs=1e-10)


def test_hint_loss_rejects_mismatched_shapes():
    s, t = jnp.zeros((2, 6)), jnp.zeros((2, 8))
    with pytest.raises(NasError, match=r"expected \(6, 8\)"):
        hint_loss(s, t, jnp.zeros((8, 6)))
    with pytest.raises(NasError, match="differ"):
        hint_loss(jnp.zeros((3, 6)), t, jnp.zeros((6, 8)))
