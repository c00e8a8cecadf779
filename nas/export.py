"""Export winners as self-contained, verified deployment folders, and load them back (`nas.load`).

One folder per exported model (`OUT/NN-KEY/`):

| file | what |
|---|---|
| architecture.json | space, key, the resolved network, input shape/layout and normalisation |
| cost.json | analytic params, MACs, weight bytes, per layer; predicted latency per hardware profile |
| metrics.json | accuracies (before/after distillation, per format), every check's result, sizes, latencies |
| flax/variables.msgpack (+ manifest.json) | trained params and BatchNorm statistics (Flax msgpack) |
| model.onnx | jax2onnx export of the reference implementation, dynamic batch dimension 'B' |
| model.stablehlo | `jax.export` serialization, symbolic batch, lowered for cpu, cuda and tpu |
| model.int8.onnx | ONNX Runtime static quantization (QDQ, per-channel int8 weights), with --int8 |
| README.md | the model card |

Every format is checked as it is written, through the very loader that `load(folder, format)`
uses: its logits on the whole test split must match JAX's within `tolerance` (max abs) with the
same test accuracy; the int8 model must lose at most `int8_max_drop` test accuracy against fp32.
A format that fails is not left in the folder, the folder is renamed `NN-KEY.failed`, the
failure is recorded in metrics.json and README.md, and `export_run` raises once all are done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import re

import numpy as np

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

FORMATS = ("flax", "onnx", "stablehlo")  # what `--format` accepts
LOAD_FORMATS = ("flax", "onnx", "int8", "stablehlo")  # what `load(folder, format=...)` accepts
DEFAULT_FORMATS = ("flax",)
FILES = {"flax": "flax/variables.msgpack", "onnx": "model.onnx", "int8": "model.int8.onnx",
         "stablehlo": "model.stablehlo"}
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
CHECK_BATCH = 256  # rows per runtime call in the checks (the last call is smaller: two batch sizes)
RUN_BATCH = 256  # rows per call in LoadedModel for ONNX / StableHLO

_MODEL_DIR = re.compile(r"^\.?\d{2,}-[0-9A-Za-z-]+(\.failed|\.partial)?$")  # NN-KEY[.failed], .NN-KEY.partial
_OPTIONS = ("enabled", "formats", "int8", "calibration_images", "calibration_method", "tolerance", "int8_max_drop",
            "latency_budget_s")


# ============================================================ config
@dataclass(frozen=True)
class ExportConfig:
    """The `export:` section of an experiment config (and the options of `nas export`).

    formats: any of flax, onnx, stablehlo. int8: also write model.int8.onnx (needs onnx).
    calibration_images: training images that calibrate the int8 activation ranges.
    calibration_method: how ranges are set from them: percentile (default), minmax, entropy.
    tolerance: max abs logit difference allowed between a runtime and JAX.
    int8_max_drop: largest test-accuracy loss (fraction, 0.01 = 1 point) int8 may have vs fp32.
    latency_budget_s: time spent per latency measurement (0: do not measure).
    """

    enabled: bool = True
    formats: tuple[str, ...] = DEFAULT_FORMATS
    int8: bool = False
    calibration_images: int = 256
    calibration_method: str = "percentile"
    tolerance: float = 1e-4
    int8_max_drop: float = 0.01
    latency_budget_s: float = 0.3

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "export") -> "ExportConfig":
        d = dict(d or {})
        for k in d:
            if k not in _OPTIONS:
                raise NasError(f"{source}.{k}: unknown key; allowed: {', '.join(_OPTIONS)}")
        formats = d.get("formats", cls.formats)
        formats = tuple(f.strip() for f in formats.split(",")) if isinstance(formats, str) else tuple(formats)
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise NasError(f"{source}.formats: unknown format '{bad[0]}'; allowed: {', '.join(FORMATS)}")
        if not formats:
            raise NasError(f"{source}.formats: empty; allowed: {', '.join(FORMATS)}")
        formats = tuple(dict.fromkeys(formats))
        for k in ("enabled", "int8"):
            if not isinstance(d.get(k, False), bool):
                raise NasError(f"{source}.{k}: expected true or false, got {d[k]!r}")
        int8 = d.get("int8", cls.int8)
        if int8 and "onnx" not in formats:
            raise NasError(f"{source}.int8: needs 'onnx' in {source}.formats (int8 is quantized from model.onnx)")
        n = d.get("calibration_images", cls.calibration_images)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise NasError(f"{source}.calibration_images: must be an integer >= 1, got {n!r}")
        method = d.get("calibration_method", cls.calibration_method)
        from evaluators.quantize import CALIBRATION_METHODS

        if method not in CALIBRATION_METHODS:
            raise NasError(f"{source}.calibration_method: unknown method {method!r}; "
                           f"allowed: {', '.join(CALIBRATION_METHODS)}")
        nums = {}
        for k, lo in (("tolerance", 0.0), ("int8_max_drop", 0.0), ("latency_budget_s", 0.0)):
            v = d.get(k, getattr(cls, k))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise NasError(f"{source}.{k}: must be a number >= {lo:g}, got {v!r}")
            nums[k] = float(v)
        return cls(d.get("enabled", True), formats, int8, n, method, **nums)

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `export_run` this section stands for."""
        return {"formats": self.formats, "int8": self.int8, "calibration_images": self.calibration_images,
                "calibration_method": self.calibration_method, "tolerance": self.tolerance,
                "int8_max_drop": self.int8_max_drop,
                "latency_budget_s": self.latency_budget_s}


