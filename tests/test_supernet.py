"""The supernet (ground floor): a candidate's supernet output equals its stand-alone network's.

For sampled candidates of every built-in space and a custom space with width-multiplier and
resolution choices, `Supernet(space)` applied to `candidate(space, arch)` computes what
`build_model(arch)` computes with `extract(space, arch, variables)`: logits in evaluation mode
(with random, non-trivial BatchNorm statistics, so a wrong slice shows) and, on mobile_small and the
custom space (every block form and choice), loss and gradients in training mode. One compiled program
serves every candidate; channel permutations leave the largest candidate unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search_spaces.catalog import SPACES
from search_spaces.errors import SpaceError
from search_spaces.model import build_model
from search_spaces.space import SearchSpace
from search_spaces.supernet import (
    Supernet, candidate, channel_groups, channel_importance, extract, extreme, initialize, layout,
    permute_channels, stack_candidates,
)

TOL = 1e-5

CUSTOM = SearchSpace.from_dict({
    "name": "custom_elastic",
    "input": {"resolution": [8, 12], "channels": 3},
    "num_classes": 5,
    "width_mult": [0.5, 1.0],
    "stem": {"kernel": 3, "channels": 16, "stride": 1, "act": "relu6"},
    "stages": [
        {"stride": 1, "channels": [16, 24], "depth": [1, 2],  # stride 1: identity shortcuts across stages
         "ops": [{"block": "mb", "kernel": [3, 5], "expansion": [1, 3], "act": ["relu", "hswish"]}, {"block": "skip"}]},
        {"stride": 2, "channels": [24, 32], "depth": [1, 2, 3],
         "ops": [{"block": "ds", "kernel": [3, 5, 7]}, {"block": "mb", "kernel": 3, "expansion": [2, 4], "se": [0, 0.5]},
                 {"block": "skip"}]},
    ],
    "head": {"channels": [32, 64], "act": "hswish", "dropout": 0.0},
}, source="<test>")


def _space(name: str) -> SearchSpace:
    if name == "custom":
        return CUSTOM
    small = {"mobile_small": 8, "macro_cifar": 8, "mnas_imagenet": 32}[name]
    return SPACES.get(name).with_input(resolution=small)


def _no_dropout(space: SearchSpace) -> SearchSpace:
    """`space` without dropout (training-mode programs draw dropout masks of other shapes): equal spaces
    share `_programs`' compiled programs."""
    return SearchSpace(**{**space.__dict__, "dropout": 0.0})


def _variables(space: SearchSpace, seed: int = 0) -> dict:
    """Fresh supernet variables with random BatchNorm statistics and affine parameters."""
    v = initialize(space, seed)
    rng = np.random.default_rng(seed + 1)

    def perturb(path, a):
        name = path[-1].key
        if name in ("mean", "bias"):
            return rng.normal(0, 0.5, a.shape).astype(np.float32)
        if name in ("var", "scale"):
            return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
        return a

    return jax.tree_util.tree_map_with_path(perturb, v)


@functools.lru_cache(maxsize=8)
def _programs(space: SearchSpace):
    net = Supernet(space)
    evaluate = jax.jit(lambda v, x, c: net.apply(v, x, c, train=False))

    def loss(params, stats, x, y, c):
        logits = net.apply({"params": params, "batch_stats": stats}, x, c, train=True)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    return evaluate, jax.jit(jax.value_and_grad(loss))


@functools.partial(jax.jit, static_argnames="arch")
def _standalone_eval(v, x, arch):
    return build_model(arch).apply(v, x, train=False)


@functools.partial(jax.jit, static_argnames="arch")
def _standalone_grad(v, x, y, arch):
    def loss(params):
        logits, _ = build_model(arch).apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                            mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    return jax.value_and_grad(loss)(v["params"])


