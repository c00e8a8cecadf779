"""The `tfds` source: a TensorFlow Datasets dataset already prepared (array_record) in a local data_dir.

Reading goes through TFDS's random-access data sources (`tfds.data_source`, ArrayRecord files)
with image decoding skipped there and done here by Pillow, so TensorFlow is not needed to train
(measured: TFDS 4.9.10 reads array_record data sources without TensorFlow installed). Nothing is
downloaded at run time: a dataset that is not prepared is a one-line error saying how to prepare
it. Preparing is a separate, one-time step (`tfds build`); builders whose examples hold encoded
image files prepare without TensorFlow too, builders that yield NumPy images need it to encode.
Needs the `data` extra: pip install 'compact-nas[data]'.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from evaluators.data.folder import needs_shape
from evaluators.data.images import Decoder
from evaluators.data.records import TfdsRecords, import_tfds
from evaluators.data.source import DATASETS, Catalog, Shape
from evaluators.data.spec import DataSpec
from search_spaces.errors import NasError

DEFAULT_DATA_DIR = "~/tensorflow_datasets"


def _prepare_hint(name: str, data_dir: str) -> str:
    return f"prepare it once with: tfds build {name} --data_dir {data_dir} --file_format array_record"


@DATASETS.register("tfds")
def load_tfds(spec: DataSpec, shape: Shape | None = None) -> Catalog:
    """Open a prepared TFDS dataset (metadata and labels only); NasError if it is missing, not prepared,
    not in array_record format, or has no image/class-label features."""
    shape = needs_shape("tfds", shape)
    if not spec.tfds_name:
        raise NasError("dataset.tfds_name: required by dataset 'tfds' (e.g. cifar10 or cifar10/3.0.2)")
    data_dir = spec.data_dir or os.path.expanduser(DEFAULT_DATA_DIR)
    return _catalog(spec.tfds_name, data_dir, spec.train_split, spec.val_split, spec.test_split,
                    Decoder(shape.resolution, shape.channels, spec.channels, skip_corrupt=False))


@functools.lru_cache(maxsize=4)
def _catalog(name: str, data_dir: str, train: str, val: str, test: str, decoder: Decoder) -> Catalog:
    tfds = import_tfds()
    if not os.path.isdir(data_dir):
        raise NasError(f"{data_dir}: TFDS data_dir not found (dataset.data_dir); {_prepare_hint(name, data_dir)}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad version strings, ...: all mean the same to the user
        raise NasError(f"dataset.tfds_name: '{name}' is neither prepared in {data_dir} nor a known TFDS dataset "
                       f"({type(e).__name__}); {_prepare_hint(name, data_dir)}") from None
    if not builder.is_prepared():
        raise NasError(f"dataset.tfds_name: '{name}' is not prepared in {data_dir} (nothing is downloaded at run "
                       f"time); {_prepare_hint(name, data_dir)}")
    if "array_record" not in str(builder.info.file_format).lower():
        raise NasError(f"dataset.tfds_name: '{name}' in {data_dir} is stored as {builder.info.file_format}; random "
                       f"access needs array_record: {_prepare_hint(name, data_dir)}")
    features = builder.info.features
    images = [k for k, f in features.items() if type(f).__name__ == "Image"]
    labels = [k for k, f in features.items() if type(f).__name__ == "ClassLabel"]
    if not images or not labels:
        raise NasError(f"dataset.tfds_name: '{name}' has features {', '.join(features)}; an image classification "
                       f"dataset needs an Image and a ClassLabel feature")
    image_key, label_key = ("image" if "image" in images else images[0]), ("label" if "label" in labels else labels[0])
    available = list(builder.info.splits)
    if train not in available:
        raise NasError(f"dataset.train_split: '{train}' is not a split of '{name}'; available: {', '.join(available)}")

    def split(s: str) -> TfdsRecords | None:
        if s not in available:
            return None
        source = tfds.data_source(name, split=s, data_dir=data_dir, download=False,
                                  decoders={image_key: tfds.decode.SkipDecoding()})
        ys = np.fromiter((r[label_key] for r in _chunks(source)), np.int64, count=len(source))
        return TfdsRecords(name, data_dir, s, image_key, label_key, ys, decoder)

    return Catalog(split(train), split(val), split(test), num_classes=int(features[label_key].num_classes),
                   classes=tuple(features[label_key].names), where=f"tfds {name}")


def _chunks(source: Any, size: int = 1024):
    """Every record of `source` (images left encoded), read in batches."""
    for start in range(0, len(source), size):
        yield from source.__getitems__(list(range(start, min(start + size, len(source)))))
