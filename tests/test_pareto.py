import json

import numpy as np
import pytest

from nas.pareto import hypervolume, pareto_front, write_pareto
from search_spaces.errors import NasError

AL = [("accuracy", "max"), ("latency", "min")]


def test_front_of_hand_made_points():
    pts = [
        {"accuracy": 90, "latency": 5},  # 0 front
        {"accuracy": 92, "latency": 8},  # 1 front
        {"accuracy": 89, "latency": 6},  # 2 dominated by 0
        {"accuracy": 92, "latency": 9},  # 3 dominated by 1
        {"accuracy": 85, "latency": 1},  # 4 front
        {"accuracy": 90, "latency": 5},  # 5 equal to 0: kept
        {"accuracy": 95},                # 6 lacks latency: never on the front
    ]
    assert pareto_front(pts, AL) == [0, 1, 4, 5]


def test_front_three_objectives_and_arrays():
    pts = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 1], [2, 2, 0]])
    objs = [("a", "max"), ("b", "max"), ("c", "min")]
    assert pareto_front(pts, objs) == [3]
    assert pareto_front(np.array([[3.0, 2.0], [1.0, 1.0]]), AL) == [0, 1]


def test_hypervolume_exact_values():
    # maximise accuracy, minimise latency; reference (80, 10)
    pts = [{"accuracy": 90, "latency": 5}, {"accuracy": 92, "latency": 8}, {"accuracy": 85, "latency": 1}]
    # union of [80,90]x[5,10], [80,92]x[8,10], [80,85]x[1,10] = 50 + 4 + 20 = 74
    assert hypervolume(pts, (80, 10), AL) == pytest.approx(74.0)
    # a dominated point and a point outside the reference box change nothing
    more = pts + [{"accuracy": 84, "latency": 9}, {"accuracy": 99, "latency": 11}]
    assert hypervolume(more, (80, 10), AL) == pytest.approx(74.0)
    assert hypervolume([[2, 1], [1, 0]], (0, 2), [("a", "max"), ("c", "min")]) == pytest.approx(3.0)
    assert hypervolume([], (0, 0), AL) == 0.0
    assert hypervolume([[1, 1]], (0, 2), [("a", "min"), ("b", "min")]) == 0.0  # 1 is not below 0


def test_bad_objectives():
    with pytest.raises(NasError, match="allowed"):
        pareto_front([{"accuracy": 1}], [("accuracy", "up")])
    with pytest.raises(NasError, match="2 objectives"):
        hypervolume([[1, 2, 3]], (0, 0, 0), [("a", "max"), ("b", "min"), ("c", "min")])


def test_write_pareto(tmp_path):
    results = [
        {"accuracy": 90.0, "params": 100, "flops": 50, "trial_id": "a"},
        {"accuracy": 92.0, "params": 300, "flops": 40, "trial_id": "b"},
        {"accuracy": 91.0, "params": 400, "flops": 60, "trial_id": "c"},
        {"accuracy": None, "params": 10, "flops": 10, "trial_id": "failed"},
    ]
    path = write_pareto(results, tmp_path / "exp")
    data = json.loads(path.read_text())
    assert path.name == "pareto.json"
    assert set(data["fronts"]) == {"params", "flops"}
    assert data["fronts"]["params"]["indices"] == [0, 1]
    assert data["fronts"]["flops"]["indices"] == [1]
    # reference (lowest accuracy 90, highest params 400): only b improves on it in both
    assert data["fronts"]["params"]["hypervolume"] == pytest.approx((92 - 90) * (400 - 300))
