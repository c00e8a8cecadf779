"""The format writers of an export folder: Flax msgpack, ONNX (jax2onnx), StableHLO (jax.export), int8 ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.onnx_export import to_onnx
from evaluators.quantize import quantize_static_int8, resolve_weight_range
from evaluators.variables import load_variables, save_variables
from nas.export.loading import FILES, STABLEHLO_PLATFORMS, leaf_shapes, sha256_file
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import build_model


def write_flax(stage: Path, variables: Any) -> dict[str, Any]:
    path = stage / FILES["flax"]
    save_variables(path, variables)
    back = load_variables(path)  # bit-exact round trip, leaf by leaf
    import jax

    a, b = jax.tree_util.tree_flatten_with_path(variables)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    if [p for p, _ in a] != [p for p, _ in b] or not all(np.array_equal(np.asarray(u), np.asarray(v))
                                                         for (_, u), (_, v) in zip(a, b)):
        raise NasError(f"{path}: read back differs from what was written")
    manifest = {"file": path.name, "serialization": "flax.serialization.msgpack_serialize (nested dict of arrays)",
                "collections": sorted(back), "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "shapes": {k: list(v) for k, v in leaf_shapes(back).items()}}
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


def onnx_model(arch: Architecture, variables: Any):
    _lean_jax2onnx_plugins()
    return to_onnx(arch, variables)


def write_onnx(stage: Path, arch: Architecture, variables: Any, data) -> dict[str, Any]:
    import onnx

    model = onnx_model(arch, variables)
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


def write_stablehlo(stage: Path, arch: Architecture, variables: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax import export


    net = build_model(arch, "fast")
    v = jax.tree.map(jnp.asarray, {k: variables[k] for k in ("params", "batch_stats") if k in variables})
    fn = jax.jit(lambda x: net.apply(v, x, train=False))
    b, = export.symbolic_shape("B")
    exported = export.export(fn, platforms=STABLEHLO_PLATFORMS)(
        jax.ShapeDtypeStruct((b, arch.resolution, arch.resolution, arch.in_channels), jnp.float32))
    (stage / FILES["stablehlo"]).write_bytes(exported.serialize())
    return {"platforms": list(exported.platforms), "conv_impl": "fast", "batch_dim": "B",
            "calling_convention_version": exported.calling_convention_version, "jax": jax.__version__}


def write_int8(stage: Path, calibration: np.ndarray, method: str, float_se: bool = False,
               weight_range: str = "full") -> dict[str, Any]:
    """model.int8.onnx from model.onnx (static QDQ); `weight_range` 'auto' resolves for this machine."""
    info = quantize_static_int8(stage / FILES["onnx"], stage / FILES["int8"], calibration, method=method,
                                float_se=float_se, weight_range=resolve_weight_range(weight_range))
    info.pop("bytes", None)
    return info


# ------------------------------------------------------------ costs, latency, metrics
