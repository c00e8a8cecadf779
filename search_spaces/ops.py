"""Convolution kernels behind the blocks, in two interchangeable implementations.

`reference` uses `lax.conv_general_dilated` (what `flax.linen.Conv` does). `fast` writes the
depthwise convolution as k*k shifted multiply-adds with a hand-written backward pass, and the
1x1 convolution as a matrix product: XLA:CPU runs grouped convolutions 20-30x slower than that
(a 5x5 depthwise conv on 32x32x192 at batch 1: ~6 ms vs ~0.24 ms on the development machine).
Both take the same parameters (HWIO kernels), use TF/XLA 'SAME' padding and agree to float32 rounding (tests/test_ops.py).

Depthwise, fast form (`depthwise_fast`, a `jax.custom_vjp`):
  forward      y[o]  = sum_i xp[o*s + i] * w[i]      one fused loop over the output
  input grad   dx    = the transpose, split into s*s phases (space-to-depth): each phase is a
                       stride-1 shifted multiply-add of g with a sub-kernel w[r::s], so no
                       tap ever touches the zeros a dilated g would hold
  weight grad  dw[i] = sum_{n,o} xp[o*s + i] * g[o]  one variadic reduction with k*k outputs,
                       per cache-sized slice of the batch, then summed over the slices (one
                       pass over the whole batch was 1.5-4x slower, and adds up long float32 sums)

BatchNorm in training mode (`batch_norm_train`, a `jax.custom_vjp`) has a hand-written backward
pass too; `model.BatchNormTrain` uses it with `nn.BatchNorm`'s variables.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("fast", "reference")
_DN = ("NHWC", "HWIO", "NHWC")
CHUNK_BYTES = 1 << 20  # weight-gradient batch slice: about one core's L2


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(output size, pad before, pad after) of TF/XLA 'SAME' padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def depthwise_reference(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN,
                                    feature_group_count=x.shape[-1])


Pads = tuple[int, int, int, int]  # top, bottom, left, right; negative = crop


def _same_pads(x: jnp.ndarray, kh: int, kw: int, stride: int) -> Pads:
    _, pt, pb = same_padding(x.shape[1], kh, stride)
    _, pl, pr = same_padding(x.shape[2], kw, stride)
    return pt, pb, pl, pr


def _pad(x: jnp.ndarray, kh: int, kw: int, stride: int, pads: Pads) -> tuple[jnp.ndarray, int, int]:
    """x padded (or cropped, for negative pads), and the output height and width."""
    pt, pb, pl, pr = pads
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    return xp, (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1


def _live_taps(size: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """(first tap, last tap, pad before, pad after) of a SAME convolution restricted to the taps
    that read at least one real (not padding) position. On small maps most taps of a large kernel
    only read padding (a 7x7 kernel on a 2x2 map: 9 of 49 taps are live, on 1x1 just one); they
    add zeros, so dropping them is exact and shrinks the compiled program."""
    out, before, _ = same_padding(size, kernel, stride)
    live = [i for i in range(kernel) if any(0 <= i + stride * a - before < size for a in range(out))]
    first, last = live[0], live[-1]
    pad_before = before - first
    return first, last, pad_before, (out - 1) * stride + (last - first + 1) - size - pad_before


def _tap(xp: jnp.ndarray, a: int, b: int, stride: int, oh: int, ow: int) -> jnp.ndarray:
    """xp[..., a + s*i, b + s*j, :] for the oh x ow outputs: what tap (a, b) reads (xp: (*batch, H, W, C))."""
    lead, c = xp.shape[:-3], xp.shape[-1]
    return lax.slice(xp, (0,) * len(lead) + (a, b, 0),
                     (*lead, a + (oh - 1) * stride + 1, b + (ow - 1) * stride + 1, c),
                     (1,) * len(lead) + (stride, stride, 1))


def _shifted_sum(xp: jnp.ndarray, w: jnp.ndarray, stride: int, oh: int, ow: int,
                 flip: bool = False) -> jnp.ndarray:
    """sum over taps (i, j) of xp[:, i + s*a, j + s*b, :] * w[i, j] (w: kh x kw x C).

    With flip, tap (i, j) reads xp at (kh-1-i, kw-1-j): a correlation with the flipped kernel.
    """
    lead, c = xp.shape[:-3], xp.shape[-1]  # any leading (batch) dimensions
    kh, kw = w.shape[:2]
    out = (*lead, oh, ow, c)
    acc = None
    for i in range(kh):
        for j in range(kw):
            a, b = (kh - 1 - i, kw - 1 - j) if flip else (i, j)
            patch = _tap(xp, a, b, stride, oh, ow)
            tap = lax.broadcast_in_dim(lax.slice(w, (i, j, 0), (i + 1, j + 1, c)), out,
                                       tuple(range(len(lead), len(out))))
            term = lax.mul(patch, tap)
            acc = term if acc is None else lax.add(acc, term)
    return acc


def _depthwise_forward(x: jnp.ndarray, w: jnp.ndarray, stride: int,
                       pads: Pads | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(output, padded input) of the shifted-sum depthwise convolution; the padded input comes as
    (slices, batch slice, height, width, channels), the weight gradient's cache-sized batch slices.

    The forward pass reads the same sliced view: when it read the plain padded input, XLA wrote the
    padded input (with the BatchNorm and activation before it) twice, once in each shape."""
    pads = pads if pads is not None else _same_pads(x, w.shape[0], w.shape[1], stride)
    xp, oh, ow = _pad(x, w.shape[0], w.shape[1], stride, pads)
    n, c = x.shape[0], x.shape[-1]
    # A symbolic batch (shape-polymorphic export) is one slice: only the weight gradient reads them.
    b = _batch_chunk(n, (xp[0].size + oh * ow * c) * xp.dtype.itemsize) if isinstance(n, int) else n
    xp = xp.reshape(n // b, b, *xp.shape[1:])
    return _shifted_sum(xp, w[:, :, 0], stride, oh, ow).reshape(n, oh, ow, c), xp


def _depthwise_input_grad(g: jnp.ndarray, w: jnp.ndarray, stride: int, h: int, wd: int,
                          pads: Pads) -> jnp.ndarray:
    """d loss / d x of the SAME depthwise convolution, by phases of the padded input.

    Padded position p = q*s + r receives g[q - t] * w[r + s*t] for t >= 0: per phase r a
    stride-1 correlation of g with the sub-kernel w[r::s] (flipped).
    """
    n, oh, ow, c = g.shape
    kh, kw = w.shape[:2]
    pt, _, pl, _ = pads
    s = stride
    qh, qw = -(-(pt + h) // s), -(-(pl + wd) // s)  # phase rows/cols covering the real input
    # One padded g serves every phase (phase (r, rc) reads it from row th_max - th, column
    # tw_max - tw on): padding it per phase cost s*s copies of g and as many compiled kernels.
    th_max, tw_max = -(-kh // s), -(-kw // s)
    gp = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (th_max - 1, max(qh - oh, 0), 0), (tw_max - 1, max(qw - ow, 0), 0), (0, 0, 0)))
    rows = []
    for r in range(s):
        cols = []
        for rc in range(s):
            th, tw = len(range(r, kh, s)), len(range(rc, kw, s))
            if th == 0 or tw == 0:
                cols.append(jnp.zeros((n, qh, qw, c), g.dtype))
                continue
            sub = lax.slice(w, (r, rc, 0), (kh, kw, c), (s, s, 1))
            view = lax.slice(gp, (0, th_max - th, tw_max - tw, 0), gp.shape)
            cols.append(_shifted_sum(view, sub, 1, qh, qw, flip=True))
        rows.append(cols[0] if s == 1 else jnp.stack(cols, axis=3))
    if s == 1:
        full = rows[0]
    else:
        full = jnp.stack(rows, axis=2).reshape(n, qh * s, qw * s, c)  # interleave the phases
    return lax.slice(full, (0, pt, pl, 0), (n, pt + h, pl + wd, c))


def _batch_chunk(n: int, per_item_bytes: int) -> int:
    """Largest divisor of n whose batch slice stays within CHUNK_BYTES (at least 1)."""
    target = max(1, CHUNK_BYTES // max(per_item_bytes, 1))
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= target)


def _depthwise_weight_grad(xp: jnp.ndarray, g: jnp.ndarray, kh: int, kw: int, stride: int) -> jnp.ndarray:
    """d loss / d w (kh x kw x 1 x C) from the padded input in batch slices, xp (m, b, H, W, C) (see
    `_depthwise_forward`): per tap, the sum over batch and space of shifted xp * g."""
    m, b = xp.shape[:2]
    _, oh, ow, c = g.shape
    # One variadic reduction computes all k*k sums per cache-sized batch slice (k*k separate
    # reductions were 2-3x slower and each one compiled on its own; one pass over the whole batch
    # was 1.5-4x slower and adds up long float32 sums), then the m partial sums are added. A
    # `fori_loop` over the slices cost 5-6 more compiled kernels per layer (the loop, its zero
    # accumulator and the addition): without it, epoch programs have 20-27 fewer kernels and
    # compiled 0-20% faster, with steps 1-4% slower (same-process A/B, three networks).
    gr = g.reshape(m, b, oh, ow, c)
    products = tuple(lax.mul(_tap(xp, i, j, stride, oh, ow), gr) for i in range(kh) for j in range(kw))
    sums = lax.reduce(products, (jnp.zeros((), g.dtype),) * len(products),
                      lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2, 3))
    return jnp.sum(jnp.stack(sums), axis=1).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jnp.ndarray, w: jnp.ndarray, stride: int, pads: Pads) -> jnp.ndarray:
    return _depthwise_forward(x, w, stride, pads)[0]


