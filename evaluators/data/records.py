"""The per-record readers that loader worker processes receive (pickled): light on purpose.

A Grain worker unpickles these and imports this module, so it imports NumPy and Pillow only (not
JAX, not the registries): a worker that imported JAX took seconds to start on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluators.data.images import Decoder
from search_spaces.errors import NasError

if TYPE_CHECKING:  # the contract module imports JAX (via the spec), which workers must not pay for
    from evaluators.data.source import Records


def import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # optional (the `data` extra); ~1 s to import
    except ImportError:
        raise NasError("dataset 'tfds' needs tensorflow-datasets and array-record: "
                       "pip install 'compact-nas[data]'") from None
    return tfds


@dataclass(frozen=True, eq=False)
class FolderRecords:
    """One split's image files and labels; `read(i)` decodes file i."""

    paths: tuple[str, ...]
    labels: np.ndarray
    decoder: Decoder

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray | None:
        return self.decoder(self.paths[i], self.paths[i])

    def where(self, i: int) -> str:
        return self.paths[i]


@dataclass(eq=False)
class TfdsRecords:
    """One TFDS split read by index; the data source is opened lazily in each process (workers too)."""

    name: str
    data_dir: str
    split: str
    image_key: str
    label_key: str
    labels: np.ndarray
    decoder: Decoder
    _source: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}  # reopened on the other side

    def _open(self) -> Any:
        if self._source is None:
            tfds = import_tfds()
            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                                            decoders={self.image_key: tfds.decode.SkipDecoding()})
        return self._source

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray | None:
        return self.decoder(self._open()[int(i)][self.image_key], self.where(i))

    def where(self, i: int) -> str:
        return f"tfds {self.name}[{self.split}] example {int(i)}"


@dataclass(frozen=True)
class ReadNormalised:
    """row -> (normalised float32 HWC image, int32 label), or None if unreadable and skippable.
    A picklable callable (Grain workers receive a copy)."""

    records: Records
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, row: Any) -> tuple[np.ndarray, np.int32] | None:
        row = int(row)
        image = self.records.read(row)
        if image is None:
            return None
        return (image.astype(np.float32) - self.mean) / self.std, np.int32(self.records.labels[row])


def readable(item: Any) -> bool:
    return item is not None
