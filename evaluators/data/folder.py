"""The `folder` source: an ImageFolder-style tree, ROOT/train/CLASS/*.png|jpg, optional val/ and test/.

Classes are the training split's sub-folders in sorted order (label = position). Listing the tree
is cheap; images are decoded on demand (`FolderRecords.read`), all at once into memory or
streamed by the loader. A missing split folder other than train is carved from train.
"""

from __future__ import annotations

import os

import numpy as np

from evaluators.data.images import Decoder
from evaluators.data.records import FolderRecords
from evaluators.data.source import DATASETS, Catalog, Shape
from evaluators.data.spec import DataSpec
from search_spaces.errors import NasError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def needs_shape(name: str, shape: Shape | None) -> Shape:
    if shape is None:
        raise NasError(f"dataset '{name}' decodes images to the space's input shape: pass resolution and channels")
    return shape


@DATASETS.register("folder")
def load_folder(spec: DataSpec, shape: Shape | None = None) -> Catalog:
    """List ROOT/{train,val,test}_split/CLASS/* (no decoding); NasError for a missing root, split or
    class folder and for a class folder without images."""
    shape = needs_shape("folder", shape)
    root = spec.root
    if root is None:
        raise NasError("dataset.root: required by dataset 'folder' (a folder holding train/CLASS/*.png|jpg)")
    if not os.path.isdir(root):
        raise NasError(f"{root}: dataset folder not found (dataset.root)")
    train_dir = os.path.join(root, spec.train_split)
    if not os.path.isdir(train_dir):
        raise NasError(f"{root}: no '{spec.train_split}' folder; a folder dataset is ROOT/{spec.train_split}/CLASS/"
                       f"*.png|jpg, with optional {spec.val_split}/ and {spec.test_split}/ alike")
    classes = _class_dirs(train_dir)
    if not classes:
        raise NasError(f"{train_dir}: no class folders; expected {train_dir}/CLASS/*.png|jpg")
    decoder = Decoder(shape.resolution, shape.channels, spec.channels, spec.skip_corrupt)
    splits = {}
    for split in (spec.train_split, spec.val_split, spec.test_split):
        folder = os.path.join(root, split)
        if split != spec.train_split and not os.path.isdir(folder):
            splits[split] = None
            continue
        paths, labels = _index(folder, classes)
        splits[split] = FolderRecords(tuple(paths), np.asarray(labels, np.int64), decoder)
    return Catalog(splits[spec.train_split], splits[spec.val_split], splits[spec.test_split],
                   num_classes=len(classes), classes=tuple(classes), where=root)


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _index(folder: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Every image under folder/CLASS/, in sorted order, with its class index."""
    found = _class_dirs(folder)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise NasError(f"{os.path.join(folder, unknown[0])}: class '{unknown[0]}' is not a training class "
                       f"(training classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    paths, labels = [], []
    for c in found:
        d = os.path.join(folder, c)
        files = sorted(e.path for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise NasError(f"{d}: class folder has no images (allowed: {', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [classes.index(c)] * len(files)
    if not paths:
        raise NasError(f"{folder}: no class folders with images")
    return paths, labels
