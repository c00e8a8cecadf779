"""The compression report: metrics.json figures, the compressed folder's model card and `nas report`.

A real tiny compressed model: `nas compress` prunes winner 1 of a hand-built run directory (random
weights, no fine-tuning, so no teacher trains) and measures every figure for real.
"""

from __future__ import annotations

import json

import pytest

from evaluators.cost import analytic_cost
from evaluators.energy import energy
from evaluators.onnx_export import arch_variables, to_onnx
from evaluators.variables import load_variables, save_variables
from nas.cli import main
from nas.compress import run_compress
from nas.compress_report import CompressionReport, read_compression_report
from nas.export.card import compressed_card
from nas.report import write_report
from nas.rundir import read_architecture
from tests.test_report import SPACE, build_run

BATCHES = ("batch1", "batch32")
pytestmark = pytest.mark.slow  # one real (untrained) compression with latency measurements, ~25 s of CPU


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir, winners = build_run(tmp_path_factory.mktemp("compreport"))
    arch = SPACE.decode(winners[0]["key"])
    save_variables(run_dir / "winners" / "01" / "variables.msgpack", arch_variables(arch))
    (folder,) = run_compress(run_dir, winner=1, options={"prune": "macs=0.5", "epochs": 0, "kd": False,
                                                        "latency_budget_s": 0.02, "calibration_images": 32},
                             printer=lambda *a, **k: None)
    return run_dir, arch, folder


def test_ratios_are_before_over_after_of_the_files_and_architectures(run):
    run_dir, arch, folder = run
    m = json.loads((folder / "metrics.json").read_text())
    small = read_architecture(folder / "architecture.json")
    original = to_onnx(arch, load_variables(run_dir / "winners" / "01" / "variables.msgpack"))
    assert m["params"] == {"before": analytic_cost(arch).params, "after": analytic_cost(small).params}
    assert m["macs"] == {"before": analytic_cost(arch).macs, "after": analytic_cost(small).macs}
    assert m["onnx_bytes"]["after"] == (folder / "model.onnx").stat().st_size
    assert m["onnx_bytes"]["before"] == original.ByteSize()
    for k in ("params", "macs", "onnx_bytes"):
        assert m["ratios"][k] == pytest.approx(m[k]["before"] / m[k]["after"])
    assert m["ratios"]["macs"] >= 2  # macs=0.5 keeps at most half
    for name, e in m["energy_mj"].items():
        profile, precision = name.split(":")
        assert e["after"] == pytest.approx(energy(small, profile, precision).total_mj)
        assert e["ratio"] == pytest.approx(e["before"] / e["after"])


def test_latency_is_measured_fp32_and_int8_at_batch_1_and_32_with_consistent_speedups(run):
    m = json.loads((run[2] / "metrics.json").read_text())
    lat = m["latency_ms"]
    assert set(lat) == {"before", "after", "before_int8", "after_int8"}
    assert all(set(v) == set(BATCHES) and min(v.values()) > 0 for v in lat.values())
    assert "only for timing" in m["latency_int8_source"]  # no QAT: model.int8.onnx is not shipped
    assert not (run[2] / "model.int8.onnx").exists()
    for b in BATCHES:
        assert m["speedup"][b] == pytest.approx(lat["before"][b] / lat["after"][b])
        assert m["speedup_int8"][b] == pytest.approx(lat["before"][b] / lat["after_int8"][b])
        for w in ("before", "after"):
            assert m["speedup_int8_vs_fp32"][w][b] == pytest.approx(lat[w][b] / lat[f"{w}_int8"][b])


def test_the_folder_has_a_model_card_with_the_report(run):
    folder = run[2]
    card = (folder / "README.md").read_text()
    rep = read_compression_report(folder)
    assert "## Compression report" in card and f"`{rep.pruned_from}`" in card
    for fig in (rep.params, rep.macs, rep.onnx_bytes):
        assert f"| {fig.ratio:.2f}x |" in card and f"{int(fig.before):,d}" in card and f"{int(fig.after):,d}" in card
    assert f"{rep.speedup('after', 'batch32'):.2f}x" in card and f"{rep.speedup('after_int8', 'batch1'):.2f}x" in card
    assert f"{100 * rep.accuracy_after:.2f}%" in card and f"{rep.accuracy_change_pt:+.2f} pt" in card
    for name, e in rep.energy_mj.items():
        assert f"| {name} | {e.before:.4g} | {e.after:.4g} | {e.ratio:.2f}x |" in card
    assert "model.int8.onnx` runs the same way" not in card  # no int8 file in this folder


def test_nas_report_has_a_compression_section_listing_each_compressed_model(run, capsys):
    run_dir, _, folder = run
    assert main(["report", str(run_dir), "--no-references"]) == 0
    text = (run_dir / "report" / "report.md").read_text()
    rep = read_compression_report(folder)
    assert "## Compression" in text and f"`{folder.name}`" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| `{folder.name}` |"))
    assert f"| {rep.params.ratio:.2f}x | {rep.macs.ratio:.2f}x | {rep.onnx_bytes.ratio:.2f}x |" in row
    assert f"{rep.speedup('after', 'batch1'):.2f}x / {rep.speedup('after', 'batch32'):.2f}x" in row


def test_a_run_without_compressed_models_has_no_compression_section(tmp_path):
    run_dir, _ = build_run(tmp_path)
    assert "## Compression" not in write_report(run_dir, references=False).read_text()


def test_an_older_metrics_json_without_the_new_keys_still_reads(run, tmp_path):
    """metrics.json as the stage wrote it before the report was completed: no energy ratios, no int8
    timing without QAT, no speedup_int8_vs_fp32, no latency_int8_source."""
    run_dir, _, folder = run
    m = json.loads((folder / "metrics.json").read_text())
    old = {k: v for k, v in m.items() if k not in ("speedup_int8", "speedup_int8_vs_fp32", "latency_int8_source")}
    old["latency_ms"] = {k: v for k, v in m["latency_ms"].items() if k in ("before", "after")}
    old["energy_mj"] = {k: {"before": v["before"], "after": v["after"]} for k, v in m["energy_mj"].items()}
    rep = CompressionReport.from_metrics(old, folder.name)
    assert rep.speedup("after_int8", "batch1") is None and rep.latency_int8_source is None
    assert rep.energy_mj["rpi4:fp32"].ratio == pytest.approx(m["energy_mj"]["rpi4:fp32"]["ratio"])
    assert rep.speedup("after", "batch32") == pytest.approx(m["speedup"]["batch32"])
    card = compressed_card(read_architecture(folder / "architecture.json"), old, folder.name)
    assert "original, int8" not in card and f"{rep.macs.ratio:.2f}x" in card
    bare = CompressionReport.from_metrics({"key": "k"})  # nothing but a key: every figure missing
    assert bare.params.ratio is None and bare.accuracy_change_pt is None and not bare.latency_ms
    assert "n/a" in compressed_card(read_architecture(folder / "architecture.json"), {"key": "k"}, "x")