def _depthwise_fwd(x, w, stride, pads):
    # The residual is the padded input the forward pass reads anyway: keeping x instead made the
    # weight gradient pad it again, a second full copy of the layer's input per step.
    y, xp = _depthwise_forward(x, w, stride, pads)
    return y, (xp, w)


def _depthwise_bwd(stride, pads, res, g):
    xp, w = res
    pt, pb, pl, pr = pads
    h, wd = xp.shape[-3] - pt - pb, xp.shape[-2] - pl - pr
    dx = _depthwise_input_grad(g, w[:, :, 0], stride, h, wd, pads)
    dw = _depthwise_weight_grad(xp, g, w.shape[0], w.shape[1], stride)
    return dx.astype(xp.dtype), dw.astype(w.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_fast(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Depthwise k x k SAME convolution (HWIO kernel k x k x 1 x C) as shifted multiply-adds,
    over the live taps only (see `_live_taps`); the dropped taps' weights get zero gradient."""
    i0, i1, pt, pb = _live_taps(x.shape[1], w.shape[0], stride)
    j0, j1, pl, pr = _live_taps(x.shape[2], w.shape[1], stride)
    return _depthwise(x, w[i0:i1 + 1, j0:j1 + 1], stride, (pt, pb, pl, pr))


def depthwise_shifted(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    """The same forward as `depthwise_fast`, differentiated by JAX (kept for comparison)."""
    return _depthwise_forward(x, w, stride)[0]


def pointwise_reference(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


def pointwise_fast(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    """1x1 SAME convolution as a matrix product (stride = subsampling; SAME adds no padding)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    # A 2-D (pixels x channels) matmul: XLA:CPU ran the 4-D einsum form and its gradient
    # 1.3-1.8x slower in a whole MobileNetV2 train step.
    return (x.reshape(-1, x.shape[-1]) @ w[0, 0]).reshape(*x.shape[:-1], w.shape[-1])


def conv_reference(x: jnp.ndarray, w: jnp.ndarray, stride: int) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


KERNELS = {
    "fast": {"dwconv": depthwise_fast, "pwconv": pointwise_fast, "conv": conv_reference},
    "reference": {"dwconv": depthwise_reference, "pwconv": pointwise_reference, "conv": conv_reference},
}


# ==================================================================== BatchNorm, training mode
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                     eps: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(y, sum of x, sum of x^2) of BatchNorm over all axes but the last, normalising as Flax does
    (batch mean, biased variance E[x^2] - E[x]^2), with a hand-written backward pass: two plain
    reductions and one elementwise expression. BatchNorm was 17-25% of a train step; against
    autodiff of `nn.BatchNorm` this compiled the step 3-22% faster and ran it up to 4% faster
    (docs/performance.md). The raw sums are the reductions' own outputs: recording them (see
    `model.BatchNormTrain`) costs XLA:CPU no extra kernel, where a mean or variance would."""
    return _bn_fwd(x, scale, bias, eps)[0]


def bn_moments(count: jnp.ndarray | int, total: jnp.ndarray, total_sq: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(mean, biased variance) from a count, a sum and a sum of squares."""
    mean = total / count
    return mean, jnp.maximum(total_sq / count - mean * mean, 0.0)


def _bn_fwd(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    s1, s2 = jnp.sum(x, axis=axes), jnp.sum(x * x, axis=axes)
    mean, var = bn_moments(x.size // x.shape[-1], s1, s2)
    inv = lax.rsqrt(var + eps)
    y = (x - mean) * (inv * scale) + bias
    return (y, s1, s2), (x, mean, inv, scale)


def _bn_bwd(eps, res, cts):
    x, mean, inv, scale = res
    g = cts[0]
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    dbias = jnp.sum(g, axis=axes)
    # sum(g * xhat) as inv * (sum(g * x) - mean * sum(g)): XLA:CPU's library reduction reads g and x
    # as they are, where xhat = (x - mean) * inv was first written out as one more full-size tensor
    # per BatchNorm (steps 14-22% faster). Like the forward's E[x^2] - E[x]^2, this loses relative
    # precision as |mean| / std grows (about 1e-5 at 10).
    dscale = inv * (jnp.sum(g * x, axis=axes) - mean * dbias)
    dx = (scale * inv / n) * (n * g - dbias - (x - mean) * inv * dscale)
    dx = dx + cts[1] + 2.0 * cts[2] * x  # zero unless a loss uses the sums
    return dx, dscale, dbias


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)
