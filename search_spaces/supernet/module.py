"""The Flax module: `Supernet(space)` declares every variable at its largest and applies one
candidate (`forward`); fresh variables drawn in NumPy (`initialize`) and their shapes.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from search_spaces.model import CONV_INIT
from search_spaces.space import SearchSpace
from search_spaces.supernet.candidates import Candidate, candidate, extreme
from search_spaces.supernet.computation import classify, forward
from search_spaces.supernet.structure import Layout, layout
from search_spaces.supernet.trees import plain


class _BN(nn.Module):
    """nn.BatchNorm's variables (params scale/bias, batch_stats mean/var), declared only."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[dict, dict]:
        c = self.features
        p = {"scale": self.param("scale", nn.initializers.ones, (c,), jnp.float32),
             "bias": self.param("bias", nn.initializers.zeros, (c,), jnp.float32)}
        s = {"mean": self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value,
             "var": self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value}
        return p, s


class _ConvBN(nn.Module):
    """A conv kernel (HWIO) and its BatchNorm, declared only (names as in `model.ConvBN`)."""

    shape: tuple[int, int, int, int]

    @nn.compact
    def __call__(self) -> dict:
        k = self.param("kernel", CONV_INIT, self.shape)
        p, s = _BN(self.shape[-1], name="bn")()
        return {"kernel": k, "bn": p, "stats": s}


class _Dense(nn.Module):
    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> dict:
        return {"kernel": self.param("kernel", nn.linear.default_kernel_init, self.shape),
                "bias": self.param("bias", nn.initializers.zeros, (self.shape[1],))}


def _declare(space: SearchSpace, lay: Layout) -> dict:
    """Declare every variable (inside `Supernet.__call__`), returning them as a plain tree."""
    c_in = space.in_channels
    k = space.stem.kernel
    v = {"stem": _ConvBN((k, k, c_in, lay.stem), name="stem")()}
    for sl in lay.slots:
        d = {}
        if sl.ds_kernel:
            d["ds"] = {"dw": _ConvBN((sl.ds_kernel, sl.ds_kernel, 1, sl.cin), name=f"{sl.name}_ds_dw")(),
                       "pw": _ConvBN((1, 1, sl.cin, sl.cout), name=f"{sl.name}_ds_pw")()}
        if sl.mb_kernel:
            m = {"dw": _ConvBN((sl.mb_kernel, sl.mb_kernel, 1, sl.expanded), name=f"{sl.name}_mb_dw")(),
                 "project": _ConvBN((1, 1, sl.expanded, sl.cout), name=f"{sl.name}_mb_project")()}
            if any(b[0] == "mb" for b in sl.branches):
                m["expand"] = _ConvBN((1, 1, sl.cin, sl.expanded), name=f"{sl.name}_mb_expand")()
            if sl.se:
                m["se"] = {"reduce": _Dense((sl.expanded, sl.se), name=f"{sl.name}_mb_se_reduce")(),
                           "expand": _Dense((sl.se, sl.expanded), name=f"{sl.name}_mb_se_expand")()}
            d["mb"] = m
        if sl.shortcut:
            d["skip"] = {"shortcut": _ConvBN((1, 1, sl.cin, sl.cout), name=f"{sl.name}_skip_shortcut")()}
        v[sl.name] = d
    v["head"] = _ConvBN((1, 1, lay.stages[-1], lay.head), name="head")()
    v["classifier"] = _Dense((lay.head, space.num_classes), name="classifier")()
    return v


class Supernet(nn.Module):
    """The weight-sharing supernet of `space`: `__call__(x, cand, train)` -> logits of candidate `cand`.

    `cand` is `candidate(space, arch)` (NumPy or traced arrays: one compiled program serves every
    candidate at one input resolution). With `train=True` BatchNorm normalises with batch statistics
    (the running statistics are not updated: they are re-estimated per candidate, see
    `evaluators.supernet.recalibrate`); with `moments=True` the call also returns each BatchNorm's
    batch mean and mean of squares, as a tree shaped like the 'batch_stats' collection ('mean' and
    'var' holding E[x] and E[x^2]; zeros for BatchNorms the candidate does not use). Head dropout
    applies in training mode when a 'dropout' RNG is given.

    Variable names: 'stem', 'head', 'classifier' as in `model.Net`; per slot `s{S}_l{L}_ds_dw`,
    `..._ds_pw`, `..._mb_expand`, `..._mb_dw`, `..._mb_se_reduce`, `..._mb_se_expand`,
    `..._mb_project`, `..._skip_shortcut` (`extract` maps them to a stand-alone network).
    """

    space: SearchSpace

    @nn.compact
    def __call__(self, x: jnp.ndarray, cand: Candidate, train: bool = False, moments: bool = False):
        lay = layout(self.space)
        v = _declare(self.space, lay)
        if self.is_initializing():
            return jnp.zeros((x.shape[0], self.space.num_classes), jnp.float32)
        logits, feats, mom = forward(self.space, v, x, cand, train)
        if train and self.space.dropout and self.has_rng("dropout"):
            logits = classify(v, nn.Dropout(self.space.dropout, deterministic=False)(feats))
        return (logits, mom) if moments else logits


def variable_shapes(space: SearchSpace, resolution: int | None = None) -> dict[str, Any]:
    """{'params', 'batch_stats'} of `Supernet(space)` as ShapeDtypeStructs (nothing is computed)."""
    res = resolution or space.resolutions[0]
    cand = candidate(space, extreme(space, largest=True))
    x = jax.ShapeDtypeStruct((1, res, res, space.in_channels), jnp.float32)
    return plain(jax.eval_shape(lambda x, c: Supernet(space).init(jax.random.PRNGKey(0), x, c), x, cand))


def initialize(space: SearchSpace, seed: int = 0) -> dict[str, Any]:
    """Fresh supernet variables as NumPy arrays, deterministic in `seed`: conv kernels He normal on
    fan-out, dense kernels LeCun truncated normal, biases 0, BatchNorm scale 1, statistics 0 / 1 (the
    initialisers the module declares; drawn in NumPy because a traced random init took a minute here)."""
    def leaf(path: tuple[str, ...], spec: Any) -> np.ndarray:
        shape, name = tuple(spec.shape), path[-1]
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        if name in ("bias", "mean"):
            return np.zeros(shape, np.float32)
        if name in ("scale", "var"):
            return np.ones(shape, np.float32)
        if len(shape) == 4:
            return rng.normal(0.0, math.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape).astype(np.float32)
        z = rng.standard_normal(shape)
        while np.any(np.abs(z) > 2):
            bad = np.abs(z) > 2
            z[bad] = rng.standard_normal(int(bad.sum()))
        return (z * math.sqrt(1.0 / shape[0]) / 0.87962566103423978).astype(np.float32)

    flat = flax.traverse_util.flatten_dict(variable_shapes(space))
    return flax.traverse_util.unflatten_dict({p: leaf(p, spec) for p, spec in sorted(flat.items())})
