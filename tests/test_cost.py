"""Exact analytic cost: NAS-Bench-Macro agreement, Flax parameter trees, forward shapes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.cost import analytic_cost
from search_spaces.architecture import Architecture, Head, Layer, Stem
from search_spaces.catalog import SPACES
from search_spaces.model import build_model, input_shape


def test_params_and_macs_agree_with_nas_bench_macro_for_all_keys(macro_table_path):
    table = json.loads(macro_table_path.read_text())
    space = SPACES.get("macro_cifar")
    assert len(table) == 6561
    mismatches = []
    for key, row in table.items():
        c = analytic_cost(space.decode(key))
        if (c.params, c.macs) != (row["params"], row["flops"]):
            mismatches.append((key, c.params, row["params"], c.macs, row["flops"]))
    assert mismatches == []


def _flax_param_count(arch):
    model = build_model(arch)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape(arch, 2))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", SPACES.names())
def test_flax_parameter_tree_size_equals_analytic_params(name):
    space = SPACES.get(name)
    rng = np.random.default_rng(3)
    for _ in range(8):
        arch = space.sample(rng)
        assert _flax_param_count(arch) == analytic_cost(arch).params, arch.key


def test_hand_computed_inverted_bottleneck_with_se():
    # 8x8x16 input, mb e=6 k=5 SE 0.25, 24 out, stride 2, no residual.
    layer = Layer("mb", 16, 24, 2, 5, 6, 0.25, "relu")
    arch = Architecture("hand", "", 8, 16, 10, Stem(1, 16, 1, "relu"), (layer,), Head(32, "relu", 0.0))
    c = analytic_cost(arch).layers[1]
    exp, se = 96, 4
    params = (16 * exp + 2 * exp) + (25 * exp + 2 * exp) + (exp * se + se + se * exp + exp) + (exp * 24 + 2 * 24)
    macs = 16 * exp * 64 + 25 * exp * 16 + (exp * se + se * exp) + exp * 24 * 16
    assert (c.params, c.macs, c.output_shape) == (params, macs, (4, 4, 24))
    # peak activations of this layer: the stride-2 depthwise conv's input (8*8*96) + output (4*4*96), fp32
    assert c.activation_bytes == (8 * 8 * exp + 4 * 4 * exp) * 4


def test_residual_only_when_stride_one_and_same_channels():
    assert Layer("mb", 16, 16, 1, 3, 3).residual
    assert not Layer("mb", 16, 16, 2, 3, 3).residual
    assert not Layer("mb", 16, 24, 1, 3, 3).residual
    assert not Layer("ds", 16, 16, 1, 3).residual
    assert Layer("skip", 16, 16, 1).residual


def test_int8_weight_bytes_are_smaller_than_fp32():
    arch = SPACES.get("macro_cifar").decode("22212202")
    wb = analytic_cost(arch).weight_bytes
    assert wb["fp32"] == 4 * analytic_cost(arch).params
    assert 3.5 < wb["fp32"] / wb["int8"] < 4.0


@pytest.mark.parametrize("name", ["macro_cifar", "mobile_small"])
def test_forward_pass_gives_logits_of_the_right_shape(name):
    space = SPACES.get(name)
    arch = space.sample(np.random.default_rng(4))
    model = build_model(arch)
    x = jax.random.normal(jax.random.key(0), input_shape(arch, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False, features=True))(variables, x)
    assert logits.shape == (3, arch.num_classes) and feats.shape == (3, arch.head.channels)
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                    rngs={"dropout": jax.random.key(2)}))(variables, x)
    assert out.shape == (3, arch.num_classes) and bool(jnp.all(jnp.isfinite(out)))
    assert "batch_stats" in updates


def test_imagenet_space_output_shape():
    arch = SPACES.get("mnas_imagenet").sample(np.random.default_rng(5))
    model = build_model(arch)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros(input_shape(arch, 2)))[0])
    assert out.shape == (2, 1000)


def test_fast_and_reference_blocks_give_the_same_logits():
    arch = SPACES.get("mobile_small").sample(np.random.default_rng(6))
    x = jax.random.normal(jax.random.key(0), input_shape(arch, 4))
    fast, ref = build_model(arch, "fast"), build_model(arch, "reference")
    variables = jax.jit(fast.init)(jax.random.key(1), x)

    def run(model):
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(2)})[0])(variables, x)

    a, b = run(fast), run(ref)
    assert float(jnp.max(jnp.abs(a - b))) < 1e-4
