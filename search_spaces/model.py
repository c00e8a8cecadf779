"""Architecture -> Flax (linen) model. BatchNorm runs in batch-stat mode when `train=True`.

The model is a linen module whose only configuration is the (hashable) Architecture and the
convolution implementation, so jit caches key on the architecture itself.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from search_spaces.architecture import Architecture, Layer
from search_spaces.errors import SpaceError
from search_spaces.ops import IMPLS, KERNELS, batch_norm_train, bn_moments

ACT_FNS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "hswish": jax.nn.hard_swish,
    "sigmoid": jax.nn.sigmoid,
    "hsigmoid": jax.nn.hard_sigmoid,
}
# A short running-statistics window: search schedules are a few hundred steps during which the
# weights move fast, and 0.9 left evaluation-mode statistics so stale that the largest
# mobile_small net scored chance (0.096) on digits after 2 epochs; 0.5 gave 0.94 after one.
BN_MOMENTUM = 0.5
BN_EPS = 1e-5
# The collection in which `BatchNormTrain` records each batch's count, sum and sum of squares
# when it is mutable (and 'batch_stats' is not), instead of updating the running averages.
MOMENTS = "moments"


class BatchNormTrain(nn.Module):
    """Training-mode BatchNorm on `ops.batch_norm_train`, with the variables of `nn.BatchNorm`
    (params scale/bias, batch_stats mean/var) and its running-average update, so the two share
    one parameter tree: the fast blocks train with this, and evaluate with `nn.BatchNorm`.

    Applied with `mutable=[MOMENTS]` instead of `mutable=["batch_stats"]`, it leaves the running
    averages alone and returns this batch's 'sum' and 'sumsq' per channel and their 'count' (an
    int: the values each channel's sums cover). A compiled epoch folds all its steps' sums into
    the averages at once (`evaluators.step.train_epoch`)."""

    momentum: float
    epsilon: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y, total, total_sq = batch_norm_train(x, scale, bias, self.epsilon)
        if self.is_initializing():
            return y
        count = x.size // c
        if self.is_mutable_collection(MOMENTS):
            self.put_variable(MOMENTS, "count", count)  # a Python int: static, not an array
            self.put_variable(MOMENTS, "sum", total)
            self.put_variable(MOMENTS, "sumsq", total_sq)
        if self.is_mutable_collection("batch_stats"):
            mean, var = bn_moments(count, total, total_sq)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _init(zero: bool, declared: Callable) -> Callable:
    """The declared initialiser, or zeros for a shapes-only trace (see `Net.zero_init`)."""
    return nn.initializers.zeros if zero else declared


CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=-2, out_axis=-1)


class Down(nn.Module):
    """The first half of a low-rank factorized layer: a bare 1x1 conv (or dense map) to `rank`
    channels, no bias, no BatchNorm, no activation; its variables are {'kernel'}."""

    rank: int
    kind: str  # pwconv | dense
    stride: int = 1
    impl: str = "fast"
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.kind == "dense":
            init = _init(self.zero_init, nn.linear.default_kernel_init)
            return x @ self.param("kernel", init, (x.shape[-1], self.rank)).astype(x.dtype)
        w = self.param("kernel", _init(self.zero_init, CONV_INIT), (1, 1, x.shape[-1], self.rank))
        return KERNELS[self.impl]["pwconv"](x, w.astype(x.dtype), self.stride)


class ConvBN(nn.Module):
    """Convolution (no bias) + BatchNorm + optional activation. With `rank` (1x1 convs only) the
    convolution is low-rank factorized: `Down` (cin -> rank, carrying the stride) then this
    module's own kernel (rank -> features) with the BatchNorm."""

    features: int
    kind: str  # conv | pwconv | dwconv
    kernel: int = 1
    stride: int = 1
    act: str = ""
    impl: str = "fast"
    zero_init: bool = False
    rank: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        stride = self.stride
        if self.rank is not None:
            x = Down(self.rank, "pwconv", stride, self.impl, self.zero_init, name="down")(x)
            stride = 1
        cin = x.shape[-1]
        shape = (self.kernel, self.kernel, 1, cin) if self.kind == "dwconv" else (
            self.kernel, self.kernel, cin, self.features)
        w = self.param("kernel", _init(self.zero_init, CONV_INIT), shape)
        x = KERNELS[self.impl][self.kind](x, w.astype(x.dtype), stride)
        if train and self.impl == "fast":
            x = BatchNormTrain(BN_MOMENTUM, BN_EPS, name="bn")(x)
        else:
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, name="bn")(x)
        return ACT_FNS[self.act](x) if self.act else x


