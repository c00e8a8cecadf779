"""Datasets as immutable values: fixed train/val/test splits, normalised with train statistics.

A source in `DATASETS` (one module per kind under `evaluators/data/`: digits, mnist5k, npz,
folder, tfds) returns pooled in-memory arrays or random-access records per split; `load` splits
them with a seed (stratified when possible), standardises every split per channel with the mean
and standard deviation of the training split only, and caches the result in-process, so the many
trials that one worker process runs share one copy. A training split too large for memory (or
`streaming: true`) is not decoded: the `Dataset` carries a `Stream` that the training loop reads
through Grain (`evaluators/data/stream.py`). `check_dataset` is the cheap check a preflight runs
before any trial starts. Adding a dataset is one registry entry.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from evaluators.augment import AugmentConfig
from evaluators.data import builtin, folder, tfds  # noqa: F401  (each registers its source)
from evaluators.data.builtin import NPZ_KEYS  # noqa: F401  (re-exported)
from evaluators.data.source import DATASETS, Catalog, RawData, Records, Shape
from evaluators.data.spec import DataSpec
from evaluators.data.stream import Stream, StreamedImages
from search_spaces.errors import NasError

# A decoded training split above this many bytes (float32) streams from disk instead (`streaming: null`).
# Every Ray worker process holds its own copy of an in-memory dataset, hence well below the machine's RAM.
STREAM_ABOVE_BYTES = 1 << 30
STATS_SAMPLE = 4096  # training images the statistics of a streamed split are estimated from
DECODE_THREADS = min(8, os.cpu_count() or 1)  # Pillow releases the GIL while it decodes


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val/test splits; x float32 NHWC standardised with train statistics, y int32.

    Compared and hashed by identity (the cache returns one object per distinct request).
    `mean`/`std` are the per-channel statistics used, so new inputs can be normalised alike.
    `augment` is the training split's augmentation (applied inside the training step), `stream`
    is set when the training split is read from disk during training (then `x_train` holds no
    pixels and refuses to be read as an array; `y_train` is still complete).
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
    augment: AugmentConfig | None = None
    stream: Stream | None = None

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
        return (f"{self.name}: {h}x{w}x{c}, {self.num_classes} classes, train {len(self.y_train)}"
                f"{' (streamed)' if self.stream is not None else ''}, val {len(self.y_val)}, test {len(self.y_test)}")


@dataclass(frozen=True)
class DatasetInfo:
    """What `check_dataset` found: enough to compare with a search space before any training."""

    name: str
    resolution: int
    channels: int
    num_classes: int
    sizes: tuple[int, int, int]  # train, val, test rows (before skipping unreadable images)
    streaming: bool

    def summary(self) -> str:
        t, v, s = self.sizes
        return (f"{self.name}: {self.resolution}x{self.resolution}x{self.channels}, {self.num_classes} classes, "
                f"train {t}{' (streamed)' if self.streaming else ''}, val {v}, test {s}")


def load(spec: DataSpec, *, seed: int = 0, resolution: int | None = None, channels: int | None = None) -> Dataset:
    """The dataset `spec` asks for, split with `seed`; cached per process by its arguments.

    Args:
      spec: the validated `dataset:` section (`DataSpec.from_dict`).
      seed: fixes the carved splits (and a streamed split's statistics sample).
      resolution, channels: the space's input; image sources (folder, tfds) decode to it, the
        array sources (digits, mnist5k, npz) ignore it (their arrays fix the shape).

    Raises:
      NasError: unknown source, missing or unreadable files (naming them), bad fractions, labels.
    """
    DATASETS.get(spec.name)  # fail early, listing the allowed names
    shape = None if resolution is None else Shape(int(resolution), int(channels if channels is not None
                                                                           else spec.channels or 1))
    return _load_cached(spec, int(seed), shape, _stamp(spec))


def load_dataset(name: str, *, seed: int = 0, path: str | None = None, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, resolution: int | None = None, channels: int | None = None,
                 **keys: Any) -> Dataset:
    """Load dataset `name` with a split fixed by `seed` (see `load`); `keys` are further `dataset:`
    keys (root, tfds_name, data_dir, augment, streaming, ...).

    Pooled datasets are split into train/val/test by `val_fraction`/`test_fraction` of all
    rows (stratified by class when every class can be). For `npz`, the file's test split stays
    the test split, `val_fraction` of its train rows become validation, `test_fraction` is unused.
    Unknown names, bad files and bad fractions raise `NasError`.
    """
    DATASETS.get(name)
    d = {"name": name, "val_fraction": val_fraction, "test_fraction": test_fraction, **keys}
    if path is not None:
        d["path"] = os.fspath(path)
    return load(DataSpec.from_dict(d), seed=seed, resolution=resolution, channels=channels)


def check_dataset(spec: DataSpec, *, seed: int = 0, resolution: int | None = None,
                  channels: int | None = None, probe: int = 2) -> DatasetInfo:
    """Check that `spec` can be loaded, cheaply, before any trial starts (a preflight).

    In-memory array sources are loaded (they are small). Image sources are listed (missing
    folders, empty class folders, unprepared TFDS datasets fail here) and `probe` images per class
    of every split are decoded, so wrong channels and unreadable files surface now, named.
    Returns what a space must match (`DatasetInfo`); raises `NasError` otherwise.
    """
    shape = None if resolution is None else Shape(int(resolution), int(channels or spec.channels or 1))
    raw = DATASETS.get(spec.name)(spec, shape)
    if isinstance(raw, RawData):
        ds = load(spec, seed=seed, resolution=resolution, channels=channels)
        return DatasetInfo(spec.name, ds.resolution, ds.channels, ds.num_classes,
                           (len(ds.y_train), len(ds.y_val), len(ds.y_test)), False)
    if raw.num_classes < 2:
        raise NasError(f"{raw.where}: only {raw.num_classes} class found; a classification dataset needs at least 2")
    for records in (raw.train, raw.val, raw.test):
        if records is None:
            continue
        for c in np.unique(records.labels):
            for i in np.flatnonzero(records.labels == c)[:probe]:
                records.read(int(i))  # raises naming the file
    tr, va, te = _carve(raw, spec, seed)
    sizes = (len(tr[1]), len(va[1]), len(te[1]))
    return DatasetInfo(spec.name, shape.resolution, shape.channels, raw.num_classes, sizes,
                       _streams(spec, len(tr[1]), shape))


def _stamp(spec: DataSpec) -> tuple[int, ...] | None:
    """Modification stamps of the files behind `spec`: a rewritten file or folder is loaded again."""
    if spec.path is not None and os.path.isfile(spec.path):
        st = os.stat(spec.path)
        return (st.st_mtime_ns, st.st_size)
    if spec.root is not None and os.path.isdir(spec.root):
        dirs = [spec.root] + [os.path.join(spec.root, s) for s in (spec.train_split, spec.val_split, spec.test_split)]
        dirs = [d for d in dirs if os.path.isdir(d)]
        dirs += [e.path for d in dirs[1:] for e in os.scandir(d) if e.is_dir()]
        return tuple(os.stat(d).st_mtime_ns for d in dirs)
    return None


@functools.lru_cache(maxsize=8)
def _load_cached(spec: DataSpec, seed: int, shape: Shape | None, stamp: tuple[int, ...] | None) -> Dataset:
    raw = DATASETS.get(spec.name)(spec, shape)
    if isinstance(raw, Catalog):
        return _from_catalog(raw, spec, seed, shape)
    return _from_arrays(raw, spec, seed)


def _from_arrays(raw: RawData, spec: DataSpec, seed: int) -> Dataset:
    where = spec.path or spec.name
    x = raw.x[..., None] if raw.x.ndim == 3 else raw.x
    y = np.asarray(raw.y).astype(np.int64)
    y_test = None if raw.y_test is None else np.asarray(raw.y_test).astype(np.int64)
    labelled = [("y", y)] if y_test is None else [("y_train", y), ("y_test", y_test)]
    num_classes = raw.num_classes
    if num_classes is None:
        num_classes = max(int(a.max()) for _, a in labelled if len(a)) + 1
    _check_labels_in_range(where, labelled, num_classes)
    if y_test is None:
        tr, va, te = split_indices(y, seed=seed, val_fraction=spec.val_fraction, test_fraction=spec.test_fraction)
        splits = [(x[i], y[i]) for i in (tr, va, te)]
    else:
        x_test = raw.x_test[..., None] if raw.x_test.ndim == 3 else raw.x_test
        tr, va, _ = split_indices(y, seed=seed, val_fraction=spec.val_fraction, test_fraction=0.0)
        splits = [(x[tr], y[tr]), (x[va], y[va]), (x_test, y_test)]
    mean, std = _statistics(splits[0][0])
    (xa, ya), (xb, yb), (xc, yc) = splits
    return Dataset(
        name=spec.name, x_train=_norm(xa, mean, std), y_train=_labels(ya), x_val=_norm(xb, mean, std),
        y_val=_labels(yb), x_test=_norm(xc, mean, std), y_test=_labels(yc), num_classes=int(num_classes),
        resolution=int(x.shape[1]), channels=int(x.shape[3]), mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std), augment=spec.augment if spec.augment.enabled else None,
    )


def _from_catalog(raw: Catalog, spec: DataSpec, seed: int, shape: Shape) -> Dataset:
    if raw.num_classes < 2:
        raise NasError(f"{raw.where}: only {raw.num_classes} class found; a classification dataset needs at least 2")
    (tr_rec, tr_rows), (va_rec, va_rows), (te_rec, te_rows) = _carve(raw, spec, seed)
    streaming = _streams(spec, len(tr_rows), shape)
    val, test = decode_rows(va_rec, va_rows), decode_rows(te_rec, te_rows)
    if streaming:
        rng = np.random.default_rng([seed, 2])
        sample = tr_rows if len(tr_rows) <= STATS_SAMPLE else np.sort(rng.choice(tr_rows, STATS_SAMPLE, replace=False))
        mean, std = _statistics(decode_rows(tr_rec, sample)[0])
        stream = Stream(tr_rec, np.asarray(tr_rows, np.int64), np.float32(mean), np.float32(std))
        x_train, y_train = StreamedImages(raw.where, (len(tr_rows), shape.resolution, shape.resolution, shape.channels)), tr_rec.labels[tr_rows]
    else:
        train = decode_rows(tr_rec, tr_rows)
        mean, std = _statistics(train[0])
        stream = None
        x_train, y_train = _norm(train[0], mean, std), _labels(train[1])
    for name, (x, _) in (("train", (x_train, None)), ("val", val), ("test", test)):
        if len(x) == 0:
            raise NasError(f"{raw.where}: the {name} split has no readable images")
    return Dataset(
        name=spec.name, x_train=x_train, y_train=_labels(y_train), x_val=_norm(val[0], mean, std),
        y_val=_labels(val[1]), x_test=_norm(test[0], mean, std), y_test=_labels(test[1]),
        num_classes=raw.num_classes, resolution=shape.resolution, channels=shape.channels,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        augment=spec.augment if spec.augment.enabled else None, stream=stream,
    )


def _carve(raw: Catalog, spec: DataSpec, seed: int) -> list[tuple[Records, np.ndarray]]:
    """(records, rows) of train, val and test: a split the source lacks is carved from its training
    split (stratified, fixed by `seed`): val by `val_fraction`, test by `test_fraction`."""
    y = raw.train.labels
    n = len(y)
    rng = np.random.default_rng(seed)
    rest, test = np.arange(n), None
    if raw.test is None:
        rest, test = _split(rest, y, int(round(n * spec.test_fraction)), rng)
    train, val = rest, None
    if raw.val is None:
        train, val = _split(rest, y[rest], int(round(n * spec.val_fraction)), rng)
    out = [(raw.train, np.sort(train))]
    for records, rows, key in ((raw.val, val, "val"), (raw.test, test, "test")):
        out.append((raw.train, np.sort(rows)) if records is None else (records, np.arange(len(records))))
        if len(out[-1][1]) == 0:
            raise NasError(f"{raw.where}: the {key} split is empty (no {getattr(spec, key + '_split')}/ split and "
                           f"dataset.{key}_fraction of {n} training images is 0 rows)")
    if len(out[0][1]) == 0:
        raise NasError(f"{raw.where}: no training images left after carving val/test")
    return out


def _streams(spec: DataSpec, n_train: int, shape: Shape) -> bool:
    if spec.streaming is not None:
        return spec.streaming
    return n_train * shape.resolution ** 2 * shape.channels * 4 > STREAM_ABOVE_BYTES


def decode_rows(records: Records, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of `rows`, decoded in threads; unreadable images that the
    spec allows skipping are left out (and named in one warning)."""
    rows = np.asarray(rows, np.int64)
    with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
        images = list(pool.map(records.read, rows.tolist(), chunksize=64))
    kept = [i for i, im in enumerate(images) if im is not None]
    if len(kept) < len(images):
        bad = [records.where(int(rows[i])) for i, im in enumerate(images) if im is None]
        warnings.warn(f"skipped {len(bad)} unreadable image(s) (dataset.skip_corrupt): {', '.join(bad[:5])}"
                      f"{', ...' if len(bad) > 5 else ''}", stacklevel=2)
    if not kept:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.int64)
    return np.stack([images[i] for i in kept]), records.labels[rows[kept]]


def _check_labels_in_range(where: str, labelled: list[tuple[str, np.ndarray]], num_classes: int) -> None:
    for key, a in labelled:
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            bad = int(a.min()) if a.min() < 0 else int(a.max())
            raise NasError(f"{where}: {key} has label {bad}; allowed 0..{num_classes - 1}")
    if num_classes < 2:
        raise NasError(f"{where}: only {num_classes} class found; a classification dataset needs at least 2")


def _statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float64) of NHWC images; a constant channel gets std 1."""
    x = x.astype(np.float32)
    mean = x.mean(axis=(0, 1, 2), dtype=np.float64)
    std = x.std(axis=(0, 1, 2), dtype=np.float64)
    return mean, np.where(std > 1e-12, std, 1.0)


def _norm(a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = ((a.astype(np.float64) - mean) / std).astype(np.float32)
    out.setflags(write=False)  # shared by every trial of the process
    return out


def _labels(a: np.ndarray) -> np.ndarray:
    out = np.asarray(a).astype(np.int32)
    out.setflags(write=False)
    return out


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
