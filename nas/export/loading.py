"""Loading an exported model folder back as a callable (`nas.load`), with its integrity checks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluators.datasets import pad_batches
from evaluators.onnx_export import ort_session, run
from evaluators.predict import predict_logits
from evaluators.variables import variable_shapes
from nas.rundir import ARCHITECTURE, read_architecture
from nas.teacher import load_checkpoint_folder
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError


LOAD_FORMATS = ("flax", "onnx", "int8", "stablehlo")  # what `load(folder, format=...)` accepts
FILES = {"flax": "flax/variables.msgpack", "onnx": "model.onnx", "int8": "model.int8.onnx",
         "stablehlo": "model.stablehlo"}
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
CHECK_BATCH = 256  # rows per runtime call in the checks (the last call is smaller: two batch sizes)
RUN_BATCH = 256  # rows per call in LoadedModel for ONNX / StableHLO


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
        _verify_manifest(folder)
        arch, variables = load_checkpoint_folder(folder)
        check_tree(arch, variables, folder)
        return LoadedModel(arch, variables, folder, "flax")
    arch = _read_arch(folder)
    path = folder / FILES[format]
    if not path.exists():
        raise NasError(f"{path}: not found{_why_missing(folder, format)}")
    if format in ("onnx", "int8"):
        return LoadedModel(arch, None, folder, format, _ort_runner(path, threads))
    return LoadedModel(arch, None, folder, format, _stablehlo_runner(path))


def _read_arch(folder: Path) -> Architecture:
    f = folder / ARCHITECTURE
    if not f.exists():
        raise NasError(f"{folder}: not an exported model (no {ARCHITECTURE})")
    return read_architecture(f)


def _why_missing(folder: Path, format: str) -> str:
    try:
        check = json.loads((folder / "metrics.json").read_text())["formats"][format]["check"]
    except (OSError, ValueError, KeyError, TypeError):
        flag = "--int8" if format == "int8" else f"--format {format}"
        return f" (export with {flag})"
    return f" (its export failed its check: {check.get('reason', '?')}; see metrics.json)"


def _ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    try:
        sess = ort_session(str(path), threads=threads)
    except Exception as e:  # ORT raises its own exception types
        raise NasError(f"{path}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0][:200]}") from None

    def runner(x: np.ndarray) -> np.ndarray:
        return run(sess, x, batch=RUN_BATCH)

    return runner


def _stablehlo_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import jax
    from jax import export


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


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    import jax

    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expectedleaf_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    return leaf_shapes(variable_shapes(arch))


def check_tree(arch: Architecture, variables: Any, where: Path) -> None:
    """The variables hold exactly the params/batch_stats arrays the architecture needs."""
    got = {k: v for k, v in leaf_shapes(variables).items() if k.startswith(("['params']", "['batch_stats']"))}
    want = _expectedleaf_shapes(arch)
    for k in sorted(set(want) | set(got)):
        if got.get(k) != want.get(k):
            what = ("missing" if k not in got else "unexpected" if k not in want
                    else f"shape {got[k]}, expected {want[k]}")
            raise NasError(f"{where}: variables do not fit architecture '{arch.key}': {k} {what}")


def sha256_file(path: Path) -> str:
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
    if f.exists() and sha256_file(f) != digest:
        raise NasError(f"{f}: checksum differs from flax/manifest.json (file corrupt or replaced)")
