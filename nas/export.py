"""Export winners as self-contained folders, and load them back (`nas.load`).

A folder holds architecture.json (space, key, resolved network), cost.json, metrics.json and
flax/variables.msgpack. `load(folder)` returns a callable model whose test accuracy equals the
one recorded in metrics.json (it is computed through the very same loader at export time).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

FORMATS = ("flax",)


@dataclass(frozen=True)
class ExportConfig:
    """The `export:` section of an experiment config."""

    enabled: bool = True
    formats: tuple[str, ...] = ("flax",)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "export") -> "ExportConfig":
        d = dict(d or {})
        for k in d:
            if k not in ("enabled", "formats"):
                raise NasError(f"{source}.{k}: unknown key; allowed: enabled, formats")
        formats = d.get("formats", cls.formats)
        formats = tuple(formats.split(",")) if isinstance(formats, str) else tuple(formats)
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise NasError(f"{source}.formats: unknown format '{bad[0]}'; allowed: {', '.join(FORMATS)}")
        enabled = d.get("enabled", True)
        if not isinstance(enabled, bool):
            raise NasError(f"{source}.enabled: expected true or false, got {enabled!r}")
        return cls(enabled, formats)


@dataclass(frozen=True)
class LoadedModel:
    """A trained network: `model(x)` -> logits (numpy) for NHWC float32 inputs, batched internally."""

    arch: Architecture
    variables: Any
    folder: Path

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from evaluators.train import predict_logits

        return np.asarray(predict_logits(self.arch, self.variables, np.asarray(x, np.float32)))

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self(x).argmax(-1) == np.asarray(y)))


def load(folder: str | Path) -> LoadedModel:
    """Load an exported model folder (or a winners/NN checkpoint folder)."""
    from nas.teacher import load_checkpoint_folder

    arch, variables = load_checkpoint_folder(folder)
    return LoadedModel(arch, variables, Path(folder))


def export_run(run_dir: str | Path, *, out: str | Path | None = None, winner: int | None = None,
               formats: tuple[str, ...] = FORMATS, force: bool = False, printer=print) -> list[Path]:
    """Export the winners of `run_dir` (all, or rank `winner`) into `out` (default RUN_DIR/export)."""
    from evaluators.cost import analytic_cost
    from evaluators.datasets import load_dataset
    from evaluators.train import load_variables, save_variables
    from nas.search import experiment_from_run_dir, load_winners

    run_dir = Path(run_dir).resolve()
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise NasError(f"--format: unknown format '{bad[0]}'; allowed: {', '.join(FORMATS)}")
    exp = experiment_from_run_dir(run_dir)
    winners = load_winners(run_dir)
    if winner is not None:
        winners = [w for w in winners if w["rank"] == winner]
        if not winners:
            raise NasError(f"--winner {winner}: no such winner in {run_dir / 'winners.json'}")
    out = Path(out) if out else run_dir / "export"
    if out.exists() and any(out.iterdir()):
        if not force:
            raise NasError(f"{out}: output folder exists; pass --force to overwrite it")
        shutil.rmtree(out)
    distill = {}
    if (run_dir / "distill.json").exists():
        distill = {r["rank"]: r for r in json.loads((run_dir / "distill.json").read_text())["winners"]}
    c = exp.cfg.dataset
    data = load_dataset(c.name, seed=exp.cfg.seed, path=c.path, val_fraction=c.val_fraction,
                        test_fraction=c.test_fraction)
    written = []
    for w in winners:
        arch = Architecture.from_dict(w["architecture"])
        src = run_dir / w["checkpoint"]
        weights = src / ("distilled.msgpack" if w["rank"] in distill else "variables.msgpack")
        if not weights.exists():
            raise NasError(f"{weights}: checkpoint missing; re-run the search (or distillation)")
        folder = out / f"{w['rank']:02d}-{w['key']}"
        (folder / "flax").mkdir(parents=True)
        save_variables(folder / "flax" / "variables.msgpack", load_variables(weights))
        (folder / "architecture.json").write_text(json.dumps(
            {"space": arch.space, "key": arch.key, "architecture": arch.to_dict()}, indent=2))
        (folder / "cost.json").write_text(json.dumps(analytic_cost(arch).to_dict(), indent=2))
        model = load(folder)
        test_acc = model.accuracy(data.x_test, data.y_test)
        metrics: dict[str, Any] = {"rank": w["rank"], "score": w["score"], "val_accuracy": w["val_accuracy"],
                                   "test_accuracy": test_acc, "dataset": c.name, "distilled": w["rank"] in distill}
        if w["rank"] in distill:
            metrics["test_accuracy_before_distill"] = distill[w["rank"]]["test_accuracy_before"]
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        printer(f"  exported winner {w['rank']} {arch.key} -> {folder} (test accuracy {test_acc:.4f})", flush=True)
        written.append(folder)
    return written
