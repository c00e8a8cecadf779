"""The `tfds` source: a TFDS dataset prepared locally (a builder over PNG files the test writes) is read
through TFDS's array_record data sources, without TensorFlow, and trains a candidate; nothing downloads."""

from __future__ import annotations

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds source needs the `data` extra")

from evaluators.data.spec import DataSpec  # noqa: E402
from evaluators.datasets import check_dataset, load_dataset  # noqa: E402
from evaluators.train import TrainConfig, train  # noqa: E402
from image_folders import write_digits_folder  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402
from search_spaces.errors import NasError  # noqa: E402

RES = 16


class DigitsPng(tfds.core.GeneratorBasedBuilder):
    """The digits as PNG files written by the test (train/ and test/ class folders)."""

    VERSION = tfds.core.Version("1.0.0")
    ROOT = None  # set by the fixture before preparing

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(RES, RES, 3)),
            "label": tfds.features.ClassLabel(names=[f"digit{i}" for i in range(10)])}))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(self.ROOT / s) for s in ("train", "test")}

    def _generate_examples(self, folder):
        for f in sorted(folder.glob("*/*.png")):
            yield f.name, {"image": str(f), "label": f.parent.name}  # encoded files: no TensorFlow needed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root, _, _ = write_digits_folder(tmp_path_factory.mktemp("pngs"), size=RES)
    out = tmp_path_factory.mktemp("tfds")
    DigitsPng.ROOT = root
    DigitsPng(data_dir=str(out), file_format="array_record").download_and_prepare()
    return out


def test_prepared_dataset_loads_without_tensorflow_and_trains_a_candidate(data_dir):
    ds = load_dataset("tfds", tfds_name="digits_png", data_dir=str(data_dir), resolution=RES, channels=3,
                      augment={"crop_padding": 2})
    assert "tensorflow" not in sys.modules
    assert ds.input_shape == (RES, RES, 3) and ds.num_classes == 10
    n_test = len(range(0, 1797, 5))
    assert len(ds.y_test) == n_test and len(ds.y_train) + len(ds.y_val) == 1797 - n_test  # val carved from train
    arch = SPACES.get("mobile_small").with_input(resolution=RES, in_channels=3).decode("002-002--002--0")
    res = train(arch, ds, TrainConfig(epochs=3, batch_size=64, learning_rate=5e-3))
    assert res.val_accuracy > 0.5  # ten classes: chance is 0.1


def test_grayscale_space_converts_tfds_images(data_dir):
    ds = load_dataset("tfds", tfds_name="digits_png", data_dir=str(data_dir), resolution=8, channels=1)
    assert ds.x_test.shape[1:] == (8, 8, 1)


def test_unprepared_or_unknown_datasets_say_how_to_prepare(data_dir, tmp_path):
    with pytest.raises(NasError, match=r"'mnist' is not prepared in .* tfds build mnist --data_dir .* "
                                       r"--file_format array_record"):
        check_dataset(DataSpec.from_dict({"name": "tfds", "tfds_name": "mnist", "data_dir": str(data_dir)}),
                      resolution=RES, channels=3)
    with pytest.raises(NasError, match=r"'no_such_set' is neither prepared in .* nor a known TFDS dataset"):
        check_dataset(DataSpec.from_dict({"name": "tfds", "tfds_name": "no_such_set", "data_dir": str(data_dir)}),
                      resolution=RES, channels=3)
    with pytest.raises(NasError, match=r"missing: TFDS data_dir not found \(dataset.data_dir\)"):
        load_dataset("tfds", tfds_name="digits_png", data_dir=str(tmp_path / "missing"), resolution=RES, channels=3)
    with pytest.raises(NasError, match=r"dataset.tfds_name: required"):
        load_dataset("tfds", data_dir=str(data_dir), resolution=RES, channels=3)
    with pytest.raises(NasError, match=r"dataset.train_split: 'training' is not a split of 'digits_png'; "
                                       r"available: train, test"):
        load_dataset("tfds", tfds_name="digits_png", data_dir=str(data_dir), train_split="training",
                     resolution=RES, channels=3)


def test_tfds_records_pickle_for_loader_workers(data_dir):
    import pickle

    ds = load_dataset("tfds", tfds_name="digits_png", data_dir=str(data_dir), resolution=RES, channels=3,
                      streaming=True)
    records = pickle.loads(pickle.dumps(ds.stream.records))
    img = records.read(int(ds.stream.rows[0]))
    assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
