"""Experiment configs: validation at the edge, --set overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nas.config import DistillConfig, ExportConfig, apply_overrides, config_from_dict, load_config
from search_spaces.errors import NasError

BASE = {"name": "t", "space": "mobile_small", "dataset": "digits", "objective": {"cost": "params", "target": 1000}}


def test_quickstart_config_is_valid():
    cfg = load_config("experiments/quickstart.yaml")
    assert cfg.num_trials >= 12 and cfg.dataset.name == "digits" and cfg.space == "mobile_small"


def test_set_overrides_dotted_keys_with_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["num_trials=4", "train.epochs=1", "objective.constraints.params=5e4", "dataset.name=mnist5k",
                          "export.formats=[flax]"])
    assert cfg.num_trials == 4 and cfg.train.epochs == 1 and cfg.objective.constraints["params"] == 5e4
    assert cfg.dataset.name == "mnist5k" and cfg.export.formats == ("flax",)


@pytest.mark.parametrize("override,message", [
    ("num_trails=3", "num_trails: unknown key; allowed:"),
    ("search.algoritm=x", "search.algoritm: unknown key"),
    ("num_trials=0", "num_trials: must be >= 1"),
    ("num_trials=abc", "num_trials: expected an integer"),
    ("search.scheduler=hyperband", "unknown scheduler 'hyperband'; allowed: asha"),
    ("objective.target=null", "objective.target: required"),
    ("top_k=50", "top_k: 50 exceeds num_trials"),
])
def test_bad_values_name_the_file_and_key(tmp_path, override, message):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    with pytest.raises(NasError) as e:
        load_config(p, [override])
    assert str(p) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(NasError, match="expected key=value"):
        apply_overrides({}, ["nokey"], "x")
    with pytest.raises(NasError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_required_keys():
    with pytest.raises(NasError, match="missing required key"):
        config_from_dict({"name": "x"})


@pytest.mark.parametrize("section,message", [
    ({"temperature": 0}, "distill.temperature: must be > 0"),
    ({"alpha": 1.5}, "distill.alpha: must be in [0, 1]"),
    ({"epoch": 3}, "distill.epoch: unknown key"),
])
def test_distill_section_is_validated_by_its_stage(section, message):
    with pytest.raises(NasError, match=message.replace("[", "\\[").replace("]", "\\]")):
        DistillConfig.from_dict(section)


def test_export_section_is_validated_by_its_stage():
    assert ExportConfig.from_dict({"formats": "flax"}).formats == ("flax",)
    with pytest.raises(NasError, match="export.formats: unknown format 'tflite'"):
        ExportConfig.from_dict({"formats": ["flax", "tflite"]})


# ---------------------------------------------------------------- evaluator.table resolved at load time
TABLE_CFG = {"name": "t", "space": "macro_cifar", "evaluator": {"kind": "table"}, "objective": {"cost": None}}


def test_a_table_name_resolves_to_the_packaged_file_wherever_the_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named like the table here
    cfg = config_from_dict({**TABLE_CFG, "evaluator": {"kind": "table", "table": "nas-bench-macro"}}, source="x.yaml")
    path = Path(cfg.evaluator.table)
    assert path.is_absolute() and path.name == "nas-bench-macro_cifar10.json" and path.is_file()
    assert config_from_dict(cfg.to_dict()).evaluator.table == cfg.evaluator.table  # a saved config reloads as is


def test_a_relative_table_path_becomes_absolute_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my.json").write_text("{}")  # existence is checked here; the contents when the table is read
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({**TABLE_CFG, "evaluator": {"kind": "table", "table": "my.json"}})
    assert cfg.evaluator.table == str(tmp_path.resolve() / "my.json")


def test_an_unknown_table_is_one_line_naming_the_file_the_key_and_the_known_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NasError) as e:
        config_from_dict({**TABLE_CFG, "evaluator": {"kind": "table", "table": "nas-bench-201"}}, source="exp.yaml")
    msg = str(e.value)
    assert msg.startswith("exp.yaml: evaluator.table: ") and "nas-bench-macro" in msg and "\n" not in msg
