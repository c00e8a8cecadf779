"""What an experiment's `dataset:` section says, validated once into a frozen value.

One spec serves every source: each source reads the keys it needs (`path` for npz, `root` for
folder, `tfds_name`/`data_dir` for tfds) and a key that the chosen source does not read is an
error, so a typo cannot silently fall back to a default dataset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from evaluators.augment import AugmentConfig
from search_spaces.errors import NasError

# keys each source reads besides the common ones (val/test fractions, split names, augment, streaming)
SOURCE_KEYS = {
    "digits": (), "mnist5k": (), "npz": ("path",),
    "folder": ("root", "channels", "skip_corrupt"),
    "tfds": ("tfds_name", "data_dir", "channels"),
}
PATH_KEYS = ("path", "root", "data_dir")


@dataclass(frozen=True)
class DataSpec:
    """A dataset request. Build from user data with `DataSpec.from_dict`.

    name: the source (`evaluators.datasets.DATASETS`): digits, mnist5k, npz, folder, tfds.
    path: the .npz file (npz). root: the ImageFolder tree (folder). tfds_name / data_dir: a TFDS
      dataset (e.g. 'cifar10' or 'cifar10/3.0.2') prepared in array_record format under data_dir.
    train_split / val_split / test_split: sub-folder (folder) or TFDS split names; a missing
      val or test split is carved from the training split with the seed (stratified).
    channels: None converts every image to the space's channels (grayscale <-> RGB); 1 or 3
      requires every image to have that many already (an image that does not is an error).
    skip_corrupt: skip unreadable images (named in a warning) instead of stopping with an error.
    streaming: None streams from disk when the decoded training split would exceed
      `STREAM_ABOVE_BYTES`; True/False forces it (folder and tfds only).
    augment: the training split's augmentation (`evaluators.augment.AugmentConfig`).
    """

    name: str = "digits"
    path: str | None = None
    root: str | None = None
    tfds_name: str | None = None
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    channels: int | None = None
    skip_corrupt: bool = False
    streaming: bool | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _validate(self, "dataset")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str | None, source: str = "dataset",
                  base: str | os.PathLike | None = None) -> "DataSpec":
        """Validate `d` (a mapping, or just a source name) into a spec; errors name `{source}.{key}`.

        Relative `path`/`root`/`data_dir` are resolved against `base` (default: the working
        directory now), so a trial running in another directory reads the same files.
        """
        if d is None:
            d = {}
        if isinstance(d, str):
            d = {"name": d}
        if isinstance(d, DataSpec):
            d = d.to_dict()
        if not isinstance(d, Mapping):
            raise NasError(f"{source}: expected a mapping or a dataset name, got {d!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = {}
        for k, v in d.items():
            if k not in allowed:
                raise NasError(f"{source}.{k}: unknown key; allowed: {', '.join(allowed)}")
            if k in ("val_fraction", "test_fraction") and isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise NasError(f"{source}.{k}: {v!r} is not a number") from None
            if k in PATH_KEYS and isinstance(v, (str, os.PathLike)):
                v = os.path.abspath(os.path.join(os.fspath(base) if base is not None else os.getcwd(),
                                                 os.path.expanduser(os.fspath(v))))
            if k == "augment":
                v = AugmentConfig.from_dict(v, f"{source}.augment")
            values[k] = v
        _validate({**{f.name: f.default for f in dataclasses.fields(cls) if f.name != "augment"},
                   "augment": AugmentConfig(), **values}, source)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that round-trips through `from_dict`."""
        return dataclasses.asdict(self)


def _validate(v: Any, source: str) -> None:
    get = (lambda k: v[k]) if isinstance(v, Mapping) else (lambda k: getattr(v, k))
    from_names = tuple(SOURCE_KEYS)
    name = get("name")
    if not isinstance(name, str):
        raise NasError(f"{source}.name: invalid value {name!r}; allowed one of {', '.join(from_names)}")
    for k in ("path", "root", "tfds_name", "data_dir"):
        if get(k) is not None and not isinstance(get(k), str):
            raise NasError(f"{source}.{k}: invalid value {get(k)!r}; allowed a string")
    for k in ("train_split", "val_split", "test_split"):
        if not isinstance(get(k), str) or not get(k) or "/" in get(k):
            raise NasError(f"{source}.{k}: invalid value {get(k)!r}; allowed a split name (no '/')")
    for k, lo_ok in (("val_fraction", False), ("test_fraction", True)):
        x = get(k)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 <= x < 1) or (x == 0 and not lo_ok):
            raise NasError(f"{source}.{k}: {x!r}; allowed a number in {'[0, 1)' if lo_ok else '(0, 1)'}")
    if get("val_fraction") + get("test_fraction") >= 1:
        raise NasError(f"{source}: val_fraction + test_fraction = {get('val_fraction') + get('test_fraction'):g}; "
                       f"allowed < 1")
    ch = get("channels")
    if ch is not None and (isinstance(ch, bool) or ch not in (1, 3)):
        raise NasError(f"{source}.channels: invalid value {ch!r}; allowed 1 (grayscale), 3 (RGB) or null "
                       f"(convert to the space's channels)")
    for k in ("skip_corrupt",):
        if not isinstance(get(k), bool):
            raise NasError(f"{source}.{k}: invalid value {get(k)!r}; allowed true or false")
    if get("streaming") is not None and not isinstance(get("streaming"), bool):
        raise NasError(f"{source}.streaming: invalid value {get('streaming')!r}; allowed true, false or null (auto)")
    if not isinstance(get("augment"), AugmentConfig):
        raise NasError(f"{source}.augment: expected a mapping with keys crop_padding, flip, cutout, mixup, cutmix")
    if name not in SOURCE_KEYS:
        return  # the registry lists the allowed names when the dataset is loaded or checked
    reads = SOURCE_KEYS[name]
    for k in ("path", "root", "tfds_name", "data_dir"):
        if get(k) is not None and k not in reads:
            takes = f"it reads {', '.join(reads)}" if reads else "it is built in and takes no path"
            raise NasError(f"{source}.{k}: dataset '{name}' does not read '{k}'; {takes}")
    if get("streaming") and name not in ("folder", "tfds"):
        raise NasError(f"{source}.streaming: dataset '{name}' is held in memory; only folder and tfds stream")
