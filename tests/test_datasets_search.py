"""experiments/folder_example.yaml end to end on real PNG files: a short search (real Ray Tune), distill,
export; and a bad folder stops the CLI with one line and exit 2 before Ray starts."""

from __future__ import annotations

import json

import pytest

from image_folders import write_digits_folder
from trials import trained_rows
from nas.cli import main
from nas.config import load_config
from nas.distill import run_distill
from nas.export import export_run
from nas.tune import run_search

pytestmark = pytest.mark.slow
EXAMPLE = "experiments/folder_example.yaml"


def _overrides(root, out):
    return [f"dataset.root={root}", f"output_dir={out}", "num_trials=1", "top_k=1", "train.epochs=1",
            "distill.epochs=1", "objective.constraints.params=60000"]


def test_folder_example_searches_distills_and_exports_real_pngs(tmp_path):
    root, _, _ = write_digits_folder(tmp_path / "pngs", size=32)  # the digits as 32x32 RGB PNG files
    cfg = load_config(EXAMPLE, _overrides(root, tmp_path / "runs"))
    run_dir = run_search(cfg, printer=lambda *a, **k: None)
    rows = trained_rows(run_dir)
    assert len(rows) == 1 and all(r["status"] == "ok" and 0 <= float(r["accuracy"]) <= 1 for r in rows)
    saved = (run_dir / "config.yaml").read_text()
    assert str(root) in saved and "crop_padding: 4" in saved  # the resolved root and the augmentation
    report = run_distill(run_dir, printer=lambda *a, **k: None)
    assert [w["rank"] for w in report["winners"]] == [1]
    folders = export_run(run_dir, printer=lambda *a, **k: None)
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1


def test_a_missing_image_folder_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["run", EXAMPLE, "--set", f"dataset.root={tmp_path / 'nowhere'}", "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "nowhere: dataset folder not found (dataset.root)" in err
    assert not (tmp_path / "folder_example").exists()  # stopped before any run directory or Ray
