"""Bad paths stop a run before Ray starts and before anything is written: one line, exit code 2.

Every path of an experiment is made absolute when the config is loaded (relative to the current
directory), so Ray trials, which run in their own working directory, see the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from nas.config import load_config
from nas.preflight import preflight
from search_spaces.errors import NasError


def _config(tmp_path: Path, **extra) -> Path:
    doc = {"name": "pf", "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
           "num_trials": 2, "max_concurrent": 1, "top_k": 1, "output_dir": str(tmp_path / "runs"),
           "train": {"epochs": 1}, "objective": {"cost": None}, **extra}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _no_ray_in_this_process():
    """Start each test without a Ray instance in this process (an earlier test file may have left its
    own local one connected), so a refusal can show that it started none."""
    if _ray_running():
        sys.modules["ray"].shutdown()
    yield


def _refused(capsys, argv: list[str], *needles: str) -> str:
    assert not _ray_running()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("nas: error: ")
    for n in needles:
        assert n in err, err
    assert not _ray_running()
    return err


def test_an_output_dir_that_cannot_be_created_is_one_line_before_ray(tmp_path, capsys):
    path = _config(tmp_path, output_dir="/proc/nope")
    _refused(capsys, ["search", str(path)], str(path), "output_dir: /proc/nope: not writable", "cannot be created")
    assert not Path("/proc/nope").exists()


def test_nas_run_refuses_a_missing_teacher_checkpoint_before_the_search(tmp_path, capsys):
    path = _config(tmp_path, distill={"teacher": {"checkpoint": "/nonexistent"}})
    _refused(capsys, ["run", str(path)], "distill.teacher.checkpoint", "/nonexistent", "no such folder")
    assert not (tmp_path / "runs").exists()  # no run directory, no config.yaml


def test_a_teacher_checkpoint_without_weights_or_with_a_broken_architecture_is_named(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "architecture.json").write_text("{not json")
    cfg = load_config(_config(tmp_path, distill={"teacher": {"checkpoint": str(folder)}}))
    with pytest.raises(NasError, match=r"distill\.teacher\.checkpoint: .*variables\.msgpack: no such file"):
        preflight(cfg, ("distill",))
    (folder / "variables.msgpack").write_bytes(b"")
    with pytest.raises(NasError, match=r"distill\.teacher\.checkpoint: .*architecture\.json: not an architecture"):
        preflight(cfg, ("distill",))
    preflight(cfg, ("search",))  # the search alone does not need the teacher


def test_a_missing_dataset_file_is_one_line_naming_the_key(tmp_path, capsys):
    path = _config(tmp_path, dataset={"name": "npz", "path": "data/missing.npz"})
    _refused(capsys, ["search", str(path)], "dataset.path", "missing.npz", "no such file")
    assert not (tmp_path / "runs").exists()


def test_a_storage_path_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = _config(tmp_path, storage_path=str(tmp_path / "afile" / "tune"))
    _refused(capsys, ["search", str(path)], "storage_path", "not writable", "is a file")


def test_paths_are_made_absolute_against_the_current_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    path = _config(tmp_path, output_dir="runs", storage_path="shared/tune", dataset={"name": "npz", "path": "d.npz"},
                   distill={"teacher": {"checkpoint": "teachers/t1"}})
    monkeypatch.chdir(work)
    cfg = load_config(path)
    assert cfg.output_dir == str(work / "runs") and cfg.storage_path == str(work / "shared" / "tune")
    assert cfg.dataset.path == str(work / "d.npz") and cfg.distill.teacher.checkpoint == str(work / "teachers" / "t1")
    assert load_config(path, ["storage_path=s3://bucket/nas"]).storage_path == "s3://bucket/nas"  # a URI stays
    saved = cfg.to_dict()
    assert saved["output_dir"] == str(work / "runs") and json.dumps(saved)  # config.yaml names absolute files


def test_distill_and_export_of_a_run_check_the_files_they_read(tmp_path, capsys):
    # a run directory whose config names a dataset file that has since gone
    cfg = load_config(_config(tmp_path, dataset={"name": "npz", "path": str(tmp_path / "gone.npz")}))
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for cmd in ("distill", "export"):
        _refused(capsys, [cmd, str(cfg.run_dir)], "dataset.path", "gone.npz")
