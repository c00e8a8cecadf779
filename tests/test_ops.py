"""The fast convolution kernels equal lax.conv_general_dilated, in values and gradients.

Tolerance: max abs diff <= 1e-5 everywhere. Inputs are drawn so every compared quantity is
O(1) (x ~ N(0, 1), w ~ N(0, 1/k^2), cotangent ~ N(0, 1/(outputs per channel))): the two
forms sum the same products in a different order, so they differ by float32 rounding,
a few 1e-7 at this magnitude. Unscaled inputs would make the weight gradient a sum of
thousands of O(1) products, where float32 itself only resolves ~1e-4 in absolute terms.
The whole-model parameter gradients (train-mode BatchNorm, SE, every block) are such sums
whatever the scaling, so there the bound is relative: 1e-5 * max(1, max |reference|).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search_spaces.catalog import SPACES
from search_spaces.model import BN_EPS, BN_MOMENTUM, BatchNormTrain, build_model, input_shape
from search_spaces.ops import KERNELS, batch_norm_train, same_padding

TOL = 1e-5
DW = KERNELS["fast"]["dwconv"], KERNELS["reference"]["dwconv"]
PW = KERNELS["fast"]["pwconv"], KERNELS["reference"]["pwconv"]


def _space_kernels_strides() -> set[tuple[int, int]]:
    """Every (depthwise kernel, stride) any registered space can produce."""
    used = set()
    for name in SPACES.names():
        for stage in SPACES.get(name).stages:
            for li, ops in enumerate(stage.layer_ops):
                for op in ops:
                    if op.block in ("ds", "mb"):
                        used.add((op.kernel, stage.stride if li == 0 else 1))
    return used


CASES = sorted(_space_kernels_strides() | {(k, s) for k in (3, 5, 7) for s in (1, 2)})


def _grad_pair(fast, ref, x, w, g, stride):
    """Values and (dx, dw) of both forms, in one compiled function."""

    def both(x, w, g):
        out = []
        for fn in (fast, ref):
            y, vjp = jax.vjp(lambda a, b: fn(a, b, stride), x, w)
            out.append((y, *vjp(g)))
        return out

    return jax.jit(both)(x, w, g)


def _inputs(rng, n, size, cin, kernel, stride, cout):
    oh = same_padding(size, kernel, stride)[0]
    x = rng.standard_normal((n, size, size, cin), np.float32)
    wshape = (kernel, kernel, 1, cin) if cout is None else (kernel, kernel, cin, cout)
    w = rng.standard_normal(wshape, np.float32) / kernel
    g = rng.standard_normal((n, oh, oh, cin if cout is None else cout), np.float32) / np.sqrt(n * oh * oh)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _assert_close(fast, ref, what, scale=False):
    """max |fast - ref| <= TOL, times max(1, max |ref|) with `scale` (sums of many terms)."""
    diff = float(jnp.max(jnp.abs(fast - ref)))
    tol = TOL * max(1.0, float(jnp.max(jnp.abs(ref)))) if scale else TOL
    assert fast.shape == ref.shape, f"{what}: shape {fast.shape} != {ref.shape}"
    assert diff <= tol, f"{what}: max abs diff {diff:.2e} > {tol:.2e}"


def test_cases_cover_the_spaces():
    assert _space_kernels_strides() <= set(CASES)
    assert {3, 5, 7} <= {k for k, _ in CASES} and {1, 2} <= {s for _, s in CASES}


@pytest.mark.parametrize("kernel,stride", CASES)
def test_depthwise_matches_lax_conv(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    # 5: smaller than a 7x7 kernel; 8: even, where SAME pads stride 2 asymmetrically (at
    # stride 1 odd kernels pad symmetrically whatever the size parity)
    for size in (5, 8) if stride > 1 else (5,):
        x, w, g = _inputs(rng, 2, size, 6, kernel, stride, None)
        (yf, dxf, dwf), (yr, dxr, dwr) = _grad_pair(*DW, x, w, g, stride)
        where = f"k{kernel} s{stride} size{size}"
        _assert_close(yf, yr, f"depthwise value {where}")
        _assert_close(dxf, dxr, f"depthwise input grad {where}")
        _assert_close(dwf, dwr, f"depthwise weight grad {where}")


def test_depthwise_weight_grad_batch_chunks():
    """A batch big enough to be split into slices in the weight gradient gives the same sums."""
    rng = np.random.default_rng(0)
    x, w, g = _inputs(rng, 48, 14, 32, 3, 2, None)
    (yf, dxf, dwf), (yr, dxr, dwr) = _grad_pair(*DW, x, w, g, 2)
    _assert_close(dwf, dwr, "chunked weight grad")
    _assert_close(dxf, dxr, "input grad")


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_matches_lax_conv(stride):
    rng = np.random.default_rng(stride)
    for size in (7, 8):
        x, w, g = _inputs(rng, 2, size, 12, 1, stride, 20)
        w = w / np.sqrt(12)
        (yf, dxf, dwf), (yr, dxr, dwr) = _grad_pair(*PW, x, w, g, stride)
        _assert_close(yf, yr, f"pointwise value s{stride} size{size}")
        _assert_close(dxf, dxr, f"pointwise input grad s{stride} size{size}")
        _assert_close(dwf, dwr, f"pointwise weight grad s{stride} size{size}")


@functools.lru_cache(maxsize=1)
def _covering_arch():
    """The shortest of 500 mobile_small samples with ds, mb (with and without SE) and skip blocks
    (the shortest keeps the compile, most of this test's time, small)."""
    space = SPACES.get("mobile_small")
    rng = np.random.default_rng(0)
    best = None
    for _ in range(500):
        arch = space.sample(rng)
        blocks = {ly.block for ly in arch.layers}
        se = {bool(ly.se) for ly in arch.layers if ly.block == "mb"}
        if blocks == {"ds", "mb", "skip"} and se == {True, False}:
            if best is None or len(arch.layers) < len(best.layers):
                best = arch
    assert best is not None, "no covering architecture in 500 samples"
    return best


@pytest.mark.parametrize("shape", [(64, 7, 7, 24), (8, 1, 1, 40)])
def test_batch_norm_train_matches_flax(shape):
    """Training-mode BatchNorm: outputs, running statistics and gradients (x, scale, bias) equal
    nn.BatchNorm's with the same variables."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32) * 3 + 1)
    c = shape[-1]
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                            "bias": jnp.asarray(rng.standard_normal(c), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}
    g = jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(x.size / c))
    fast = BatchNormTrain(BN_MOMENTUM, BN_EPS)
    ref = nn.BatchNorm(use_running_average=False, momentum=BN_MOMENTUM, epsilon=BN_EPS)

    @jax.jit
    def run(params, x):
        out = {}
        for name, module in (("fast", fast), ("reference", ref)):
            y, pullback, stats = jax.vjp(
                lambda p, xx: module.apply({**variables, "params": p}, xx, mutable=["batch_stats"]),
                params, x, has_aux=True)
            out[name] = (y, stats["batch_stats"], pullback(g))
        return out

    out = run(variables["params"], x)
    (yf, sf, (pf, xf)), (yr, sr, (pr, xr)) = out["fast"], out["reference"]
    _assert_close(yf, yr, "y")
    for k in ("mean", "var"):
        _assert_close(sf[k], sr[k], f"running {k}")
    _assert_close(xf, xr, "dx")
    for k in ("scale", "bias"):
        _assert_close(pf[k], pr[k], f"d{k}", scale=True)
    # the sums are outputs too: their gradient is that of sum(x) and sum(x^2)
    u, v = jnp.asarray(rng.standard_normal((2, c), np.float32))

    def stats_loss(x, stats):
        total, total_sq = stats(x)
        return jnp.sum(total * u + total_sq * v)

    def flax_stats(x):
        return jnp.sum(x, axis=(0, 1, 2)), jnp.sum(x * x, axis=(0, 1, 2))

    got = jax.grad(stats_loss)(x, lambda x: batch_norm_train(x, variables["params"]["scale"],
                                                             variables["params"]["bias"], BN_EPS)[1:])
    _assert_close(got, jax.grad(stats_loss)(x, flax_stats), "d statistics / dx", scale=True)


def test_fast_and_reference_models_agree():
    """Same parameters -> same logits (eval and train mode) and same parameter gradients."""
    arch = _covering_arch()
    fast, ref = build_model(arch, "fast"), build_model(arch, "reference")
    # The net is fully convolutional: a 12x12 input runs every block (12 -> 6 -> 3 -> 2) at a
    # fraction of the reference form's compile and run time on 28x28.
    x = jax.random.normal(jax.random.key(1), (3, 12, 12, input_shape(arch)[-1]))
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(fast.init, jax.random.key(0), x))

    def loss(params, model):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(2)})  # the same dropout mask for both
        return jnp.sum(logits * jnp.arange(logits.shape[-1])) / logits.shape[0], logits

    @jax.jit
    def run(params):
        out = {}
        for name, model in (("fast", fast), ("reference", ref)):
            (_, train_logits), grads = jax.value_and_grad(loss, has_aux=True)(params, model)
            out[name] = (model.apply(variables, x), train_logits, grads)
        return out

    out = run(variables["params"])
    for i, what in enumerate(("eval logits", "train logits")):
        _assert_close(out["fast"][i], out["reference"][i], what)
    flat_f = jax.tree_util.tree_leaves_with_path(out["fast"][2])
    flat_r = jax.tree.leaves(out["reference"][2])
    for (path, gf), gr in zip(flat_f, flat_r):
        _assert_close(gf, gr, f"grad {jax.tree_util.keystr(path)}", scale=True)


def test_unknown_impl_is_rejected():
    from search_spaces.errors import SpaceError

    with pytest.raises(SpaceError, match="fast, reference"):
        build_model(_covering_arch(), "turbo")


def test_fast_blocks_are_the_default():
    assert build_model(_covering_arch()).impl == "fast"
    assert isinstance(build_model(_covering_arch()), nn.Module)


def test_zero_init_model_declares_the_same_variables_all_zero_params():
    """`Net.zero_init` (used to trace parameter shapes cheaply) changes values, never the tree."""
    from search_spaces.model import Net

    arch = _covering_arch()
    x = jnp.zeros((1, 12, 12, input_shape(arch)[-1]))
    declared = build_model(arch, "reference").init(jax.random.key(0), x)
    zeros = Net(arch, "reference", zero_init=True).init(jax.random.key(0), x)
    spec = lambda tree: [(jax.tree_util.keystr(p), v.shape, v.dtype) for p, v in jax.tree_util.tree_leaves_with_path(tree)]
    assert spec(zeros) == spec(declared)
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(zeros["params"]) if "kernel" in jax.tree_util.keystr(p)]
    assert len(kernels) > 10 and all(not np.any(np.asarray(k)) for k in kernels)
    assert any(np.any(np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(declared["params"])
               if "kernel" in jax.tree_util.keystr(p))
