"""Augmentation: each transform does what it says on real pixels, keeps shapes, and is seeded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.augment import AugmentConfig, cutmix, cutout, mixup, random_crop, random_flip
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
    ({"crop_pading": 4}, r"dataset.augment.crop_pading: unknown key; allowed: crop_padding, flip, cutout"),
    ({"crop_padding": -1}, r"dataset.augment.crop_padding: invalid value -1"),
    ({"flip": "yes"}, r"dataset.augment.flip: invalid value 'yes'; allowed true or false"),
    ({"cutout": 2.5}, r"dataset.augment.cutout: invalid value 2.5"),
    ([4], r"dataset.augment: expected a mapping"),
])
def test_bad_augment_keys_name_the_key(d, match):
    with pytest.raises(NasError, match=match):
        AugmentConfig.from_dict(d, "dataset.augment")
