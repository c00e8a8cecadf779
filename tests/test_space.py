"""Search-space DSL and Architecture: round trips, sizes, sampling, Tune conversion."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from search_spaces.architecture import Architecture
from search_spaces.catalog import SPACES, load_space
from search_spaces.errors import SpaceError
from search_spaces.space import SearchSpace

ALL_SPACES = SPACES.names()

TINY = {
    "name": "tiny",
    "input": {"resolution": [8, 16], "channels": 1},
    "num_classes": 3,
    "stem": {"kernel": 3, "channels": 8, "stride": 1},
    "stages": [
        {"stride": 2, "channels": [8, 16], "depth": [1, 2],
         "ops": [{"block": "ds", "kernel": [3, 5]}, {"block": "skip"}]},
        {"stride": 2, "channels": 16, "layers": [{"ops": [{"block": "mb", "kernel": 3, "expansion": [1, 3]}]}]},
    ],
    "head": {"channels": [16, 32]},
}


def test_builtin_spaces_are_registered():
    assert {"macro_cifar", "mobile_small", "mnas_imagenet"} <= set(ALL_SPACES)
    assert SPACES.get("mobile_small").size() >= 10**5


def test_macro_cifar_is_the_nas_bench_macro_space():
    s = SPACES.get("macro_cifar")
    assert s.size() == 3**8 == len(list(s.keys()))
    a = s.decode("02012100")
    assert [l.block for l in a.layers] == ["skip", "mb", "skip", "mb", "mb", "mb", "skip", "skip"]
    assert (a.layers[1].kernel, a.layers[1].expansion) == (5, 6)
    assert (a.layers[3].kernel, a.layers[3].expansion) == (3, 3)
    assert [l.out_channels for l in a.layers] == [64, 64, 128, 128, 128, 256, 256, 256]
    assert [l.stride for l in a.layers] == [2, 1, 2, 1, 1, 2, 1, 1]
    assert a.head.channels == 1280 and a.num_classes == 10 and a.resolution == 32


def test_size_counts_distinct_assignments_exactly():
    s = SearchSpace.from_dict(TINY)
    # resolution 2 x stage0 (2 channels x (2 + 2*2... ops per depth)) x stage1 (2 ops) x head 2
    expected = 2 * (2 * (3 + 3 * 3)) * 2 * 2
    assert s.size() == expected == len(set(s.keys())) == len(list(s.enumerate()))


@pytest.mark.parametrize("name", ALL_SPACES)
def test_key_and_json_round_trips_are_exact(name):
    s = SPACES.get(name)
    rng = np.random.default_rng(1)
    for _ in range(50):
        a = s.sample(rng)
        assert s.decode(a.key) == a and s.encode(a) == a.key
        text = a.to_json()
        b = Architecture.from_json(text)
        assert b == a and hash(b) == hash(a) and b.to_json() == text


def test_inactive_layers_are_canonicalised():
    s = SearchSpace.from_dict(TINY)
    names = [d.name for d in s.decisions()]
    base = {n: 0 for n in names}
    a = s.from_choices({**base, "s0.l1.op": 2 % 3})  # depth index 0 -> one layer: l1 is inactive
    b = s.from_choices({**base, "s0.l1.op": 0})
    assert a == b and "-" in a.key
    with pytest.raises(SpaceError, match="must be '-'"):
        s.decode(a.key.replace("-", "0"))
    deep = s.from_choices({**base, "s0.depth": 1, "s0.l1.op": 1})
    assert "-" not in deep.key and len(deep.layers) == 3


@pytest.mark.parametrize("name", ALL_SPACES)
def test_tune_param_space_round_trip(name):
    s = SPACES.get(name)
    ps = s.to_param_space()
    assert list(ps) == [d.name for d in s.decisions()]
    rng = np.random.default_rng(2)
    for _ in range(20):
        cfg = {k: int(rng.choice(v)) for k, v in ps.items()}
        a = s.from_choices(cfg)
        assert s.from_choices(s.to_choices(a)) == a


def test_tune_param_space_uses_the_given_choice_factory():
    from ray import tune

    ps = SPACES.get("macro_cifar").to_param_space(tune.choice)
    assert len(ps) == 8 and all(v.categories == [0, 1, 2] for v in ps.values())


def test_sampling_is_deterministic_for_a_seed():
    s = SPACES.get("mobile_small")
    a = [s.sample(np.random.default_rng(7)).key for _ in range(3)]
    assert len(set(a)) == 1
    keys = {s.sample(np.random.default_rng(i)).key for i in range(30)}
    assert len(keys) > 25


def test_architectures_are_hashable_values():
    s = SPACES.get("macro_cifar")
    archs = {s.decode(k) for k in ["00000000", "22212202", "00000000"]}
    assert len(archs) == 2
    a = s.decode("00000000")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.layers = ()  # an Architecture is an immutable value
    assert a == s.decode("00000000") and a.key == "00000000"


def test_width_multiplier_and_resolution_choices():
    s = SPACES.get("mnas_imagenet")
    names = [d.name for d in s.decisions()]
    cfg = {n: 0 for n in names}
    small = s.from_choices(cfg)
    large = s.from_choices({**cfg, "width_mult": 1, "resolution": 1})
    assert small.resolution == 192 and large.resolution == 224
    assert small.stem.channels == 24 and large.stem.channels == 32  # 32 * 0.75 rounded to 8
    assert small.head.channels == large.head.channels == 1280


def test_with_input_adapts_the_space_to_a_dataset():
    s = SPACES.get("mobile_small").with_input(resolution=8)
    a = s.sample(np.random.default_rng(0))
    assert a.resolution == 8 and s.size() == SPACES.get("mobile_small").size()


def test_space_from_yaml_file(tmp_path):
    import yaml

    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    s = load_space(str(p))
    assert s.name == "tiny" and s.size() == SearchSpace.from_dict(TINY).size()