class SqueezeExcite(nn.Module):
    reduced: int
    gate: str
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = _init(self.zero_init, nn.linear.default_kernel_init)
        s = jnp.mean(x, axis=(1, 2))
        s = jax.nn.relu(nn.Dense(self.reduced, kernel_init=init, name="reduce")(s))
        s = ACT_FNS[self.gate](nn.Dense(x.shape[-1], kernel_init=init, name="expand")(s))
        return x * s[:, None, None, :]


class Block(nn.Module):
    """One layer: `ds`, `mb` or `skip`, as declared in `Layer`."""

    layer: Layer
    impl: str = "fast"
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        ly, impl = self.layer, self.impl
        conv = functools.partial(ConvBN, impl=impl, zero_init=self.zero_init)
        if ly.block == "skip":
            if ly.residual:
                return x
            return conv(ly.out_channels, "pwconv", 1, ly.stride, rank=ly.rank("shortcut"), name="shortcut")(x, train)
        if ly.block == "ds":
            x = conv(ly.in_channels, "dwconv", ly.kernel, ly.stride, ly.act, name="dw")(x, train)
            return conv(ly.out_channels, "pwconv", act=ly.act, rank=ly.rank("pw"), name="pw")(x, train)
        y = x
        if ly.expanded_channels != ly.in_channels:
            y = conv(ly.expanded_channels, "pwconv", act=ly.act, rank=ly.rank("expand"), name="expand")(y, train)
        y = conv(ly.expanded_channels, "dwconv", ly.kernel, ly.stride, ly.act, name="dw")(y, train)
        if ly.se:
            y = SqueezeExcite(ly.se_channels, "hsigmoid" if ly.act == "hswish" else "sigmoid", self.zero_init,
                              name="se")(y)
        y = conv(ly.out_channels, "pwconv", rank=ly.rank("project"), name="project")(y, train)
        return x + y if ly.residual else y


class Net(nn.Module):
    """The whole network. `__call__(x, train)` returns logits, or (logits, features) with `features=True`.

    With `zero_init`, every parameter is declared with a zeros initialiser: the same variables, for
    `jax.eval_shape(model.init)` without tracing a random draw per leaf (on the benchmark networks
    that trace took 0.12-0.25 s instead of 0.21-0.44 s).
    """

    arch: Architecture
    impl: str = "fast"
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool = False):
        a = self.arch
        conv = functools.partial(ConvBN, impl=self.impl, zero_init=self.zero_init)
        x = conv(a.stem.channels, "conv", a.stem.kernel, a.stem.stride, a.stem.act, name="stem")(x, train)
        for i, layer in enumerate(a.layers):
            x = Block(layer, self.impl, self.zero_init, name=f"layer{i}")(x, train)
        x = conv(a.head.channels, "pwconv", act=a.head.act, rank=a.head.rank("conv"), name="head")(x, train)
        feats = jnp.mean(x, axis=(1, 2))
        h = nn.Dropout(a.head.dropout, deterministic=not train)(feats) if a.head.dropout else feats
        init = _init(self.zero_init, nn.linear.default_kernel_init)
        if a.head.rank("classifier") is None:
            logits = nn.Dense(a.num_classes, kernel_init=init, name="classifier")(h)
        else:
            logits = FactorizedDense(a.num_classes, a.head.rank("classifier"), self.zero_init, name="classifier")(h)
        return (logits, feats) if features else logits


class FactorizedDense(nn.Module):
    """A Dense layer as `Down` (in -> rank, no bias) then {'kernel' (rank -> features), 'bias'}."""

    features: int
    rank: int
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = Down(self.rank, "dense", zero_init=self.zero_init, name="down")(x)
        kernel = self.param("kernel", _init(self.zero_init, nn.linear.default_kernel_init), (self.rank, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


def build_model(arch: Architecture, impl: str = "fast") -> Net:
    """The Flax module for `arch`; `impl` is 'fast' (default) or 'reference' (lax.conv everywhere)."""
    if impl not in IMPLS:
        raise SpaceError(f"unknown convolution implementation '{impl}'; allowed: {', '.join(IMPLS)}")
    return Net(arch, impl)


def input_shape(arch: Architecture, batch: int = 1) -> tuple[int, int, int, int]:
    return (batch, arch.resolution, arch.resolution, arch.in_channels)
