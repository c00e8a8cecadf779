"""Augmentation: each transform does what it says on real pixels, keeps shapes, and is seeded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.augment import AugmentConfig, augment_batch, cutmix, cutout, mix, mixup, random_crop, random_flip
from search_spaces.errors import NasError

KEY = jax.random.PRNGKey(0)


def _batch(n=16, size=8, c=3):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, size, size, c)), jnp.float32) + 10.0  # no zeros


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = _batch()
    out = np.asarray(random_crop(KEY, x, 2))
    assert out.shape == x.shape
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for img, src in zip(out, padded):
        windows = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(src[dy:dy + 8, dx:dx + 8], img)]
        assert len(windows) == 1
    assert not np.array_equal(out, np.asarray(x))  # 16 images all drawing the centre: (1/25)^16


def test_flip_mirrors_about_half_of_the_images_exactly():
    x = _batch(n=64)
    out = np.asarray(random_flip(KEY, x))
    mirrored = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)]
    same = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)]
    assert all(m or s for m, s in zip(mirrored, same)) and 10 < sum(mirrored) < 54


def test_cutout_zeroes_one_square_of_at_most_size_squared_pixels():
    x = _batch(n=32, size=16)
    out = np.asarray(cutout(KEY, x, 6))
    zeros = (out == 0).all(axis=-1)
    assert np.all(zeros.sum(axis=(1, 2)) <= 36) and np.any(zeros.sum(axis=(1, 2)) == 36)
    for z in zeros:
        ys, xs = np.nonzero(z)
        assert len(ys) and (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == len(ys)  # one rectangle
    assert np.array_equal(out[~zeros], np.asarray(x)[~zeros])


def test_mixup_and_cutmix_mix_images_and_labels_by_the_same_weight():
    x = _batch(n=8)
    y = jax.nn.one_hot(jnp.arange(8) % 4, 4)
    xm, ym = mixup(KEY, x, y, 0.4)
    assert np.allclose(np.asarray(ym).sum(1), 1) and xm.shape == x.shape
    xc, yc = cutmix(KEY, x, y, 1.0)
    replaced = (np.asarray(xc) != np.asarray(x)).any(axis=-1).mean(axis=(1, 2))
    own = np.asarray(yc)[np.arange(8), np.arange(8) % 4]
    # an image's own label keeps the share of its pixels that were not replaced (partners may share the label)
    assert np.all(own >= 1 - replaced - 1e-6) and np.allclose(np.asarray(yc).sum(1), 1)


def test_config_applies_under_jit_and_is_deterministic_in_the_key():
    aug = AugmentConfig(crop_padding=2, flip=True, cutout=3)
    f = jax.jit(aug.__call__)
    x = _batch()
    assert np.array_equal(f(KEY, x), f(KEY, x)) and not np.array_equal(f(KEY, x), f(jax.random.PRNGKey(1), x))
    assert AugmentConfig().enabled is False and aug.enabled


@pytest.mark.parametrize("d, match", [
    ({"crop_pading": 4}, r"dataset.augment.crop_pading: unknown key; allowed: crop_padding, flip, cutout, mixup, cutmix"),
    ({"crop_padding": -1}, r"dataset.augment.crop_padding: invalid value -1"),
    ({"flip": "yes"}, r"dataset.augment.flip: invalid value 'yes'; allowed true or false"),
    ({"cutout": 2.5}, r"dataset.augment.cutout: invalid value 2.5"),
    ({"mixup": -0.2}, r"dataset.augment.mixup: invalid value -0.2; allowed a number >= 0"),
    ({"cutmix": "lots"}, r"dataset.augment.cutmix: invalid value 'lots'; allowed a number >= 0"),
    ({"crop": 2}, r"dataset.augment.crop: unknown key; allowed: crop_padding, flip, cutout, mixup, cutmix"),
    ([4], r"dataset.augment: expected a mapping"),
])
def test_bad_augment_keys_name_the_key(d, match):
    with pytest.raises(NasError, match=match):
        AugmentConfig.from_dict(d, "dataset.augment")


# ---- mixing with soft targets (distillation: labels and cached teacher logits blended alike)
def _mixed_batch(n=8):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(n, 6, 5, 2)), jnp.float32), jax.nn.one_hot(jnp.arange(n) % 4, 4)


def test_mix_with_weight_one_is_the_identity():
    x, t = _mixed_batch()
    out = mix({"x": x, "t": t}, jnp.float32(1.0), jax.random.permutation(KEY, 8))
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["t"], t)


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_mixing_a_batch_of_copies_of_one_image_changes_nothing(fn):
    x, _ = _mixed_batch(n=1)
    x = jnp.repeat(x, 8, axis=0)
    t = jnp.repeat(jax.nn.one_hot(jnp.array([2]), 4), 8, axis=0)
    mixed, out = fn(KEY, x, {"t": t}, 1.0)
    np.testing.assert_allclose(mixed, x, atol=1e-6)
    np.testing.assert_allclose(out["t"], t, atol=1e-6)


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_every_per_row_target_is_blended_with_the_same_partners(fn):
    x, t = _mixed_batch()
    mixed, out = fn(KEY, x, {"t": t, "logits": 3.0 * t}, 1.0)
    np.testing.assert_allclose(out["t"].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["logits"], 3.0 * out["t"], atol=1e-5)
    assert mixed.shape == x.shape and int((np.asarray(out["t"]) > 1e-6).sum(axis=1).max()) <= 2


def test_cutmix_targets_weigh_the_pixels_each_image_contributes():
    x = jnp.zeros((8, 10, 10, 1)).at[:4].set(1.0)  # rows 0-3 all ones, rows 4-7 all zeros
    t = jnp.concatenate([jnp.ones((4, 1)), jnp.zeros((4, 1))])  # "share of ones" as the target
    mixed, out = cutmix(KEY, x, {"t": t}, 1.0)
    np.testing.assert_allclose(np.asarray(mixed).mean(axis=(1, 2, 3)), np.asarray(out["t"])[:, 0], atol=1e-6)


def test_augment_batch_is_off_by_default_keeps_the_image_draws_and_is_deterministic():
    x, t = _mixed_batch()
    same = augment_batch(AugmentConfig(), KEY, x, {"t": t})
    np.testing.assert_array_equal(same[0], x)
    geo = AugmentConfig(crop_padding=1, flip=True)
    np.testing.assert_array_equal(augment_batch(geo, KEY, x, {"t": t})[0], geo(KEY, x))  # dataset augmentation unchanged
    cfg = AugmentConfig(crop_padding=1, flip=True, mixup=0.5, cutmix=0.5)
    a = jax.jit(lambda k: augment_batch(cfg, k, x, {"t": t}))
    np.testing.assert_array_equal(a(KEY)[0], a(KEY)[0])
    assert not np.array_equal(a(KEY)[0], a(jax.random.PRNGKey(4))[0])
    assert cfg.mixes and not geo.mixes and AugmentConfig(mixup=1.0).enabled
