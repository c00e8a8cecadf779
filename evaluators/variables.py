"""Model variables: the train state, initialisation, shape checks, and saving/loading.

Parameters are initialised from `jax.eval_shape` plus NumPy draws from the distributions the
model declares (conv kernels: He normal on fan-out; dense kernels: LeCun truncated normal;
biases 0, BatchNorm scale 1): a jitted `model.init` costs seconds per new architecture here.
Variables are saved as Flax msgpack, written atomically.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import zlib
from typing import Any, Mapping

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import Net, build_model, input_shape

Variables = dict[str, Any]


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics and the base dropout key."""

    batch_stats: Any
    key: jax.Array


@functools.lru_cache(maxsize=16)
def variable_shapes(arch: Architecture) -> Variables:
    """{'params', 'batch_stats'} of `arch` as ShapeDtypeStructs (plain dicts; do not modify). Cached:
    tracing the Flax model is a noticeable part of a new candidate's start-up, and initialisation,
    checks and compilation all need the shapes. Both convolution implementations declare the same
    variables (tests/test_ops.py runs one tree through both), so this traces the reference form,
    whose single convolution ops trace faster than the fast form's shifted multiply-adds, with
    zeros initialisers (`Net.zero_init`): only the shapes are kept."""
    model = Net(arch, "reference", zero_init=True)
    return plain_tree(jax.eval_shape(lambda inp: model.init(jax.random.PRNGKey(0), inp, train=False),
                                      jax.ShapeDtypeStruct(input_shape(arch, 1), jnp.float32)))


def initialize(arch: Architecture, *, seed: int = 0, conv_impl: str = "fast") -> Variables:
    """Fresh {'params', 'batch_stats'} as NumPy arrays, deterministic in `seed`.

    Shapes come from `jax.eval_shape(model.init)`; values are NumPy draws from the model's
    declared initialisers (falls back to a jitted `model.init` for a leaf it does not know).
    """
    flat = flax.traverse_util.flatten_dict(variable_shapes(arch))
    out = {}
    for path, spec in sorted(flat.items()):
        value = init_leaf(path, tuple(spec.shape), seed)
        if value is None:  # a leaf this module does not know: use the model's own initialisers
            model = build_model(arch, conv_impl)
            real = jax.jit(lambda inp: model.init(jax.random.PRNGKey(seed), inp, train=False))(
                jnp.zeros(input_shape(arch, 1), jnp.float32))
            return jax.tree.map(np.asarray, plain_tree(real))
        out[path] = value.astype(spec.dtype)
    return flax.traverse_util.unflatten_dict(out)


def init_leaf(path: tuple[str, ...], shape: tuple[int, ...], seed: int) -> np.ndarray | None:
    collection, name = path[0], path[-1]
    rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
    if collection == "batch_stats":
        return {"mean": np.zeros(shape), "var": np.ones(shape)}.get(name)
    if name == "bias":
        return np.zeros(shape)
    if name == "scale":
        return np.ones(shape)
    if name == "kernel" and len(shape) == 4:  # conv HWIO: variance_scaling(2, fan_out, normal)
        fan_out = shape[0] * shape[1] * shape[3]
        return rng.normal(0.0, math.sqrt(2.0 / fan_out), shape)
    if name == "kernel" and len(shape) == 2:  # dense: lecun_normal = truncated normal on fan_in
        std = math.sqrt(1.0 / shape[0]) / 0.87962566103423978
        z = rng.standard_normal(shape)
        while np.any(np.abs(z) > 2):
            bad = np.abs(z) > 2
            z[bad] = rng.standard_normal(int(bad.sum()))
        return z * std
    return None


def plain_tree(tree: Any) -> Any:
    """FrozenDict/dict tree -> nested plain dicts."""
    if isinstance(tree, Mapping):
        return {k: plain_tree(v) for k, v in tree.items()}
    return tree


def check_variables(arch: Architecture, variables: Mapping[str, Any], what: str = "variables") -> Variables:
    """{'params', 'batch_stats'} of `variables` after checking their tree and shapes fit `arch`
    (raises `NasError` naming `what` and the first mismatching entry)."""
    return _check_variables(variables, variable_shapes(arch), what)


def _check_variables(variables: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> Variables:
    """Keep 'params'/'batch_stats' and check their tree and shapes against `expected`."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise NasError(f"{what}: expected a mapping with 'params' and 'batch_stats'")
    got = {k: plain_tree(variables[k]) for k in ("params", "batch_stats") if k in variables}
    want = flax.traverse_util.flatten_dict(expected)
    have = flax.traverse_util.flatten_dict(got)
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise NasError(f"{what}: missing {'/'.join(path)} for this architecture")
        if path not in want:
            raise NasError(f"{what}: unexpected {'/'.join(path)} for this architecture")
        if tuple(np.shape(have[path])) != tuple(want[path].shape):
            raise NasError(f"{what}: {'/'.join(path)} has shape {tuple(np.shape(have[path]))}, "
                           f"this architecture needs {tuple(want[path].shape)}")
    return got


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Write variables as Flax msgpack, atomically (temporary file in the same folder + os.replace)."""
    path = os.fspath(path)
    data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, plain_tree(jax.device_get(dict(variables)))))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".msgpack", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_variables(path: str | os.PathLike) -> Variables:
    """Read variables written by `save_variables` (nested dicts of NumPy arrays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NasError(f"{path}: variables file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        restored = flax.serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise NasError(f"{path}: not a Flax msgpack variables file ({type(e).__name__})") from None
    if not isinstance(restored, dict):
        raise NasError(f"{path}: not a Flax msgpack variables file (top level is {type(restored).__name__})")
    return restored
