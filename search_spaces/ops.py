"""Convolution kernels behind the blocks, in two interchangeable implementations.

`reference` uses `lax.conv_general_dilated` (what `flax.linen.Conv` does). `fast` writes the
depthwise convolution as k*k shifted multiply-adds and the 1x1 convolution as a matrix
product: XLA:CPU runs grouped convolutions 20-30x slower than that (see PLATFORM-NOTES).
Both take the same parameters (HWIO kernels) and give the same results.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

IMPLS = ("fast", "reference")
_DN = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(output size, pad before, pad after) of TF/XLA 'SAME' padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def depthwise_reference(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN,
                                    feature_group_count=x.shape[-1])


def depthwise_fast(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Depthwise k x k SAME convolution as k*k strided slices times per-channel weights."""
    n, h, wd, c = x.shape
    k = w.shape[0]
    oh, pt, pb = same_padding(h, k, stride)
    ow, pl, pr = same_padding(wd, w.shape[1], stride)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    acc = None
    for i in range(k):
        for j in range(w.shape[1]):
            patch = lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                              (1, stride, stride, 1))
            term = patch * w[i, j, 0]
            acc = term if acc is None else acc + term
    return acc


def pointwise_reference(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


def pointwise_fast(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    """1x1 SAME convolution as a matrix product (stride = subsampling; SAME adds no padding)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return jnp.einsum("nhwc,cd->nhwd", x, w[0, 0])


def conv_reference(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


KERNELS = {
    "fast": {"dwconv": depthwise_fast, "pwconv": pointwise_fast, "conv": conv_reference},
    "reference": {"dwconv": depthwise_reference, "pwconv": pointwise_reference, "conv": conv_reference},
}
