"""Batch augmentation: identities where nothing should change, and what each transform preserves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.augment import AugmentConfig, augment_batch, crop_pad, cutmix, flip, mix, mixup
from search_spaces.errors import NasError

KEY = jax.random.PRNGKey(3)


def _batch(n=8, h=6, w=5, c=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(n) % 4, 4)
    return x, targets


def test_mix_with_weight_one_is_the_identity():
    x, t = _batch()
    out = mix({"x": x, "t": t}, jnp.float32(1.0), jax.random.permutation(KEY, 8))
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["t"], t)


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_mixing_a_batch_of_copies_of_one_image_changes_nothing(fn):
    x, _ = _batch(n=1)
    x = jnp.repeat(x, 8, axis=0)
    t = jnp.repeat(jax.nn.one_hot(jnp.array([2]), 4), 8, axis=0)
    mixed, out = fn(KEY, x, {"t": t}, 1.0)
    np.testing.assert_allclose(mixed, x, atol=1e-6)
    np.testing.assert_allclose(out["t"], t, atol=1e-6)


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_mixed_targets_stay_distributions_and_blend_two_rows(fn):
    x, t = _batch()
    mixed, out = fn(KEY, x, {"t": t}, 1.0)
    np.testing.assert_allclose(out["t"].sum(axis=1), 1.0, atol=1e-6)
    assert mixed.shape == x.shape
    assert int((np.asarray(out["t"]) > 1e-6).sum(axis=1).max()) <= 2


def test_cutmix_targets_weigh_the_pixels_each_image_contributes():
    x = jnp.zeros((8, 10, 10, 1)).at[:4].set(1.0)  # rows 0-3 all ones, rows 4-7 all zeros
    t = jnp.concatenate([jnp.ones((4, 1)), jnp.zeros((4, 1))])  # "share of ones" as the target
    mixed, out = cutmix(KEY, x, {"t": t}, 1.0)
    np.testing.assert_allclose(np.asarray(mixed).mean(axis=(1, 2, 3)), np.asarray(out["t"])[:, 0], atol=1e-6)


def test_crop_with_zero_padding_and_flip_twice_are_identities():
    x, _ = _batch()
    np.testing.assert_array_equal(crop_pad(KEY, x, 0), x)
    np.testing.assert_array_equal(flip(KEY, flip(KEY, x)), x)


def test_crop_shifts_each_image_within_the_padding():
    x = jnp.arange(8 * 6 * 6, dtype=jnp.float32).reshape(8, 6, 6, 1) + 1  # no zeros inside
    out = np.asarray(crop_pad(KEY, x, 2))
    for i in range(8):
        inside = out[i][out[i] != 0]
        assert len(inside) >= 4 * 4  # at most 2 rows and 2 columns of padding come in
        assert set(inside.tolist()) <= set(np.asarray(x[i]).ravel().tolist())


def test_augment_batch_is_deterministic_in_its_key_and_off_by_default():
    x, t = _batch()
    same = augment_batch(AugmentConfig(), KEY, x, {"t": t})
    np.testing.assert_array_equal(same[0], x)
    cfg = AugmentConfig(crop=1, flip=True, mixup=0.5, cutmix=0.5)
    a = jax.jit(lambda k: augment_batch(cfg, k, x, {"t": t}))
    np.testing.assert_array_equal(a(KEY)[0], a(KEY)[0])
    assert not np.array_equal(a(KEY)[0], a(jax.random.PRNGKey(4))[0])


@pytest.mark.parametrize("bad, match", [
    ({"crop": -1}, r"aug\.crop: -1; allowed an integer >= 0"),
    ({"flip": "yes"}, r"aug\.flip: 'yes'; allowed true or false"),
    ({"mixup": -0.2}, r"aug\.mixup: -0.2; allowed a number >= 0"),
    ({"mixup": "lots"}, r"aug\.mixup: 'lots' is not a number"),
    ({"cutout": 4}, r"aug\.cutout: unknown key; allowed: crop, flip, mixup, cutmix"),
])
def test_bad_augment_settings_name_the_key(bad, match):
    with pytest.raises(NasError, match=match):
        AugmentConfig.from_dict(bad, "aug")
