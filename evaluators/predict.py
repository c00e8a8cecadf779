"""Inference with trained variables: logits, penultimate features, accuracy and loss, in fixed-shape batches."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from evaluators.datasets import pad_batches
from evaluators.variables import Variables, plain_tree
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import build_model, input_shape

EVAL_BATCH = 256


@functools.partial(jax.jit, static_argnames=("arch", "impl"))
def _forward(variables: Variables, x: jnp.ndarray, *, arch: Architecture, impl: str) -> jnp.ndarray:
    return build_model(arch, impl).apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnames=("arch", "impl"))
def _forward_features(variables: Variables, x: jnp.ndarray, *, arch: Architecture,
                      impl: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    return build_model(arch, impl).apply(variables, x, train=False, features=True)


def predict_logits(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, *,
                   batch_size: int = EVAL_BATCH, conv_impl: str = "fast") -> np.ndarray:
    """Logits for every row of `x` (normalised NHWC), in fixed-shape batches (the last one padded).

    Fewer rows than `batch_size` run as one batch padded to the next power of two.
    """
    return _predict(arch, variables, x, batch_size, conv_impl, features=False)


def predict_features(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, *,
                     batch_size: int = EVAL_BATCH, conv_impl: str = "fast") -> tuple[np.ndarray, np.ndarray]:
    """(logits, penultimate pooled features) for every row of `x`, batched like `predict_logits`."""
    return _predict(arch, variables, x, batch_size, conv_impl, features=True)


def _predict(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, batch_size: int, conv_impl: str,
             features: bool) -> Any:
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1:] != tuple(input_shape(arch, 1)[1:]):
        raise NasError(f"predict: inputs of shape {x.shape}; architecture '{arch.key}' expects "
                       f"(N, {', '.join(map(str, input_shape(arch, 1)[1:]))})")
    if batch_size < 1:
        raise NasError(f"batch_size: {batch_size}; allowed an integer >= 1")
    v = jax.device_put({k: plain_tree(variables[k]) for k in ("params", "batch_stats") if k in variables})
    if 0 < len(x) < batch_size:  # small inputs: the next power of two, so few shapes ever compile
        batch_size = 1 << (len(x) - 1).bit_length()
    xp, n = pad_batches(x, batch_size)
    if features:
        outs = [jax.device_get(_forward_features(v, xp[i:i + batch_size], arch=arch, impl=conv_impl))
                for i in range(0, len(xp), batch_size)]
        return (np.concatenate([np.asarray(o[0]) for o in outs])[:n],
                np.concatenate([np.asarray(o[1]) for o in outs])[:n])
    out = [np.asarray(_forward(v, xp[i:i + batch_size], arch=arch, impl=conv_impl))
           for i in range(0, len(xp), batch_size)]
    return np.concatenate(out)[:n]


def evaluate(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, y: np.ndarray, *,
             batch_size: int = EVAL_BATCH, conv_impl: str = "fast") -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of `variables` on (x, y)."""
    y = np.asarray(y)
    if len(y) != len(x) or len(y) == 0:
        raise NasError(f"evaluate: x has {len(x)} rows and y has {len(y)}; need the same, non-zero count")
    logits = predict_logits(arch, variables, x, batch_size=batch_size, conv_impl=conv_impl).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    acc = float((logits.argmax(axis=1) == y).mean())
    return acc, loss
