"""`nas report` on a small hand-built run directory: PNGs, report.md naming the winners, references."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from evaluators.cost import analytic_cost
from nas.config import config_from_dict
from nas.report import (
    load_run,
    reference_architectures,
    write_report,
)
from search_spaces.catalog import load_space

SPACE = load_space("mobile_small").with_input(resolution=8)
WINNER_KEY = "100-100--100--1"  # ds k3 everywhere, smallest widths


def _config(tmp_path, epochs=1):
    return config_from_dict({
        "name": "tiny", "space": "mobile_small", "space_input": {"resolution": 8}, "dataset": "digits",
        "seed": 0, "num_trials": 8, "max_concurrent": 2, "output_dir": str(tmp_path), "top_k": 2,
        "train": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.005},
        "objective": {"cost": "params", "target": 40000, "constraints": {"params": 150000}},
    }, source="test")


def build_run(tmp_path, *, distill_format="v1", trained=None):
    """config.yaml, trials.csv (ok, failed, stopped, infeasible rows), winners.json, distill.json."""
    cfg = _config(tmp_path)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rng = np.random.default_rng(1)
    keys = [WINNER_KEY] + [SPACE.sample(rng).key for _ in range(8)]
    rows = []
    for i, key in enumerate(keys):
        cost = analytic_cost(SPACE.decode(key))
        status = "ok"
        if i == 5:
            status = "failed"
        elif i == 6:
            status = "stopped"
        elif cost.params > 150000:
            status = "infeasible"
        acc = "" if status in ("failed", "infeasible") else round(0.80 + 0.015 * (i % 7), 4)
        if i == 0 and trained is not None:
            acc = trained
        score = "" if acc == "" else round(acc * (cost.params / 40000) ** -0.07, 4)
        rows.append({"trial_id": f"abc_{i:05d}", "key": key, "status": status, "params": cost.params,
                     "macs": cost.macs, "accuracy": acc, "score": score, "epochs": 1 if acc != "" else "",
                     "wall_s": 3.0, "node_id": "n", "error": "ValueError: NaN loss" if status == "failed" else ""})
    with (run_dir / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["score"])[:2]
    winners = [{"rank": k + 1, "key": r["key"], "space": SPACE.name, "trial_id": r["trial_id"], "score": r["score"],
                "val_accuracy": r["accuracy"], "params": r["params"], "macs": r["macs"],
                "architecture": SPACE.decode(r["key"]).to_dict(), "checkpoint": f"winners/{k + 1:02d}"}
               for k, r in enumerate(ok)]
    (run_dir / "winners.json").write_text(json.dumps(winners))
    if distill_format == "v1":
        d = [{"rank": w["rank"], "key": w["key"], "test_accuracy_before": 0.8, "test_accuracy_after": 0.85}
             for w in winners]
    else:
        d = [{"rank": w["rank"], "key": w["key"], "test_accuracy_before": 0.8, "baseline_acc": 0.82, "kd_acc": 0.86,
              "gain": 0.06} for w in winners]
    (run_dir / "distill.json").write_text(json.dumps({"teacher": {"key": "x", "test_accuracy": 0.95},
                                                       "winners": d}))
    return run_dir, winners


def _pngs_ok(report):
    pngs = sorted(report.parent.glob("*.png"))
    assert {p.name for p in pngs} == {"pareto.png", "best_so_far.png", "layers_winner1.png"}
    for p in pngs:
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_report_without_references(tmp_path, fmt):
    run_dir, winners = build_run(tmp_path, distill_format=fmt)
    report = write_report(run_dir, references=False)
    assert report == run_dir / "report" / "report.md"
    _pngs_ok(report)
    text = report.read_text()
    for w in winners:
        assert f"`{w['key']}`" in text
    assert "## Winners" in text and "![accuracy vs cost](pareto.png)" in text
    assert "1 failed" in text and "1 stopped early" in text and "NaN loss" in text
    assert "0.8500" in text if fmt == "v1" else ("0.8600" in text and "0.8200" in text)  # after KD (+ baseline)
    assert "Hand-designed" not in text


def test_reference_architectures_are_the_named_hand_designs():
    refs = reference_architectures(SPACE)
    v2, v1 = refs["MobileNetV2-like (mb e6 k3)"], refs["MobileNetV1-like (ds k3)"]
    assert all(l.block == "mb" and l.kernel == 3 and l.expansion == 6 and not l.se for l in v2.layers)
    assert all(l.block == "ds" and l.kernel == 3 for l in v1.layers)
    assert len(v1.layers) == len(v2.layers) == 8  # every stage at full depth


def test_report_with_trained_references_is_cached(tmp_path):
    """A real tiny reference training (1 epoch on 8x8 digits), done once and cached in references.json."""
    run_dir, _ = build_run(tmp_path)
    refs = {"V1-like": "100-000--000--0"}  # one cheap reference keeps the test fast
    messages: list[str] = []
    report = write_report(run_dir, references=refs, printer=lambda *a, **k: messages.append(" ".join(map(str, a))))
    _pngs_ok(report)
    text = report.read_text()
    assert "## Hand-designed references" in text and "`100-000--000--0`" in text and "V1-like" in text
    cached = json.loads((run_dir / "references.json").read_text())
    assert 0 <= cached["V1-like"]["val_accuracy"] <= 1 and 0 <= cached["V1-like"]["test_accuracy"] <= 1
    assert len(messages) == 1
    write_report(run_dir, references=refs, printer=lambda *a, **k: messages.append(" ".join(map(str, a))))
    assert len(messages) == 1  # the second report reuses references.json
    run = load_run(run_dir)
    assert run.profile == "host" and all(np.isfinite(t["latency_ms"]) for t in run.trials if t["key"])


def test_report_of_a_run_where_every_trial_failed(tmp_path):
    run_dir, _ = build_run(tmp_path)
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    for r in rows:
        r.update(status="failed", accuracy="", score="", error="boom")
    with (run_dir / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (run_dir / "winners.json").write_text("[]")
    (run_dir / "distill.json").unlink()
    text = write_report(run_dir, references=False).read_text()
    assert "No winners" in text and f"{len(rows)} failed" in text
    assert (run_dir / "report" / "pareto.png").stat().st_size > 0
