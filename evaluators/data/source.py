"""The contract between a dataset source and the loader: what a source returns, and its registry.

A source is a function `(spec, shape) -> RawData | Catalog` registered by name in `DATASETS`.
`RawData` is pooled in-memory arrays (digits, mnist5k, npz); `Catalog` is random-access
`Records` per split (folder, tfds): the loader either decodes them all into memory or streams
the training split from disk. Calling a record source is cheap (it lists files or reads
metadata, decoding nothing), which is what `evaluators.datasets.check_dataset` relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from evaluators.data.spec import DataSpec
from search_spaces.registry import Registry


@dataclass(frozen=True)
class Shape:
    """The images a search space takes: `resolution` x `resolution` x `channels`."""

    resolution: int
    channels: int


@dataclass(frozen=True, eq=False)
class RawData:
    """Pooled images (NHW or NHWC) and labels, or a fixed test split too."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int | None = None


class Records(Protocol):
    """One split's images, read one at a time (picklable: Grain workers get a copy).

    `labels` holds every row's class without decoding; `read(i)` returns image i as uint8 HWC at
    the target shape, or None when it is unreadable and the spec allows skipping it (otherwise it
    raises `NasError` naming the file); `where(i)` names row i for messages.
    """

    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, i: int) -> np.ndarray | None: ...

    def where(self, i: int) -> str: ...


@dataclass(frozen=True, eq=False)
class Catalog:
    """A record source's splits; `val`/`test` None when the source has none (carved from train)."""

    train: Records
    val: Records | None
    test: Records | None
    num_classes: int
    classes: Sequence[str] = ()
    where: str = ""  # the folder or TFDS name, for messages


Source = Callable[[DataSpec, Shape | None], "RawData | Catalog"]
DATASETS: Registry[Source] = Registry("dataset")