def _archs(space: SearchSpace, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    archs = [extreme(space, largest=True), extreme(space, largest=False)]
    archs += [space.sample(rng) for _ in range(n)]
    return archs


def _inputs(space: SearchSpace, arch, batch: int = 4):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(batch, arch.resolution, arch.resolution, space.in_channels)).astype(np.float32)
    return x, rng.integers(0, space.num_classes, batch).astype(np.int32)


def _check_eval(space: SearchSpace, archs) -> None:
    v = _variables(space)
    evaluate, _ = _programs(space)
    for arch in archs:
        x, _ = _inputs(space, arch)
        got = np.asarray(evaluate(v, x, candidate(space, arch)))
        want = np.asarray(_standalone_eval(extract(space, arch, v), x, arch))
        assert np.abs(want).max() > 1e-2, "outputs too small to tell anything apart"
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL, err_msg=f"{space.name} {arch.key}")


def _check_train(space: SearchSpace, archs) -> None:
    v = _variables(space)
    _, grad = _programs(space)
    for arch in archs:
        x, y = _inputs(space, arch)
        loss, g = grad(v["params"], v["batch_stats"], x, y, candidate(space, arch))
        sub = extract(space, arch, v)
        want_loss, want_g = _standalone_grad(sub, x, y, arch)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=TOL, atol=TOL, err_msg=arch.key)
        got_g = extract(space, arch, {"params": g, "batch_stats": v["batch_stats"]})["params"]
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got_g),
                                     jax.tree_util.tree_leaves_with_path(want_g)):
            # float32 sums over masked and sliced tensors add up in other orders, and training-mode BatchNorm
            # over a batch of 4 on 1x1 maps amplifies that through a deep net: compare relative norms (a
            # wrong slice or mask is off by O(1))
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b) + 1e-5, \
                f"{arch.key} {jax.tree_util.keystr(path)}: |got - want| = {np.linalg.norm(a - b):.3g}, |want| = " \
                f"{np.linalg.norm(b):.3g}"


# ------------------------------------------------------------------ equivalence, every space
@pytest.mark.parametrize("name", ["mobile_small", "macro_cifar", "custom"])
def test_supernet_output_equals_standalone_network_in_eval_mode(name):
    space = _space(name)
    _check_eval(space, _archs(space, 4))


@pytest.mark.parametrize("name", ["custom", pytest.param("mobile_small", marks=pytest.mark.slow)])
def test_supernet_train_loss_and_gradients_equal_standalone_network(name):
    space = _space(name)
    if name == "custom":
        space = space.with_input(resolution=8)  # one resolution: each one compiles its own programs
    space = _no_dropout(space)
    archs = _archs(space, 1, seed=1)
    # custom (every block form, kernel, expansion, SE, width and resolution choice) checks the largest, the
    # smallest and a sampled candidate; mobile_small its largest, where every weight has a gradient
    _check_train(space, archs if name == "custom" else archs[:1])


@pytest.mark.slow
def test_mnas_imagenet_supernet_equals_standalone_network_in_eval_mode():
    # its largest and smallest candidates; the training program's equivalence is checked on custom (every
    # block form and choice) and mobile_small above: mnas_imagenet's deep one costs 30 s to compile
    space = _space("mnas_imagenet")
    _check_eval(space, _archs(space, 0))


def test_custom_space_resolutions_each_compile_once():
    space = CUSTOM
    evaluate, _ = _programs(space)
    v = _variables(space)
    before = evaluate._cache_size()
    rng = np.random.default_rng(3)
    for _ in range(6):
        arch = space.sample(rng)
        evaluate(v, _inputs(space, arch)[0], candidate(space, arch))
    res = {a for a in space.resolutions}
    assert evaluate._cache_size() - before <= len(res)


def test_one_compiled_program_serves_many_candidates():
    space = _no_dropout(_space("mobile_small"))
    evaluate, grad = _programs(space)  # the equivalence tests' programs (compiled there when run before)
    v = _variables(space)
    x, y = _inputs(space, extreme(space, True))
    rng = np.random.default_rng(11)
    archs = {space.sample(rng) for _ in range(25)}
    for arch in archs:
        c = candidate(space, arch)
        evaluate(v, x, c)
        grad(v["params"], v["batch_stats"], x, y, c)
    assert len(archs) == 25
    assert evaluate._cache_size() == 1 and grad._cache_size() == 1


