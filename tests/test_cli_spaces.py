"""`nas spaces / space show / cost`, and the one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from nas.cli import main

GOOD = {
    "name": "good",
    "input": {"resolution": 8, "channels": 1},
    "num_classes": 10,
    "stem": {"kernel": 3, "channels": 8, "stride": 1},
    "stages": [{"stride": 2, "channels": [8, 16], "depth": [1, 2], "ops": [{"block": "ds"}, {"block": "skip"}]}],
    "head": {"channels": 16},
}


def _write(tmp_path, doc, name="space.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return str(p)


def test_spaces_lists_sizes(capsys):
    assert main(["spaces", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["macro_cifar"]["size"] == 6561


def test_space_show_json(capsys):
    assert main(["space", "show", "macro_cifar", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["decisions"]) == 8 and info["decisions"][0]["options"][0] == "skip"


def test_cost_json_has_totals_and_layers(capsys):
    assert main(["cost", "--space", "macro_cifar", "--arch", "02012100", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert (c["params"], c["macs"]) == (890666, 47327744)
    assert {"activation_bytes", "weight_bytes", "layers"} <= set(c)
    assert sum(l["params"] for l in c["layers"]) == c["params"]
    assert {"host", "rpi4", "pixel4", "jetson_nano", "a100"} <= set(c["latency_ms"])
    assert all(v > 0 for v in c["latency_ms"].values())


def _mutate(path, value):
    doc = json.loads(json.dumps(GOOD))
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


BAD = [
    ("unknown block", _mutate(["stages", 0, "ops"], [{"block": "conv"}]), "stages[0].ops[0].block", "allowed: ds, mb, skip"),
    ("zero channels", _mutate(["stages", 0, "channels"], [8, 0]), "stages[0].channels", "positive integers"),
    ("negative channels", _mutate(["stem", "channels"], -8), "stem.channels", "positive integers"),
    ("bad stride", _mutate(["stages", 0, "stride"], 3), "stages[0].stride", "allowed 1 or 2"),
    ("resolution too small", _mutate(["input", "resolution"], 1), "input.resolution", "too small"),
    ("empty choice", _mutate(["stages", 0, "depth"], []), "stages[0].depth", "empty choice list"),
    ("unknown key", _mutate(["stages", 0, "widht"], 2), "stages[0].widht", "unknown key"),
    ("unknown top key", _mutate(["heads"], {}), "heads", "unknown key"),
    ("bad kernel", _mutate(["stages", 0, "ops"], [{"block": "ds", "kernel": 4}]), "stages[0].ops[0].kernel", "odd kernel"),
    ("bad activation", _mutate(["stages", 0, "ops"], [{"block": "ds", "act": "gelu"}]), "stages[0].ops[0].act", "relu"),
]


@pytest.mark.parametrize("label,doc,key,allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_space_declaration_is_a_one_line_error(tmp_path, capsys, label, doc, key, allowed):
    path = _write(tmp_path, doc)
    assert main(["space", "show", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and path in err and key in err and allowed in err


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    assert main(["space", "show", _write(tmp_path, "name: [unclosed\n")]) == 2
    assert "invalid YAML at line" in capsys.readouterr().err
    assert main(["space", "show", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.parametrize("key,msg", [
    ("0201210", "expected 8 characters"),
    ("0201210x", "position 7 (s2.l2.op) is 'x', allowed '0'..'2'"),
    ("02012103", "position 7 (s2.l2.op) is '3'"),
    ("0201210-", "is '-' but the layer is active"),
])
def test_malformed_arch_key(capsys, key, msg):
    assert main(["cost", "--space", "macro_cifar", "--arch", key]) == 2
    assert msg in capsys.readouterr().err


def test_unknown_space_lists_the_allowed_names(capsys):
    assert main(["cost", "--space", "nope", "--arch", "0"]) == 2
    assert "allowed: macro_cifar, mnas_imagenet, mobile_small" in capsys.readouterr().err


def test_cli_error_exits_2_without_traceback(tmp_path):
    path = _write(tmp_path, _mutate(["stages", 0, "stride"], 3))
    r = subprocess.run([sys.executable, "-m", "nas.cli", "space", "show", path], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def _stage(per_layer: int, depths, widths: int = 1) -> int:
    """Networks of one stage counted by hand: a width, a depth, then one op per active layer."""
    return widths * sum(per_layer ** d for d in depths)


def test_spaces_reports_the_sizes_the_readme_states_counted_by_hand(capsys):
    assert main(["spaces", "--json"]) == 0
    size = {r["name"]: r["size"] for r in json.loads(capsys.readouterr().out)}
    assert size["macro_cifar"] == 3 ** 8 == 6_561  # 8 layers of {skip, mb e3 k3, mb e6 k5}
    # mobile_small: ds (2 kernels) | mb (2 kernels x 2 expansions) in stage 1; + mb with 3 kernels and SE
    # choice (12) and skip in stages 2-3; two head widths
    ds, mb2, mb3se = 2, 2 * 2, 3 * 2 * 2
    mobile = _stage(ds + mb2, [1, 2], 2) * _stage(ds + mb3se + 1, [1, 2, 3], 3) * _stage(ds + mb3se + 1, [1, 2, 3], 2) * 2
    assert size["mobile_small"] == mobile == 13_172_770_800
    # mnas_imagenet: 2 resolutions x 2 width multipliers; stages 2-6 of mb (+SE in 3, 5, 6; 3 kernels in 6) | skip
    mnas = (2 * 2 * _stage(2 * 2 + 1, [2, 3, 4]) * _stage(2 * 2 * 2 + 1, [2, 3, 4]) * _stage(2 * 2 + 1, [2, 3, 4])
            * _stage(2 * 2 * 2 + 1, [2, 3]) * _stage(3 * 2 * 2 + 1, [2, 3, 4]))
    assert size["mnas_imagenet"] == mnas and f"{mnas:.1e}" == "4.4e+17"


def test_a_small_space_size_is_the_number_of_distinct_networks_enumerated(tmp_path):
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_dict(GOOD)  # 2 widths x (2 + 2^2) op sequences (ds | skip, depth 1 or 2)
    keys = list(space.keys())
    assert space.size() == len(set(keys)) == 2 * (2 + 2 ** 2)
    assert len({space.decode(k).to_json() for k in keys}) == len(keys)  # every key a different network