# ============================================================ loading
@dataclass(frozen=True)
class LoadedModel:
    """A trained network: `model(x)` -> logits (numpy) for NHWC float32 inputs, batched internally.

    `format` says which artifact runs it: 'flax' (jitted JAX on `variables`), 'onnx' / 'int8'
    (an ONNX Runtime session) or 'stablehlo' (the deserialized `jax.export` module).
    `variables` is None for the non-Flax formats.
    """

    arch: Architecture
    variables: Any
    folder: Path
    format: str = "flax"
    runner: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from evaluators.predict import predict_logits

        x = np.asarray(x, np.float32)
        if self.runner is None:
            return np.asarray(predict_logits(self.arch, self.variables, x))
        expected = (self.arch.resolution, self.arch.resolution, self.arch.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise NasError(f"predict: inputs of shape {x.shape}; architecture '{self.arch.key}' expects "
                           f"(N, {', '.join(map(str, expected))})")
        if len(x) == 0:
            return np.zeros((0, self.arch.num_classes), np.float32)
        return self.runner(x)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self(x).argmax(-1) == np.asarray(y)))


def load(folder: str | Path, format: str | None = None, *, threads: int = 1) -> LoadedModel:
    """Load an exported model folder (or a winners/NN checkpoint folder) as a callable model.

    Args:
      folder: an export folder (`OUT/NN-KEY`) or a search checkpoint folder.
      format: 'flax', 'onnx', 'int8' or 'stablehlo'; default the first of flax, onnx,
        stablehlo, int8 that the folder holds.
      threads: ONNX Runtime intra-op threads (onnx, int8).

    Returns:
      A `LoadedModel`: `model(x)` gives logits for normalised NHWC float32 images.

    Raises:
      NasError: not a model folder, unknown format, missing or corrupt file (one line).

    Example:
      >>> model = load("runs/quickstart/export/01-KEY", format="onnx")
      >>> model(x).argmax(-1)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NasError(f"{folder}: not a folder")
    if format is None:
        format = next((f for f in ("flax", "onnx", "stablehlo", "int8")
                       if (folder / FILES[f]).exists() or (f == "flax" and (folder / "variables.msgpack").exists())),
                      "flax")
    if format not in LOAD_FORMATS:
        raise NasError(f"format: unknown format '{format}'; allowed: {', '.join(LOAD_FORMATS)}")
    if format == "flax":
        from nas.teacher import load_checkpoint_folder

        _verify_manifest(folder)
        arch, variables = load_checkpoint_folder(folder)
        _check_tree(arch, variables, folder)
        return LoadedModel(arch, variables, folder, "flax")
    arch = _read_arch(folder)
    path = folder / FILES[format]
    if not path.exists():
        raise NasError(f"{path}: not found{_why_missing(folder, format)}")
    if format in ("onnx", "int8"):
        return LoadedModel(arch, None, folder, format, _ort_runner(path, threads))
    return LoadedModel(arch, None, folder, format, _stablehlo_runner(path))


def _read_arch(folder: Path) -> Architecture:
    f = folder / "architecture.json"
    if not f.exists():
        raise NasError(f"{folder}: not an exported model (no architecture.json)")
    try:
        doc = json.loads(f.read_text())
        return Architecture.from_dict(doc.get("architecture", doc))
    except (ValueError, KeyError, TypeError) as e:
        raise NasError(f"{f}: not a valid architecture file ({type(e).__name__}: {e})".splitlines()[0]) from None


def _why_missing(folder: Path, format: str) -> str:
    try:
        check = json.loads((folder / "metrics.json").read_text())["formats"][format]["check"]
    except (OSError, ValueError, KeyError, TypeError):
        flag = "--int8" if format == "int8" else f"--format {format}"
        return f" (export with {flag})"
    return f" (its export failed its check: {check.get('reason', '?')}; see metrics.json)"


def _ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from evaluators.onnx_export import ort_session, run

    try:
        sess = ort_session(str(path), threads=threads)
    except Exception as e:  # ORT raises its own exception types
        raise NasError(f"{path}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0][:200]}") from None

    def runner(x: np.ndarray) -> np.ndarray:
        return np.concatenate([run(sess, x[i:i + RUN_BATCH]) for i in range(0, len(x), RUN_BATCH)])

    return runner


def _stablehlo_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import jax
    from jax import export

    from evaluators.datasets import pad_batches

    try:
        exported = export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # flatbuffer / version errors
        raise NasError(f"{path}: not a jax.export serialization ({type(e).__name__})") from None
    fn = jax.jit(exported.call)

    def runner(x: np.ndarray) -> np.ndarray:
        b = RUN_BATCH if len(x) >= RUN_BATCH else 1 << (len(x) - 1).bit_length()  # few shapes compile
        xp, n = pad_batches(x, b)
        return np.concatenate([np.asarray(fn(xp[i:i + b])) for i in range(0, len(xp), b)])[:n]

    return runner


def _leaves(tree: Any) -> dict[str, tuple[int, ...]]:
    import jax

    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_leaves(arch: Architecture) -> dict[str, tuple[int, ...]]:
    from evaluators.variables import variable_shapes

    return _leaves(variable_shapes(arch))


def _check_tree(arch: Architecture, variables: Any, where: Path) -> None:
    """The variables hold exactly the params/batch_stats arrays the architecture needs."""
    got = {k: v for k, v in _leaves(variables).items() if k.startswith(("['params']", "['batch_stats']"))}
    want = _expected_leaves(arch)
    for k in sorted(set(want) | set(got)):
        if got.get(k) != want.get(k):
            what = ("missing" if k not in got else "unexpected" if k not in want
                    else f"shape {got[k]}, expected {want[k]}")
            raise NasError(f"{where}: variables do not fit architecture '{arch.key}': {k} {what}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify_manifest(folder: Path) -> None:
    m = folder / "flax" / "manifest.json"
    if not m.exists():
        return
    try:
        doc = json.loads(m.read_text())
        f, digest = folder / "flax" / doc["file"], doc["sha256"]
    except (ValueError, KeyError, TypeError):
        raise NasError(f"{m}: malformed manifest (expected JSON with 'file' and 'sha256')") from None
    if f.exists() and _sha256(f) != digest:
        raise NasError(f"{f}: checksum differs from flax/manifest.json (file corrupt or replaced)")


# ============================================================ export
def export_run(run_dir: str | Path, *, out: str | Path | None = None, winner: int | None = None,
               formats: tuple[str, ...] = DEFAULT_FORMATS, force: bool = False, int8: bool = False,
               calibration_images: int = ExportConfig.calibration_images,
               calibration_method: str = ExportConfig.calibration_method, tolerance: float = ExportConfig.tolerance,
               int8_max_drop: float = ExportConfig.int8_max_drop,
               latency_budget_s: float = ExportConfig.latency_budget_s, printer=print) -> list[Path]:
    """Export the winners of `run_dir` (all, or rank `winner`) into `out` (default RUN_DIR/export).

    Args:
      run_dir: a finished search run (config.yaml, winners.json, winners/NN/); distilled weights
        are used where distill.json lists them.
      out: output folder; an existing non-empty one is refused unless `force` (which replaces
        only earlier model folders in it, nothing else).
      winner: export only this rank.
      formats: any of 'flax', 'onnx', 'stablehlo'.
      int8: also write model.int8.onnx (static QDQ, calibrated on `calibration_images` training images
        with `calibration_method`: percentile, minmax or entropy).
      tolerance, int8_max_drop, latency_budget_s: see `ExportConfig`.

    Returns:
      The folders written (`OUT/NN-KEY`), all of whose checks passed.

    Raises:
      NasError: bad options or run directory, missing checkpoints, existing output (before
        anything is written); or, after every winner was tried, any failed check (the failed
        models are left as `OUT/NN-KEY.failed` without the failing files).

    Example:
      >>> export_run("runs/quickstart", formats=("flax", "onnx", "stablehlo"), int8=True)
    """
    from evaluators.datasets import load_dataset
    from nas.search import experiment_from_run_dir, load_winners

    opts = ExportConfig.from_dict({"formats": tuple(formats), "int8": int8, "calibration_images": calibration_images,
                                   "calibration_method": calibration_method, "tolerance": tolerance,
                                   "int8_max_drop": int8_max_drop,
                                   "latency_budget_s": latency_budget_s}, source="export")
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise NasError(f"{run_dir}: no such run directory")
    exp = experiment_from_run_dir(run_dir)
    winners = load_winners(run_dir)
    if winner is not None:
        winners = [w for w in winners if w["rank"] == winner]
        if not winners:
            raise NasError(f"--winner {winner}: no such winner in {run_dir / 'winners.json'}")
    distill = _read_distill(run_dir)
    jobs = [(w, _weights_file(run_dir, w, distill)) for w in winners]  # all checked before writing
    out = Path(out).resolve() if out else run_dir / "export"
    targets = [f"{w['rank']:02d}-{w['key']}" for w in winners]
    _prepare_out(out, force)
    c = exp.cfg.dataset
    data = load_dataset(c.name, seed=exp.cfg.seed, path=c.path, val_fraction=c.val_fraction,
                        test_fraction=c.test_fraction)
    ctx = {"run_dir": run_dir, "run_name": exp.cfg.name, "dataset": data, "seed": exp.cfg.seed,
           "train": exp.train, "teacher": distill.get("teacher"), "seeds": distill.get("seeds")}
    written, failed = [], []
    for (w, weights), name in zip(jobs, targets):
        folder, failures = _export_one(w, weights, distill["rows"].get(w["rank"]), out, name, opts, ctx, printer)
        (failed if failures else written).append((folder, failures))
    if failed:
        what = "; ".join(f"{f.name} ({', '.join(failures)})" for f, failures in failed)
        raise NasError(f"export: {len(failed)} of {len(jobs)} model(s) failed a check: {what}; "
                       f"see metrics.json in each *.failed folder")
    return [f for f, _ in written]


def _read_distill(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "distill.json"
    if not path.exists():
        return {"rows": {}}
    try:
        doc = json.loads(path.read_text())
        rows = {int(r["rank"]): r for r in doc["winners"]}
    except (ValueError, KeyError, TypeError) as e:
        raise NasError(f"{path}: malformed distillation report ({type(e).__name__}: {e})".splitlines()[0]) from None
    return {"rows": rows, "teacher": doc.get("teacher"), "seeds": doc.get("seeds")}


def _weights_file(run_dir: Path, w: Mapping[str, Any], distill: Mapping[str, Any]) -> Path:
    row = distill["rows"].get(w["rank"])
    name = (row or {}).get("distilled") or "variables.msgpack"
    path = run_dir / w["checkpoint"] / name
    if not path.is_file():
        raise NasError(f"{path}: checkpoint missing; re-run the search (or distillation)")
    return path


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


def _export_one(w: Mapping[str, Any], weights: Path, drow: Mapping[str, Any] | None, out: Path, name: str,
                opts: ExportConfig, ctx: Mapping[str, Any], printer) -> tuple[Path, list[str]]:
    """Write and check one model folder; returns (its final path, the failed formats' reasons)."""
    from evaluators.predict import predict_logits
    from evaluators.variables import load_variables

    data = ctx["dataset"]
    arch = Architecture.from_dict(w["architecture"])
    variables = load_variables(weights)
    _check_tree(arch, variables, weights)
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
            info["bytes"] = _size(stage / FILES[format])
            info["check"] = check()
        except Exception as e:  # any exporter or runtime error is this format's failure, not the run's
            info["check"] = {"passed": False, "reason": f"{type(e).__name__}: {_one_line(str(e))}"}
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
        return _compare(got, ref, y, opts.tolerance, extra=float(np.abs(one - ref[:1]).max()),
                        batch_sizes=_batch_sizes(len(x), format))

    if "flax" in opts.formats:
        attempt("flax", lambda: _write_flax(stage, variables), lambda: verify("flax"))
    onnx_ok = "onnx" in opts.formats and attempt("onnx", lambda: _write_onnx(stage, arch, variables, data),
                                                 lambda: verify("onnx"))
    if "stablehlo" in opts.formats:
        attempt("stablehlo", lambda: _write_stablehlo(stage, arch, variables), lambda: verify("stablehlo"))
    if opts.int8:
        if onnx_ok:
            calib = _calibration(data, opts.calibration_images, ctx["seed"])
            fp32_logits = load(stage, "onnx")(x)
            attempt("int8", lambda: _write_int8(stage, calib, opts.calibration_method),
                    lambda: _check_int8(load(stage, "int8"), x, y, fp32_logits, opts.int8_max_drop))
        else:
            fmt["int8"] = {"file": None, "check": {"passed": False, "reason": "skipped: the fp32 ONNX export failed"}}
            failures.append("int8: skipped, the fp32 ONNX export failed")
    if "int8" in fmt and fmt["int8"].get("bytes") and fmt.get("onnx", {}).get("bytes"):
        fmt["int8"]["size_ratio_fp32_over_int8"] = fmt["onnx"]["bytes"] / fmt["int8"]["bytes"]

    latency = _measure_latencies(stage, arch, variables, x, fmt, opts.latency_budget_s)
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
    _print_summary(printer, w["rank"], arch.key, final, metrics)
    return final, failures


def _batch_sizes(n: int, format: str) -> list[int]:
    if format == "flax":
        return []  # predict_logits pads to its own fixed batches
    rows = [min(RUN_BATCH, n - i) for i in range(0, n, RUN_BATCH)]
    if format == "stablehlo":  # padded to RUN_BATCH or the next power of two
        rows = [RUN_BATCH if n >= RUN_BATCH else 1 << (n - 1).bit_length()]
    return sorted(set(rows) | {1})


def _compare(got: np.ndarray, ref: np.ndarray, y: np.ndarray, tol: float, *, extra: float = 0.0,
             batch_sizes: list[int] | None = None) -> dict[str, Any]:
    """A runtime's logits vs JAX's: max abs difference and the same test accuracy (up to exact ties)."""
    if got.shape != ref.shape:
        return {"passed": False, "reason": f"output shape {got.shape}, expected {ref.shape}"}
    diff = float(max(np.abs(got - ref).max(initial=0.0), extra))
    acc, ref_acc = float(np.mean(got.argmax(-1) == y)), float(np.mean(ref.argmax(-1) == y))
    differ = np.flatnonzero(got.argmax(-1) != ref.argmax(-1))
    top2 = np.sort(ref[differ], axis=-1)[:, -2:] if len(differ) else np.zeros((0, 2))
    ties = bool(np.all(top2[:, 1] - top2[:, 0] <= 2 * tol))  # within tolerance an argmax can only flip on a tie
    finite = bool(np.all(np.isfinite(got)))
    passed = finite and diff <= tol and (acc == ref_acc or ties)
    reason = ""
    if not finite:
        reason = "non-finite logits"
    elif diff > tol:
        reason = f"max |logit difference| {diff:.3g} > tolerance {tol:g}"
    elif not passed:
        reason = f"test accuracy {acc:.4f} != JAX's {ref_acc:.4f}"
    out = {"passed": passed, "max_abs_diff": diff, "tolerance": tol, "images": int(len(y)), "accuracy": acc,
           "jax_accuracy": ref_acc, "predictions_differing": int(len(differ))}
    if batch_sizes:
        out["batch_sizes"] = batch_sizes
    if reason:
        out["reason"] = reason
    return out


def _check_int8(model: LoadedModel, x: np.ndarray, y: np.ndarray, fp32_logits: np.ndarray,
                max_drop: float) -> dict[str, Any]:
    got = model(x)
    one = model(x[:1])
    acc, fp32_acc = float(np.mean(got.argmax(-1) == y)), float(np.mean(fp32_logits.argmax(-1) == y))
    drop = fp32_acc - acc
    finite = bool(np.all(np.isfinite(got))) and bool(np.all(np.isfinite(one)))
    passed = finite and got.shape == fp32_logits.shape and drop <= max_drop + 1e-12
    out = {"passed": passed, "images": int(len(y)), "accuracy": acc, "fp32_accuracy": fp32_acc,
           "accuracy_drop": drop, "max_drop": max_drop,
           "agreement_with_fp32": float(np.mean(got.argmax(-1) == fp32_logits.argmax(-1))),
           "max_abs_diff_vs_fp32": float(np.abs(got - fp32_logits).max()) if got.shape == fp32_logits.shape else None,
           "batch_sizes": _batch_sizes(len(x), "int8")}
    if not passed:
        out["reason"] = ("non-finite logits" if not finite else
                         f"int8 test accuracy {acc:.4f} is {100 * drop:.2f} points below fp32's {fp32_acc:.4f} "
                         f"(allowed {100 * max_drop:.2f})")
    return out


# ------------------------------------------------------------ writers (module level: tests patch them)
def _write_flax(stage: Path, variables: Any) -> dict[str, Any]:
    from evaluators.variables import load_variables, save_variables

    path = stage / FILES["flax"]
    save_variables(path, variables)
    back = load_variables(path)  # bit-exact round trip, leaf by leaf
    import jax

    a, b = jax.tree_util.tree_flatten_with_path(variables)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    if [p for p, _ in a] != [p for p, _ in b] or not all(np.array_equal(np.asarray(u), np.asarray(v))
                                                         for (_, u), (_, v) in zip(a, b)):
        raise NasError(f"{path}: read back differs from what was written")
    manifest = {"file": path.name, "serialization": "flax.serialization.msgpack_serialize (nested dict of arrays)",
                "collections": sorted(back), "sha256": _sha256(path), "bytes": path.stat().st_size,
                "shapes": {k: list(v) for k, v in _leaves(back).items()}}
    (path.parent / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"serialization": "flax msgpack", "sha256": manifest["sha256"]}


_SKIPPED_PLUGIN_TREES = ("examples", "equinox", "dm_pix")


def _lean_jax2onnx_plugins() -> None:
    """Make jax2onnx's one-time plugin discovery skip its example models and the Equinox/dm-pix
    plugins: importing them builds and jit-compiles ~75 example networks (28 s of a 30 s first
    export on this machine, 3.5 s without). Flax, JAX and lax plugins load as before. No-op if
    the plugins were already imported or jax2onnx's internals differ from 0.17's."""
    try:
        from jax2onnx.plugins import plugin_system as ps
    except ImportError:
        return
    if getattr(ps, "_already_imported_plugins", True) or not callable(getattr(ps, "_import_tree", None)):
        return
    import importlib
    import logging

    def import_tree(root_dir: Path, pkg_prefix: str) -> None:
        for py in sorted(Path(root_dir).rglob("*.py")):
            rel = py.relative_to(root_dir)
            if py.name in ("plugin_system.py", "__init__.py") or rel.parts[0] in _SKIPPED_PLUGIN_TREES:
                continue
            try:
                importlib.import_module(".".join([pkg_prefix, *rel.with_suffix("").parts]))
            except Exception as e:  # as jax2onnx does: a broken plugin is skipped with a warning
                logging.getLogger("jax2onnx").warning("Skipping import of %s: %s", rel, e)

    ps._import_tree = import_tree


def _onnx_model(arch: Architecture, variables: Any):
    from evaluators.onnx_export import to_onnx

    _lean_jax2onnx_plugins()
    return to_onnx(arch, variables)


def _write_onnx(stage: Path, arch: Architecture, variables: Any, data) -> dict[str, Any]:
    import onnx

    model = _onnx_model(arch, variables)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dynamic = bool(dims) and dims[0].HasField("dim_param")
    if not dynamic:
        raise NasError("model.onnx: the batch dimension is not dynamic")
    for k, v in {"space": arch.space, "key": arch.key, "layout": "NHWC",
                 "normalization_mean": json.dumps(list(data.mean)),
                 "normalization_std": json.dumps(list(data.std))}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(stage / FILES["onnx"]))
    import onnxruntime

    return {"opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "exporter": "jax2onnx (reference lax.conv implementation)", "batch_dim": dims[0].dim_param,
            "onnxruntime": onnxruntime.__version__}


