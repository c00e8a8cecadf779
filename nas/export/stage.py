"""The export stage: every winner of a run into `OUT/NN-KEY/`, each format written and checked."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from evaluators.cost import analytic_cost
from evaluators.datasets import load as load_data
from evaluators.hardware import PROFILES, analytic_latency, get_profile
from evaluators.latency import latency_breakdown
from evaluators.predict import predict_logits
from evaluators.variables import load_variables
from nas.config import ExportConfig
from nas.export.card import model_card
from nas.export.checks import batch_sizes, check_int8, compare, machine, measure_latencies
from nas.export.formats import write_flax, write_int8, write_onnx, write_stablehlo
from nas.export.loading import FILES, check_tree, load
from nas.messages import first_line
from nas.preflight import preflight
from nas.rundir import DistillRow, Winner, experiment_from_run_dir, export_dir, load_winners, read_distill, winner_weights
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError


_MODEL_DIR = re.compile(r"^\.?\d{2,}-[0-9A-Za-z-]+(\.failed|\.partial)?$")  # NN-KEY[.failed], .NN-KEY.partial


def export_run(run_dir: str | Path, *, out: str | Path | None = None, winner: int | None = None,
               formats: tuple[str, ...] | None = None, force: bool = False, int8: bool | None = None,
               calibration_images: int | None = None, calibration_method: str | None = None,
               int8_float_se: bool | None = None, int8_weight_range: str | None = None,
               tolerance: float | None = None, int8_max_drop: float | None = None,
               latency_budget_s: float | None = None, printer=print) -> list[Path]:
    """Export the winners of `run_dir` (all, or rank `winner`) into `out` (default RUN_DIR/export).

    Args:
      run_dir: a finished search run (config.yaml, winners.json, winners/NN/); distilled weights
        are used where distill.json lists them.
      out: output folder; an existing non-empty one is refused unless `force` (which replaces
        only earlier model folders in it, nothing else).
      winner: export only this rank.
      formats: any of 'flax', 'onnx', 'stablehlo'.
      int8: also write model.int8.onnx (static QDQ, calibrated on `calibration_images` training images
        with `calibration_method`: percentile, minmax or entropy; `int8_float_se`: SE paths left in float;
        `int8_weight_range`: auto, full or reduced, see `ExportConfig`).
      tolerance, int8_max_drop, latency_budget_s: see `ExportConfig`.
      Options left None take their value from the run's `export:` section (config.yaml).

    Returns:
      The folders written (`OUT/NN-KEY`), all of whose checks passed.

    Raises:
      NasError: bad options or run directory, missing checkpoints, existing output (before
        anything is written); or, after every winner was tried, any failed check (the failed
        models are left as `OUT/NN-KEY.failed` without the failing files).

    Example:
      >>> export_run("runs/quickstart", formats=("flax", "onnx", "stablehlo"), int8=True)
    """

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise NasError(f"{run_dir}: no such run directory")
    exp = experiment_from_run_dir(run_dir)
    preflight(exp.cfg, ("export",))
    given = {"formats": formats, "int8": int8, "calibration_images": calibration_images,
             "calibration_method": calibration_method, "int8_float_se": int8_float_se,
             "int8_weight_range": int8_weight_range, "tolerance": tolerance,
             "int8_max_drop": int8_max_drop, "latency_budget_s": latency_budget_s}
    opts = ExportConfig.from_dict({**exp.cfg.export.run_kwargs(), **{k: v for k, v in given.items() if v is not None}},
                                  source="export")
    winners = load_winners(run_dir)
    if winner is not None:
        winners = [w for w in winners if w.rank == winner]
        if not winners:
            raise NasError(f"--winner {winner}: no such winner in {run_dir / 'winners.json'}")
    distill = read_distill(run_dir)
    jobs = [(w, winner_weights(run_dir, w, distill)) for w in winners]  # all checked before writing
    out = Path(out).resolve() if out else export_dir(run_dir)
    targets = [f"{w.rank:02d}-{w.key}" for w in winners]
    _prepare_out(out, force)
    c = exp.cfg.dataset
    data = load_data(c, seed=exp.cfg.seed, resolution=exp.space.resolutions[0], channels=exp.space.in_channels)
    ctx = {"run_dir": run_dir, "run_name": exp.cfg.name, "dataset": data, "seed": exp.cfg.seed,
           "train": exp.train, "teacher": distill.teacher if distill else None,
           "seeds": distill.seeds if distill else None}
    written, failed = [], []
    for (w, weights), name in zip(jobs, targets):
        folder, failures = _export_one(w, weights, distill.row(w.rank) if distill else None, out, name, opts, ctx, printer)
        (failed if failures else written).append((folder, failures))
    if failed:
        what = "; ".join(f"{f.name} ({', '.join(failures)})" for f, failures in failed)
        raise NasError(f"export: {len(failed)} of {len(jobs)} model(s) failed a check: {what}; "
                       f"see metrics.json in each *.failed folder")
    return [f for f, _ in written]


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NasError(f"{out}: output path exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise NasError(f"{out}: output folder exists; pass --force to overwrite it")
        for p in out.iterdir():  # only earlier model folders: never anything else a user put there
            if p.is_dir() and _MODEL_DIR.match(p.name):
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)


def _calibration(data, n: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng([seed, 7]).permutation(len(data.x_train))[:n]
    return np.asarray(data.x_train[np.sort(idx)], np.float32)


def _export_one(w: Winner, weights: Path, drow: DistillRow | None, out: Path, name: str,
                opts: ExportConfig, ctx: Mapping[str, Any], printer) -> tuple[Path, list[str]]:
    """Write and check one model folder; returns (its final path, the failed formats' reasons)."""

    data = ctx["dataset"]
    arch = w.architecture
    variables = load_variables(weights)
    check_tree(arch, variables, weights)
    stage = out / f".{name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    t0 = time.perf_counter()
    x, y = np.asarray(data.x_test, np.float32), np.asarray(data.y_test)
    ref = np.asarray(predict_logits(arch, variables, x))
    ref_acc = float(np.mean(ref.argmax(-1) == y))
    (stage / "architecture.json").write_text(json.dumps({
        "space": arch.space, "key": arch.key, "architecture": arch.to_dict(), "layers": arch.describe(),
        "input": {"shape": [arch.resolution, arch.resolution, arch.in_channels], "layout": "NHWC",
                  "dtype": "float32", "name": "input", "normalization": {
                      "mean": list(data.mean), "std": list(data.std),
                      "formula": "x = (image - mean) / std, per channel, with the training split's statistics"}},
        "output": {"name": "logits", "shape": [arch.num_classes]},
    }, indent=2))
    (stage / "cost.json").write_text(json.dumps(_cost(arch), indent=2))

    fmt: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    def attempt(format: str, write: Callable[[], dict[str, Any]], check: Callable[[], dict[str, Any]]) -> bool:
        info: dict[str, Any] = {"file": FILES[format]}
        try:
            info.update(write())
            info["bytes"] = size_bytes(stage / FILES[format])
            info["check"] = check()
        except Exception as e:  # any exporter or runtime error is this format's failure, not the run's
            info["check"] = {"passed": False, "reason": f"{type(e).__name__}: {first_line(str(e))}"}
        fmt[format] = info
        if not info["check"]["passed"]:
            failures.append(f"{format}: {info['check']['reason']}")
            target = stage / FILES[format]
            if format == "flax":
                shutil.rmtree(stage / "flax", ignore_errors=True)
            elif target.exists():
                target.unlink()
            info["file"] = None
        return info["check"]["passed"]

    def verify(format: str) -> dict[str, Any]:
        model = load(stage, format)
        got = model(x)
        one = model(x[:1])  # a second batch size through the same artifact
        return compare(got, ref, y, opts.tolerance, extra=float(np.abs(one - ref[:1]).max()),
                        batch_sizes=batch_sizes(len(x), format))

    if "flax" in opts.formats:
        attempt("flax", lambda: write_flax(stage, variables), lambda: verify("flax"))
    onnx_ok = "onnx" in opts.formats and attempt("onnx", lambda: write_onnx(stage, arch, variables, data),
                                                 lambda: verify("onnx"))
    if "stablehlo" in opts.formats:
        attempt("stablehlo", lambda: write_stablehlo(stage, arch, variables), lambda: verify("stablehlo"))
    if opts.int8:
        if onnx_ok:
            calib = _calibration(data, opts.calibration_images, ctx["seed"])
            fp32_logits = load(stage, "onnx")(x)
            attempt("int8", lambda: write_int8(stage, calib, opts.calibration_method, opts.int8_float_se,
                                               opts.int8_weight_range),
                    lambda: check_int8(load(stage, "int8"), x, y, fp32_logits, opts.int8_max_drop))
        else:
            fmt["int8"] = {"file": None, "check": {"passed": False, "reason": "skipped: the fp32 ONNX export failed"}}
            failures.append("int8: skipped, the fp32 ONNX export failed")
    if "int8" in fmt and fmt["int8"].get("bytes") and fmt.get("onnx", {}).get("bytes"):
        fmt["int8"]["size_ratio_fp32_over_int8"] = fmt["onnx"]["bytes"] / fmt["int8"]["bytes"]

    latency = measure_latencies(stage, arch, variables, x, fmt, opts.latency_budget_s)
    if "onnx" in latency and "int8" in latency:
        fmt["int8"]["latency_ratio_int8_over_fp32"] = {
            b: latency["int8"][b] / latency["onnx"][b] for b in latency["int8"] if b in latency["onnx"]}
    metrics = _metrics(w, arch, ref_acc, len(y), drow, ctx, fmt, latency, failures, opts)
    metrics["export_s"] = time.perf_counter() - t0
    (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (stage / "README.md").write_text(model_card(arch, metrics, json.loads((stage / "cost.json").read_text()),
                                                 name))
    final = out / (name + (".failed" if failures else ""))
    stage.rename(final)
    _print_summary(printer, w.rank, arch.key, final, metrics)
    return final, failures


def _cost(arch: Architecture) -> dict[str, Any]:
    doc = analytic_cost(arch).to_dict()
    pred: dict[str, Any] = {}
    for name in PROFILES.names():
        prof = get_profile(name)
        row: dict[str, Any] = {}
        try:
            est = latency_breakdown(arch, name)
            row.update({"fp32_ms": est.total_ms, "method": est.method})
            if est.note:
                row["note"] = est.note
        except NasError as e:
            est = analytic_latency(arch, prof, "fp32" if "fp32" in prof.precisions else None)
            row.update({"fp32_ms": est.total_ms, "method": "analytic", "note": str(e)})
        if "int8" in prof.precisions:
            row["int8_ms"] = analytic_latency(arch, prof, "int8").total_ms
        pred[name] = row
    doc["predicted_latency_ms"] = pred
    return doc


def _metrics(w: Winner, arch, ref_acc, n_test, drow: DistillRow | None, ctx, fmt, latency, failures,
             opts) -> dict[str, Any]:
    m: dict[str, Any] = {
        "status": "failed" if failures else "ok", "failures": failures,
        "rank": w.rank, "key": arch.key, "space": arch.space, "run": ctx["run_name"],
        "score": w.score, "val_accuracy": w.val_accuracy,
        "dataset": ctx["dataset"].name, "test_images": n_test,
        "test_accuracy": ref_acc, "distilled": drow is not None and bool(drow.distilled),
    }
    if drow is not None:
        m["test_accuracy_before_distill"] = drow.fields.get("test_accuracy_before")
        m["test_accuracy_after_distill"] = drow.fields.get("kd_acc", drow.fields.get("test_accuracy_after"))
        m["distillation"] = {"teacher": ctx.get("teacher"), "seeds": ctx.get("seeds"),
                             **{k: v for k, v in drow.fields.items() if k not in ("rank", "key")}}
    m["formats"] = fmt
    m["latency_ms"] = latency
    if latency:
        m["machine"] = machine()
    m["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.run_kwargs().items()}
    return m


def size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _print_summary(printer, rank: int, key: str, folder: Path, m: Mapping[str, Any]) -> None:
    head = "FAILED" if m["failures"] else "exported"
    printer(f"  {head} winner {rank} {key} -> {folder} (test accuracy {m['test_accuracy']:.4f})", flush=True)
    lat = m.get("latency_ms", {})
    for format, info in m["formats"].items():
        c = info["check"]
        if not c["passed"]:
            printer(f"    {format:<9} FAILED: {c['reason']}", flush=True)
            continue
        parts = [f"{info.get('bytes', 0) / 1024:.1f} KiB"]
        if "max_abs_diff" in c:
            parts.append(f"max |diff| vs JAX {c['max_abs_diff']:.2g} <= {c['tolerance']:g}, "
                         f"accuracy {c['accuracy']:.4f}")
        if "accuracy_drop" in c:
            parts.append(f"accuracy {c['accuracy']:.4f} (fp32 {c['fp32_accuracy']:.4f}), "
                         f"{info.get('size_ratio_fp32_over_int8', float('nan')):.2f}x smaller")
        if format in lat:
            parts.append(f"{lat[format]['batch1']:.3f} ms @1, {lat[format]['batch32']:.3f} ms @32")
        printer(f"    {format:<9} ok: " + "; ".join(parts), flush=True)
    if "jax" in lat:
        printer(f"    jax jit   {lat['jax']['batch1']:.3f} ms @1, {lat['jax']['batch32']:.3f} ms @32", flush=True)