def test_stacked_candidates_scan_like_single_ones():
    space = _space("mobile_small")
    net = Supernet(space)
    v = _variables(space)
    archs = _archs(space, 2)
    x, _ = _inputs(space, archs[0])
    stacked = stack_candidates([candidate(space, a) for a in archs])
    out = jax.jit(lambda v, x, cs: jax.lax.map(lambda c: net.apply(v, x, c), cs))(v, x, stacked)
    evaluate, _ = _programs(space)
    for i, a in enumerate(archs):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(evaluate(v, x, candidate(space, a))), atol=TOL)


# ------------------------------------------------------------------ channel order
def test_channel_permutation_leaves_largest_candidate_unchanged_and_reorders_narrow_ones():
    space = _space("mobile_small")
    v = _variables(space)
    rng = np.random.default_rng(5)
    perms = [rng.permutation(g.size) for g in channel_groups(space)]
    moved = {"params": permute_channels(space, v["params"], perms),
             "batch_stats": permute_channels(space, v["batch_stats"], perms, "batch_stats")}
    evaluate, _ = _programs(space)
    big, small = extreme(space, True), extreme(space, False)
    x, _ = _inputs(space, big)
    np.testing.assert_allclose(np.asarray(evaluate(moved, x, candidate(space, big))),
                               np.asarray(evaluate(v, x, candidate(space, big))), atol=TOL, rtol=TOL)
    assert not np.allclose(np.asarray(evaluate(moved, x, candidate(space, small))),
                           np.asarray(evaluate(v, x, candidate(space, small))), atol=1e-3)


def test_channel_importance_puts_the_heaviest_channels_first():
    space = _space("mobile_small")
    v = initialize(space, 0)
    stage0 = next(g for g in channel_groups(space) if g.name.startswith("stage0"))
    # make the last stage-0 channel the heaviest everywhere it appears
    params = jax.tree.map(np.copy, v["params"])
    for path, axis in stage0.kernels:
        node = params
        for k in path[:-1]:
            node = node[k]
        idx = [slice(None)] * node[path[-1]].ndim
        idx[axis] = -1
        node[path[-1]][tuple(idx)] = 10.0
    perms = channel_importance(space, params)
    i = [g.name for g in channel_groups(space)].index(stage0.name)
    assert perms[i][0] == stage0.size - 1
    sorted_params = permute_channels(space, params, perms)
    assert np.all(sorted_params["s0_l0_ds_pw"]["kernel"][..., 0] == 10.0)


# ------------------------------------------------------------------ candidates as arrays
def test_candidate_of_another_space_is_a_one_line_error():
    other = _space("macro_cifar").sample(np.random.default_rng(0))
    with pytest.raises(SpaceError, match="not of the supernet's space 'mobile_small'") as e:
        candidate(_space("mobile_small"), other)
    assert "\n" not in str(e.value)


def test_candidate_is_arrays_with_masks_and_branches():
    space = _space("mobile_small")
    arch = space.decode("002-002--002--0")
    c = candidate(space, arch)
    assert c["stem"].sum() == 16 and [m.sum() for m in c["stages"]] == [16, 24, 48]
    slot = layout(space).slots[0]
    assert slot.branches[int(c["s0_l0"]["branch"])] == ("mb", "relu")
    assert c["s0_l0"]["exp"].sum() == 48 and c["s0_l0"]["mb_k"].sum() == 9
    assert slot.branches and layout(space).slots[1].branches[int(c["s0_l1"]["branch"])] == ("off", "")
    assert all(isinstance(a, np.ndarray) or np.isscalar(a) for a in jax.tree.leaves(c))