def _write_stablehlo(stage: Path, arch: Architecture, variables: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax import export

    from search_spaces.model import build_model

    net = build_model(arch, "fast")
    v = jax.tree.map(jnp.asarray, {k: variables[k] for k in ("params", "batch_stats") if k in variables})
    fn = jax.jit(lambda x: net.apply(v, x, train=False))
    b, = export.symbolic_shape("B")
    exported = export.export(fn, platforms=STABLEHLO_PLATFORMS)(
        jax.ShapeDtypeStruct((b, arch.resolution, arch.resolution, arch.in_channels), jnp.float32))
    (stage / FILES["stablehlo"]).write_bytes(exported.serialize())
    return {"platforms": list(exported.platforms), "conv_impl": "fast", "batch_dim": "B",
            "calling_convention_version": exported.calling_convention_version, "jax": jax.__version__}


def _write_int8(stage: Path, calibration: np.ndarray, method: str) -> dict[str, Any]:
    from evaluators.quantize import quantize_static_int8

    info = quantize_static_int8(stage / FILES["onnx"], stage / FILES["int8"], calibration, method=method)
    info.pop("bytes", None)
    return info


# ------------------------------------------------------------ costs, latency, metrics
def _cost(arch: Architecture) -> dict[str, Any]:
    from evaluators.cost import analytic_cost
    from evaluators.hardware import PROFILES, analytic_latency, get_profile
    from evaluators.latency import latency_breakdown

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


def _measure_latencies(stage: Path, arch: Architecture, variables: Any, x: np.ndarray,
                       fmt: Mapping[str, Any], budget: float) -> dict[str, dict[str, float]]:
    """Ms at batch 1 and 32: jitted JAX (fast implementation) and ONNX Runtime (one thread).

    Each figure is the minimum of ten short medians, the windows of all figures interleaved over
    the whole measurement (`evaluators.latency.measure_passes`): bursts of host load then slow
    no figure, and the ratios between formats compare like with like.
    """
    if budget <= 0:
        return {}
    import jax
    import jax.numpy as jnp

    from evaluators.timing import measure_passes
    from evaluators.onnx_export import ort_session
    from search_spaces.model import build_model

    batches = {"batch1": x[:1], "batch32": np.resize(x, (32, *x.shape[1:])).astype(np.float32)}
    net = build_model(arch, "fast")
    v = jax.tree.map(jnp.asarray, {k: variables[k] for k in ("params", "batch_stats") if k in variables})
    f = jax.jit(lambda a: net.apply(v, a, train=False))
    which, makers = [], []
    for b, xb in batches.items():
        xd = jax.device_put(xb)
        which.append(("jax", b))
        makers.append(lambda xd=xd: lambda: f(xd).block_until_ready())
    for format in ("onnx", "int8"):
        if fmt.get(format, {}).get("file"):
            sess = ort_session(str(stage / FILES[format]), threads=1)
            name = sess.get_inputs()[0].name
            for b, xb in batches.items():
                feed = {name: np.ascontiguousarray(xb)}
                which.append((format, b))
                makers.append(lambda sess=sess, feed=feed: lambda: sess.run(None, feed))
    out: dict[str, dict[str, float]] = {}
    for (format, b), ms in zip(which, measure_passes(makers, 1, budget)):
        out.setdefault(format, {})[b] = ms
    return out


def machine() -> dict[str, Any]:
    """What a latency figure depends on: CPU, cores, load, library versions."""
    import jax
    import onnxruntime

    from evaluators.lut import cpu_model

    cpu = cpu_model()
    try:
        load_avg = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_avg = None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load_avg, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_threads": 1, "jax": jax.__version__, "python": platform.python_version()}


def _metrics(w, arch, ref_acc, n_test, drow, ctx, fmt, latency, failures, opts) -> dict[str, Any]:
    m: dict[str, Any] = {
        "status": "failed" if failures else "ok", "failures": failures,
        "rank": w["rank"], "key": arch.key, "space": arch.space, "run": ctx["run_name"],
        "score": w.get("score"), "val_accuracy": w.get("val_accuracy"),
        "dataset": ctx["dataset"].name, "test_images": n_test,
        "test_accuracy": ref_acc, "distilled": drow is not None and bool(drow.get("distilled")),
    }
    if drow is not None:
        after = drow.get("kd_acc", drow.get("test_accuracy_after"))
        m["test_accuracy_before_distill"] = drow.get("test_accuracy_before")
        m["test_accuracy_after_distill"] = after
        m["distillation"] = {"teacher": ctx.get("teacher"), "seeds": ctx.get("seeds"),
                             **{k: v for k, v in drow.items() if k not in ("rank", "key")}}
    m["formats"] = fmt
    m["latency_ms"] = latency
    if latency:
        m["machine"] = machine()
    m["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.run_kwargs().items()}
    return m


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _one_line(text: str) -> str:
    lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
    return lines[0][:300] if lines else ""


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


# ============================================================ model card
def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"


def _ms(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f} ms"


def model_card(arch: Architecture, m: Mapping[str, Any], cost: Mapping[str, Any], name: str) -> str:
    """README.md of an export folder: what the model is, accuracy, size, latency, checks, how to run it."""
    fmt, lat = m["formats"], m.get("latency_ms", {})
    arch_doc_shape = f"{arch.resolution}x{arch.resolution}x{arch.in_channels}"
    L: list[str] = [f"# {arch.space} `{arch.key}`", ""]
    if m["failures"]:
        L += ["**EXPORT FAILED ITS CHECKS** — do not deploy the failed formats (their files were not kept):", ""]
        L += [f"- {f}" for f in m["failures"]] + [""]
    L += ["## What it is", "",
          f"An image classifier found by neural architecture search in the `{arch.space}` space "
          f"(winner {m['rank']} of run `{m['run']}`, search score {_fmt(m.get('score'))}, "
          f"validation accuracy {_pct(m.get('val_accuracy'))}), trained on `{m['dataset']}`"
          + (", then knowledge-distilled" + _teacher(m) if m.get("distilled") else "") + ".", "",
          f"- input: `input`, float32 NHWC `(N, {arch.resolution}, {arch.resolution}, {arch.in_channels})`, "
          "any batch size N, normalised per channel: `x = (image - mean) / std` with the training split's "
          "statistics (in architecture.json, `input.normalization`)",
          f"- output: `logits`, float32 `(N, {arch.num_classes})`; the class is `argmax`",
          "- layers: " + ", ".join(f"`{t}`" for t in arch.describe()), ""]
    L += ["## Accuracy", "", f"Test split of `{m['dataset']}`, {m['test_images']} images.", "",
          "| what | test accuracy |", "|---|---|"]
    if "test_accuracy_before_distill" in m:
        L.append(f"| before distillation | {_pct(m.get('test_accuracy_before_distill'))} |")
        d = m.get("distillation", {})
        after = _pct(m.get("test_accuracy_after_distill"))
        if d.get("kd_std") is not None:
            after += f" ± {100 * d['kd_std']:.2f} (mean ± std over {m['distillation'].get('seeds') or '?'} seeds)"
        L.append(f"| after distillation (distillation report) | {after} |")
        if d.get("baseline_acc") is not None:
            L.append(f"| fine-tuned without a teacher (baseline) | {_pct(d['baseline_acc'])}"
                     + (f" ± {100 * d['baseline_std']:.2f}" if d.get("baseline_std") is not None else "") + " |")
    L.append(f"| this model, JAX (flax weights) | {_pct(m['test_accuracy'])} |")
    for f, label in (("onnx", "ONNX Runtime fp32"), ("stablehlo", "StableHLO (jax.export)"),
                     ("int8", "ONNX Runtime int8")):
        c = fmt.get(f, {}).get("check", {})
        if c.get("passed"):
            L.append(f"| this model, {label} | {_pct(c.get('accuracy'))} |")
    L += ["", "## Size", "", "| what | value |", "|---|---|",
          f"| parameters | {cost['params']:,} |", f"| multiply-accumulates per image | {cost['macs']:,} |",
          f"| weight bytes, fp32 (analytic) | {cost['weight_bytes'].get('fp32', 0):,} |",
          f"| weight bytes, int8 (analytic) | {cost['weight_bytes'].get('int8', 0):,} |"]
    for f in ("flax", "onnx", "stablehlo", "int8"):
        if fmt.get(f, {}).get("file"):
            L.append(f"| file `{fmt[f]['file']}` | {fmt[f]['bytes']:,} bytes |")
    if fmt.get("int8", {}).get("size_ratio_fp32_over_int8"):
        L.append(f"| model.onnx / model.int8.onnx | {fmt['int8']['size_ratio_fp32_over_int8']:.2f}x |")
    L += ["", "## Latency", "", "Predicted (cost model, batch 1):", "",
          "| profile | fp32 | int8 | method |", "|---|---|---|---|"]
    for p, row in cost.get("predicted_latency_ms", {}).items():
        L.append(f"| {p} | {_ms(row.get('fp32_ms'))} | {_ms(row.get('int8_ms'))} | {row.get('method', '')} |")
    if lat:
        mach = m.get("machine", {})
        L += ["", f"Measured on the export machine ({mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
              f"load average {mach.get('load_average')} at export; ONNX Runtime {mach.get('onnxruntime')} with one "
              f"thread, JAX {mach.get('jax')} jitted), minimum of ten short medians spread over the measurement:", "",
              "| runtime | batch 1 | batch 32 |", "|---|---|---|"]
        for k, label in (("jax", "JAX jit (flax weights)"), ("onnx", "ONNX Runtime fp32"),
                         ("int8", "ONNX Runtime int8")):
            if k in lat:
                L.append(f"| {label} | {_ms(lat[k].get('batch1'))} | {_ms(lat[k].get('batch32'))} |")
    L += ["", "## Numerical checks (at export)", "",
          "Every format was reloaded through `nas.load(folder, format=...)` and run on the whole test split.", "",
          "| format | result | max abs logit diff vs JAX | accuracy | detail |", "|---|---|---|---|---|"]
    for f, info in fmt.items():
        c = info["check"]
        diff = c.get("max_abs_diff")
        detail = c.get("reason", "")
        if f == "int8" and "accuracy_drop" in c:
            detail = (f"drop {100 * c['accuracy_drop']:.2f} points vs fp32 (allowed {100 * c['max_drop']:.2f}), "
                      f"{100 * c['agreement_with_fp32']:.1f}% same predictions" + (f"; {detail}" if detail else ""))
        elif diff is not None:
            sizes = f", batch sizes {c['batch_sizes']}" if c.get("batch_sizes") else ""
            detail = f"tolerance {c['tolerance']:g}{sizes}" + (f"; {detail}" if detail else "")
        L.append(f"| {f} | {'passed' if c['passed'] else 'FAILED'} | {'' if diff is None else f'{diff:.2g}'} "
                 f"| {_pct(c.get('accuracy')) if 'accuracy' in c else ''} | {detail} |")
    L += ["", "## How to load and run", "", "```python",
          "import numpy as np",
          f"FOLDER = \"path/to/{name}\"   # this folder",
          f"x = np.zeros((4, {arch.resolution}, {arch.resolution}, {arch.in_channels}), np.float32)  "
          "# normalised images: (image - mean) / std", "```", ""]
    L += ["With this project installed (`pip install -e .` in compact-nas), any format:", "", "```python", "import nas",
          "model = nas.load(FOLDER)                      # flax; or format=\"onnx\" | \"int8\" | \"stablehlo\"",
          "logits = model(x)                             # (N, classes) numpy", "```", ""]
    if fmt.get("onnx", {}).get("file") or fmt.get("int8", {}).get("file"):
        f = FILES["onnx"] if fmt.get("onnx", {}).get("file") else FILES["int8"]
        L += ["ONNX Runtime only (`pip install onnxruntime numpy`); `model.int8.onnx` runs the same way:", "",
              "```python", "import onnxruntime as ort",
              f"sess = ort.InferenceSession(f\"{{FOLDER}}/{f}\", providers=[\"CPUExecutionProvider\"])",
              "logits = sess.run(None, {\"input\": x})[0]", "```", ""]
    if fmt.get("stablehlo", {}).get("file"):
        plats = ", ".join(fmt["stablehlo"].get("platforms", []))
        L += [f"StableHLO through JAX only (`pip install jax`; lowered for {plats}):",
              "", "```python", "from jax import export",
              "with open(f\"{FOLDER}/model.stablehlo\", \"rb\") as f:",
              "    exported = export.deserialize(bytearray(f.read()))",
              "logits = exported.call(x)", "```", ""]
    if fmt.get("flax", {}).get("file"):
        L += ["Flax weights with this project's model builder:", "", "```python", "import json",
              "from flax.serialization import msgpack_restore",
              "from search_spaces.architecture import Architecture", "from search_spaces.model import build_model",
              "arch = Architecture.from_dict(json.load(open(f\"{FOLDER}/architecture.json\"))[\"architecture\"])",
              "variables = msgpack_restore(open(f\"{FOLDER}/flax/variables.msgpack\", \"rb\").read())",
              "logits = build_model(arch).apply(variables, x, train=False)", "```", ""]
    return "\n".join(L)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def _teacher(m: Mapping[str, Any]) -> str:
    t = (m.get("distillation") or {}).get("teacher") or {}
    if not t:
        return ""
    acc = t.get("test_accuracy")
    return f" from teacher `{t.get('key', '?')}`" + (f" (test accuracy {_pct(acc)})" if acc is not None else "")
