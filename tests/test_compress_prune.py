"""Structured pruning: the pruned network is the original with channels removed, exactly.

A hand-built network covers every prunable width: a ds block, an mb block with expansion, SE and
a residual add, an identity skip on the same residual chain, a stride-2 mb, an mb without
expansion on a residual chain (its dw runs on the stage channels), a skip with a 1x1 shortcut,
and the head.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from evaluators.cost import analytic_cost
from evaluators.prune import (
    Target, agp_fractions, channel_groups, importance, prune, pruned_architecture, pruned_key, select,
    slice_variables, taylor_grads, tensor_groups,
)
from evaluators.predict import predict_logits
from evaluators.variables import initialize, variable_shapes
from search_spaces.architecture import Architecture, Head, Layer, Stem
from search_spaces.errors import NasError

ARCH = Architecture(
    space="mobile_small", key="hand", resolution=8, in_channels=1, num_classes=10,
    stem=Stem(3, 16, 1, "relu"),
    layers=(
        Layer("ds", 16, 24, 2, kernel=3, act="relu"),
        Layer("mb", 24, 24, 1, kernel=3, expansion=3, se=0.25, act="relu"),
        Layer("skip", 24, 24, 1),
        Layer("mb", 24, 32, 2, kernel=5, expansion=6, act="hswish"),
        Layer("mb", 32, 32, 1, kernel=3, expansion=1, se=0.25, act="hswish"),
        Layer("skip", 32, 48, 1),
    ),
    head=Head(64, "hswish", 0.1),
)


def random_variables(arch, seed=0):
    """Initialised weights with random BatchNorm scale/bias/statistics, so no channel is special."""
    rng = np.random.default_rng(seed)
    v = jax.tree.map(np.asarray, initialize(arch, seed=seed))

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        if name.endswith(("['mean']", "['bias']")):
            return rng.normal(0, 0.2, x.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return x

    return jax.tree_util.tree_map_with_path(fill, v)


def n_values(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def variables():
    return random_variables(ARCH)


def test_groups_tie_the_channels_of_residual_chains():
    tg = tensor_groups(ARCH)
    # stem | ds out, mb(residual), identity skip | mb s2 out, mb e1 (residual) | shortcut out
    assert tg == ["stage0", "stage1", "stage1", "stage1", "stage4", "stage4", "stage6"]
    groups = channel_groups(ARCH)
    assert {g: groups[g].width for g in groups} == {
        "stage0": 16, "stage1": 24, "stage4": 32, "stage6": 48, "layer1.expand": 72, "layer1.se": 6,
        "layer3.expand": 144, "layer4.se": 8, "head": 64}
    assert [p for p, _ in groups["stage0"].producers] == [("stem",), ("layer0", "dw")]  # ds: dw on the input
    assert [p for p, _ in groups["stage1"].producers] == [("layer0", "pw"), ("layer1", "project")]
    assert [p for p, _ in groups["stage4"].producers] == [("layer3", "project"), ("layer4", "dw"), ("layer4", "project")]


@pytest.mark.parametrize("target", ["macs=0.5", "params=0.4", "latency_ms@rpi4"])
def test_pruned_weights_fit_the_new_architecture_and_its_analytic_cost(variables, target):
    if target.startswith("latency"):  # 85% of the predicted latency (mostly per-kernel overhead at 8x8)
        from evaluators.latency import predict_latency_ms

        target += f"={0.85 * predict_latency_ms(ARCH, 'rpi4')}"
    t = Target.parse(target)
    pruned, v, keep = prune(ARCH, variables, t.absolute(ARCH), t.cost_fn(), "l1")
    assert t.cost_fn()(pruned) <= t.absolute(ARCH)
    assert jax.tree.map(np.shape, v) == jax.tree.map(np.shape, variable_shapes(pruned))
    assert n_values(v["params"]) == analytic_cost(pruned).params  # every trainable value, nothing more
    assert analytic_cost(pruned).macs < analytic_cost(ARCH).macs
    for before, after in zip(ARCH.layers, pruned.layers):
        assert after.residual == before.residual and after.block == before.block
        assert (after.expanded_channels == after.in_channels) == (before.expanded_channels == before.in_channels)
    assert Architecture.from_json(pruned.to_json()) == pruned


def zeroed(arch, variables, drop):
    """`variables` with the channels `drop[group]` zeroed in every producer (kernel, BN scale and bias)."""
    v = jax.tree.map(np.array, variables)
    for name, g in channel_groups(arch).items():
        idx = drop.get(name, [])
        for path, kind in g.producers:
            mod = v["params"]
            for p in path:
                mod = mod[p]
            mod["kernel"][..., idx] = 0
            if kind == "dense":
                mod["bias"][idx] = 0
            else:
                mod["bn"]["scale"][idx] = 0
                mod["bn"]["bias"][idx] = 0
    return v


DROP = {"stage0": [0, 5], "stage1": [1, 2, 23], "stage4": [3], "stage6": [0, 47], "layer1.expand": [0, 10, 71],
        "layer1.se": [2], "layer3.expand": list(range(0, 144, 3)), "layer4.se": [7], "head": [4, 5, 6]}


def test_removing_zeroed_channels_gives_the_zeroed_network_exactly(variables):
    """The oracle: a network whose dropped channels are zero computes what the pruned one computes."""
    v0 = zeroed(ARCH, variables, DROP)
    groups = channel_groups(ARCH)
    keep = {n: np.setdiff1d(np.arange(g.width), DROP[n]) for n, g in groups.items()}
    small = pruned_architecture(ARCH, {n: len(k) for n, k in keep.items()})
    vs = slice_variables(ARCH, v0, keep)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
    ref = predict_logits(ARCH, v0, x)
    got = predict_logits(small, vs, x)
    assert not np.allclose(ref, predict_logits(ARCH, variables, x), atol=1e-3)  # the zeroing mattered
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "bn", "taylor"])
def test_every_criterion_scores_zeroed_channels_zero_and_prunes_exactly_them(variables, criterion):
    v0 = zeroed(ARCH, variables, DROP)
    grads = None
    if criterion == "taylor":
        rng = np.random.default_rng(2)
        grads = taylor_grads(ARCH, v0, rng.normal(size=(64, 8, 8, 1)).astype(np.float32),
                             rng.integers(0, 10, 64), batch_size=32)
    scores = importance(ARCH, v0, criterion, grads)
    for name, idx in DROP.items():
        assert np.all(scores[name][idx] == 0), name
        assert np.any(scores[name] > 0), name
    if criterion == "taylor":  # a live channel can score 0 too (a ReLU dead on these inputs): rank only
        return
    for name, idx in DROP.items():
        assert np.all(scores[name][np.setdiff1d(np.arange(len(scores[name])), idx)] > 0), name
    macs = lambda a: float(analytic_cost(a).macs)
    expect = pruned_architecture(ARCH, {n: channel_groups(ARCH)[n].width - len(d) for n, d in DROP.items()})
    keep, arch = select(ARCH, scores, macs, macs(expect))
    assert arch == expect
    for name, idx in DROP.items():
        assert not set(idx) & set(keep[name].tolist())


def test_residual_tied_channels_are_removed_from_every_tensor_of_the_chain(variables):
    pruned, v, keep = prune(ARCH, variables, 0.5 * analytic_cost(ARCH).macs,
                            lambda a: float(analytic_cost(a).macs), "bn")
    k = keep["stage1"]
    assert len(k) == pruned.layers[0].out_channels == pruned.layers[1].out_channels == pruned.layers[2].out_channels
    np.testing.assert_array_equal(v["params"]["layer0"]["pw"]["bn"]["scale"],
                                  variables["params"]["layer0"]["pw"]["bn"]["scale"][k])
    np.testing.assert_array_equal(v["params"]["layer1"]["project"]["bn"]["scale"],
                                  variables["params"]["layer1"]["project"]["bn"]["scale"][k])
    np.testing.assert_array_equal(v["params"]["layer3"]["expand"]["kernel"],
                                  variables["params"]["layer3"]["expand"]["kernel"][:, :, k][..., keep["layer3.expand"]])


def test_a_target_below_one_channel_per_group_is_refused(variables):
    with pytest.raises(NasError, match="below the smallest reachable"):
        prune(ARCH, variables, 10.0, lambda a: float(analytic_cost(a).macs))


@pytest.mark.parametrize("text, message", [
    ("macs=1.5", "allowed a fraction"), ("flops=0.5", "unknown target 'flops'"), ("macs", "allowed macs=F"),
    ("latency_ms@nowhere=1", "unknown profile 'nowhere'"), ("latency_ms=1", "unknown target"),
    ("params=-1", "allowed macs=F"),
])
def test_bad_targets_name_what_is_allowed(text, message):
    with pytest.raises(NasError, match=message):
        Target.parse(text)


def test_unknown_criterion_is_refused(variables):
    with pytest.raises(NasError, match="allowed: l1, bn, taylor"):
        importance(ARCH, variables, "random")


def test_agp_schedule_cuts_most_first_and_ends_at_the_target():
    f = agp_fractions(0.5, 4)
    assert f[-1] == pytest.approx(0.5)
    cuts = -np.diff([1.0, *f])
    assert np.all(np.diff(cuts) < 0)
    assert pruned_key("0-1-2~p0.70", 0.5) == "0-1-2~p0.50"
