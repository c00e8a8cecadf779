"""The `folder` source on real PNG/JPEG files: classes, splits, decoding, channels, bad input, streaming."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from evaluators.data.spec import DataSpec
from evaluators.datasets import check_dataset, load, load_dataset
from image_folders import write_digits_folder
from search_spaces.errors import NasError

RES = 16  # small images keep these tests cheap; the end-to-end test uses 32x32


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root, x, y = write_digits_folder(tmp_path_factory.mktemp("digits"), size=RES)
    return root, x, y


def _copy(digits_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(digits_root[0], root)
    return root


def _load(root, **keys):
    return load_dataset("folder", root=str(root), resolution=keys.pop("resolution", RES),
                        channels=keys.pop("channels", 3), **keys)


def test_folder_classes_splits_and_pixels_are_the_files(digits_root):
    root, x, y = digits_root
    ds = _load(root, seed=0)
    assert ds.input_shape == (RES, RES, 3) and ds.num_classes == 10
    n_test = len(range(0, len(y), 5))
    assert len(ds.y_test) == n_test and len(ds.y_train) + len(ds.y_val) == len(y) - n_test
    assert abs(len(ds.y_val) - round((len(y) - n_test) * 0.15)) <= 1  # val carved from train
    # the test split is test/CLASS/* in sorted order: pixels and labels are the written ones
    order = sorted(range(0, len(y), 5), key=lambda i: (y[i], i))
    raw_test = np.round(ds.x_test * np.asarray(ds.std) + np.asarray(ds.mean))
    np.testing.assert_array_equal(raw_test, x[order])
    np.testing.assert_array_equal(ds.y_test, y[order])
    assert abs(float(ds.x_train.mean())) < 1e-4  # standardised with the training split's statistics


def test_folder_converts_to_grayscale_and_resizes_for_the_space(digits_root):
    ds = _load(digits_root[0], resolution=8, channels=1)
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.channels == 1


def test_same_seed_same_splits_and_a_rewritten_folder_is_read_again(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    a, b = _load(root, seed=3), _load(root, seed=3)
    assert a is b and not np.array_equal(a.x_val, _load(root, seed=4).x_val)  # other images, same class counts
    extra = root / "test" / "digit0" / "9999.png"
    shutil.copy(next((root / "test" / "digit0").iterdir()), extra)
    c = _load(root, seed=3)
    assert len(c.y_test) == len(a.y_test) + 1


def test_explicit_val_folder_is_used_as_the_validation_split(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    for c in range(10):
        (root / "val" / f"digit{c}").mkdir(parents=True)
        for f in sorted((root / "train" / f"digit{c}").iterdir())[:3]:
            shutil.move(str(f), root / "val" / f"digit{c}" / f.name)
    ds = _load(root)
    assert len(ds.y_val) == 30 and np.array_equal(np.bincount(ds.y_val), np.full(10, 3))


@pytest.mark.parametrize("damage, match", [
    (lambda r: shutil.rmtree(r), r"copy: dataset folder not found \(dataset.root\)"),
    (lambda r: shutil.rmtree(r / "train"), r"copy: no 'train' folder; a folder dataset is ROOT/train/CLASS"),
    (lambda r: [shutil.rmtree(p) for p in (r / "train").iterdir()], r"train: no class folders"),
    (lambda r: [p.unlink() for p in (r / "train" / "digit3").iterdir()], r"digit3: class folder has no images"),
    (lambda r: (r / "test" / "digit10").mkdir(), r"test/digit10: class 'digit10' is not a training class"),
])
def test_bad_trees_are_one_line_errors_naming_the_folder(digits_root, tmp_path, damage, match):
    root = _copy(digits_root, tmp_path)
    damage(root)
    for call in (lambda: _load(root), lambda: check_dataset(DataSpec.from_dict({"name": "folder", "root": str(root)}),
                                                            resolution=RES, channels=3)):
        with pytest.raises(NasError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_a_corrupt_image_is_named_and_skipped_only_when_allowed(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    bad = sorted((root / "train" / "digit5").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    spec = DataSpec.from_dict({"name": "folder", "root": str(root)})
    with pytest.raises(NasError, match=rf"{bad.name}: unreadable or corrupt image .*skip_corrupt: true"):
        check_dataset(spec, resolution=RES, channels=3)  # the preflight probes the first images of each class
    with pytest.raises(NasError, match=rf"{bad.name}: unreadable or corrupt image"):
        _load(root)
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable image.*{bad.name}"):
        ds = _load(root, skip_corrupt=True)
    assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == len(digits_root[2]) - 1


def test_images_whose_channels_do_not_fit_are_named(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    odd = sorted((root / "train" / "digit2").iterdir())[0]
    Image.open(odd).convert("L").save(odd)
    strict = DataSpec.from_dict({"name": "folder", "root": str(root), "channels": 3})
    with pytest.raises(NasError, match=rf"{odd.name}: image has 1 channels \(mode L\) but dataset.channels is 3"):
        load(strict, resolution=RES, channels=3)
    assert _load(root).channels == 3  # channels: null converts it instead
    with pytest.raises(NasError, match="the space takes 4-channel images; image datasets decode to 1"):
        _load(root, channels=4)


@pytest.mark.parametrize("d, match", [
    ({"name": "folder", "rot": "x"}, r"dataset.rot: unknown key; allowed: name, path, root"),
    ({"name": "digits", "root": "x"}, r"dataset.root: dataset 'digits' does not read 'root'"),
    ({"name": "npz", "path": "a.npz", "streaming": True}, r"dataset.streaming: dataset 'npz' is held in memory"),
    ({"name": "folder", "root": "x", "channels": 2}, r"dataset.channels: invalid value 2; allowed 1"),
    ({"name": "folder", "root": "x", "skip_corrupt": "yes"}, r"dataset.skip_corrupt: invalid value 'yes'"),
])
def test_bad_dataset_keys_are_named(d, match):
    with pytest.raises(NasError, match=match):
        DataSpec.from_dict(d)


def test_relative_roots_resolve_against_the_loading_directory(tmp_path):
    spec = DataSpec.from_dict({"name": "folder", "root": "data/imgs"}, base=tmp_path)
    assert spec.root == str(tmp_path / "data" / "imgs")
    assert DataSpec.from_dict(spec.to_dict()) == spec  # round-trips (a run directory's config.yaml)


def test_streaming_keeps_pixels_on_disk_and_refuses_array_reads(digits_root):
    root = digits_root[0]
    ds = _load(root, streaming=True)
    mem = _load(root)
    assert ds.stream is not None and len(ds.x_train) == len(mem.y_train) and ds.x_train.shape == mem.x_train.shape
    np.testing.assert_array_equal(ds.y_train, mem.y_train)
    np.testing.assert_allclose(ds.mean, mem.mean, rtol=1e-6)  # the whole split is below the statistics sample
    with pytest.raises(NasError, match=r"training split is streamed from disk .*dataset.streaming: false"):
        np.asarray(ds.x_train)
    np.testing.assert_array_equal(ds.x_val, mem.x_val)  # val/test are decoded in memory either way


@pytest.mark.slow
def test_streamed_training_with_augmentation_learns_like_in_memory(digits_root):
    from evaluators.train import TrainConfig, train
    from search_spaces.catalog import SPACES

    arch = SPACES.get("mobile_small").with_input(resolution=RES, in_channels=3).decode("002-002--002--0")
    cfg = TrainConfig(epochs=3, batch_size=64, learning_rate=5e-3)
    augment = {"crop_padding": 2, "cutout": 4}
    streamed = train(arch, _load(digits_root[0], streaming=True, augment=augment), cfg)
    in_memory = train(arch, _load(digits_root[0], augment=augment), cfg)
    steps = 3 * (len(_load(digits_root[0]).y_train) // 64)
    assert streamed.steps == in_memory.steps == steps  # the same number of optimizer steps per epoch
    assert streamed.val_accuracy > 0.5 and in_memory.val_accuracy > 0.5  # ten classes: chance is 0.1
