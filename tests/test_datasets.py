"""Datasets: splits, normalisation with train statistics, npz files and their errors, batching."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from evaluators.datasets import DATASETS, batches, epoch_indices, load_dataset, pad_batches, split_indices
from search_spaces.errors import NasError


@pytest.fixture(scope="module")
def digits_raw():
    d = load_digits()
    return d.data.reshape(-1, 8, 8, 1), d.target


def _denorm(ds, x):
    return x.astype(np.float64) * np.asarray(ds.std) + np.asarray(ds.mean)


def test_registry_lists_the_builtin_datasets():
    assert {"digits", "mnist5k", "npz"} <= set(DATASETS.names())


def test_digits_split_sizes_shapes_and_stratification():
    ds = load_dataset("digits", seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (1257, 270, 270)
    assert ds.input_shape == (8, 8, 1) and ds.x_train.shape == (1257, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.resolution == 8 and ds.channels == 1
    # stratified: every class holds its share of the val split to within one row
    full = np.bincount(np.concatenate([ds.y_train, ds.y_val, ds.y_test]), minlength=10)
    assert np.all(np.abs(np.bincount(ds.y_val, minlength=10) - full * 270 / 1797) <= 1)


def test_split_indices_partition_all_rows_and_depend_only_on_the_seed():
    y = np.repeat(np.arange(5), 40)
    a = split_indices(y, seed=3, val_fraction=0.2, test_fraction=0.1)
    b = split_indices(y, seed=3, val_fraction=0.2, test_fraction=0.1)
    c = split_indices(y, seed=4, val_fraction=0.2, test_fraction=0.1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(200))
    assert [len(p) for p in a] == [140, 40, 20]


def test_load_is_deterministic_cached_and_seed_dependent():
    a = load_dataset("digits", seed=0)
    assert load_dataset("digits", seed=0) is a  # the in-process cache
    from evaluators import datasets

    datasets._load_cached.cache_clear()
    b = load_dataset("digits", seed=0)
    assert b is not a
    for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    c = load_dataset("digits", seed=1)
    assert not np.array_equal(a.y_val, c.y_val)
    assert not a.x_train.flags.writeable  # shared arrays are read-only


def test_normalisation_uses_train_statistics_only(digits_raw):
    x_raw, _ = digits_raw
    ds = load_dataset("digits", seed=0)
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-4
    assert abs(float(ds.x_val.mean())) > 1e-4  # val is not standardised with its own statistics
    train_raw = _denorm(ds, ds.x_train)
    np.testing.assert_allclose(train_raw, np.round(train_raw), atol=1e-4)  # raw pixel values come back
    assert ds.mean[0] == pytest.approx(np.round(train_raw).mean(), rel=1e-9)
    assert ds.std[0] == pytest.approx(np.round(train_raw).std(), rel=1e-9)
    assert ds.mean[0] != pytest.approx(x_raw.mean(), rel=1e-6)  # not the pooled statistics
    np.testing.assert_allclose(ds.normalize(np.round(_denorm(ds, ds.x_val))), ds.x_val, atol=1e-5)


def test_mnist5k_is_real_28x28_mnist():
    ds = load_dataset("mnist5k")
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (3500, 750, 750)
    assert np.all(np.bincount(ds.y_val) == 75)


def test_unknown_dataset_lists_the_allowed_names():
    with pytest.raises(NasError, match="unknown dataset .cifar.; allowed: digits, folder, mnist5k, npz, tfds"):
        load_dataset("cifar")


@pytest.mark.parametrize("kwargs, match", [
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "allowed < 1"),
    ({"path": "x.npz"}, "takes no path"),
])
def test_bad_load_arguments(kwargs, match):
    with pytest.raises(NasError, match=match):
        load_dataset("digits", **kwargs)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _toy(n_train=60, n_test=20, nhwc=False, dtype=np.uint8):
    rng = np.random.default_rng(0)
    shape = (6, 6, 3) if nhwc else (6, 6)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape)).astype(dtype),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 256, (n_test, *shape)).astype(dtype),
        "y_test": np.arange(n_test) % 3,
    }


@pytest.mark.parametrize("nhwc, dtype", [(False, np.uint8), (True, np.float32)])
def test_npz_round_trip_keeps_its_test_split(tmp_path, nhwc, dtype):
    arrays = _toy(nhwc=nhwc, dtype=dtype)
    path = _write_npz(tmp_path / "toy.npz", **arrays)
    ds = load_dataset("npz", path=path, seed=0, val_fraction=0.2)
    channels = 3 if nhwc else 1
    assert ds.input_shape == (6, 6, channels) and ds.num_classes == 3
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (48, 12, 20)
    x_test = arrays["x_test"].reshape(20, 6, 6, channels)
    np.testing.assert_allclose(_denorm(ds, ds.x_test), x_test, atol=1e-3)
    assert np.array_equal(ds.y_test, arrays["y_test"])
    # train + val are exactly the file's train rows
    got = np.concatenate([_denorm(ds, ds.x_train), _denorm(ds, ds.x_val)]).reshape(60, -1)
    want = arrays["x_train"].reshape(60, -1).astype(np.float64)
    assert sorted(map(tuple, np.round(got, 2))) == sorted(map(tuple, np.round(want, 2)))
    # per-channel statistics from the train split only
    assert np.allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)


def test_npz_rewritten_file_is_loaded_again(tmp_path):
    arrays = _toy()
    path = _write_npz(tmp_path / "toy.npz", **arrays)
    first = load_dataset("npz", path=path)
    arrays["y_test"] = (arrays["y_test"] + 1) % 3
    import os

    _write_npz(tmp_path / "toy.npz", **arrays)
    os.utime(path, ns=(1, 1))  # make sure the stamp changes even within one clock tick
    second = load_dataset("npz", path=path)
    assert np.array_equal(second.y_test, arrays["y_test"]) and not np.array_equal(first.y_test, second.y_test)


def test_npz_needs_a_path_and_an_existing_file(tmp_path):
    with pytest.raises(NasError, match="needs a path"):
        load_dataset("npz")
    with pytest.raises(NasError, match="missing.npz: file not found"):
        load_dataset("npz", path=str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(NasError, match="junk.npz: not a readable .npz"):
        load_dataset("npz", path=str(tmp_path / "junk.npz"))


def _broken(**changes):
    arrays = _toy()
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    return arrays


@pytest.mark.parametrize("changes, match", [
    ({"y_test": None}, "missing array 'y_test'"),
    ({"x_train": np.zeros((60, 36))}, r"x_train has shape \(60, 36\); allowed \(N, H, W\) or \(N, H, W, C\)"),
    ({"x_train": np.zeros((60, 6, 5))}, "x_train images are 6x5; allowed square"),
    ({"x_test": np.zeros((20, 8, 8))}, "x_test images are"),
    ({"y_train": np.arange(59) % 3}, "x_train has 60 rows but y_train has 59"),
    ({"y_test": np.arange(20).reshape(20, 1)}, "y_test has shape"),
    ({"y_train": -(np.arange(60) % 3)}, "y_train has label -2; allowed 0..2"),
    ({"y_test": np.full(20, 7), "num_classes": np.array(3)}, "y_test has label 7; allowed 0..2"),
    ({"y_train": np.linspace(0, 1, 60)}, "y_train has dtype float64; allowed integer"),
])
def test_npz_errors_name_the_file_and_key(tmp_path, changes, match):
    path = _write_npz(tmp_path / "bad.npz", **_broken(**changes))
    with pytest.raises(NasError, match=match) as e:
        load_dataset("npz", path=path)
    assert "bad.npz" in str(e.value) and "\n" not in str(e.value)


def test_batches_have_fixed_shapes_and_cover_the_data():
    x, y = np.arange(50).reshape(50, 1).astype(np.float32), np.arange(50)
    got = list(batches(x, y, 16, rng=np.random.default_rng(0)))
    assert [b[0].shape for b in got] == [(16, 1)] * 3
    seen = np.concatenate([b[1] for b in got])
    assert len(set(seen)) == 48 and not np.array_equal(seen, np.arange(48))  # shuffled, two dropped
    assert all(np.array_equal(bx[:, 0], by) for bx, by in got)  # rows stay paired
    tail = list(batches(x, y, 16, rng=None, drop_last=False))
    assert [len(b[1]) for b in tail] == [16, 16, 16, 2] and np.array_equal(tail[0][1], np.arange(16))
    idx = epoch_indices(50, 16, np.random.default_rng(1))
    assert idx.shape == (3, 16) and idx.dtype == np.int32 and len(set(idx.ravel())) == 48
    padded, n = pad_batches(x, 16)
    assert padded.shape == (64, 1) and n == 50 and np.all(padded[50:] == 0)
