"""The accuracy predictor: encoding, fitting and ranking a real per-architecture quantity, persistence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from evaluators.cost import analytic_cost
from evaluators.predictor import Encoding, PredictorConfig, fit_predictor, load_predictor
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError
from search_spaces.space import INACTIVE

SMALL = PredictorConfig(hidden=(64, 64), members=2, steps=1000, learning_rate=3e-3, seed=0)


def _sample(space, n, seed):
    rng = np.random.default_rng(seed)
    keys = []
    while len(keys) < n:
        k = space.sample(rng).key
        if k not in keys:
            keys.append(k)
    return keys


def test_encoding_is_one_hot_per_active_decision_and_zero_for_inactive_layers():
    space = SPACES.get("mobile_small")
    enc = Encoding.of(space)
    keys = _sample(space, 50, 0)
    x = enc.encode(keys)
    assert x.shape == (50, enc.width) and enc.width > sum(len(d.options) for d in space.decisions())
    for key, row in zip(keys, x):
        widths = [len(t[0]) for t in enc.tables]
        blocks = np.split(row, np.cumsum(widths)[:-1])
        for c, size, block in zip(key, enc.sizes, blocks):
            onehot = block[:size]  # each decision's block starts with the one-hot of its option
            assert onehot.sum() == (0 if c == INACTIVE else 1)
            if c == INACTIVE:
                assert not block.any()


def test_encoding_rejects_a_key_of_another_space_in_one_line():
    enc = Encoding.of(SPACES.get("mobile_small"))
    with pytest.raises(NasError, match="has 4 characters, expected"):
        enc.encode(["0120"])
    bad = "z" * len(enc.sizes)
    with pytest.raises(NasError, match="position 0"):
        enc.encode([bad])


def test_predictor_ranks_held_out_candidates_of_a_per_architecture_quantity():
    # A real quantity of each architecture (its log multiply-accumulates, from the cost model),
    # learned from 400 candidates and ranked on 200 others.
    space = SPACES.get("mobile_small")
    keys = _sample(space, 600, 1)
    target = np.array([np.log(analytic_cost(space.decode(k)).macs) for k in keys])
    pred = fit_predictor(space, keys[:400], target[:400], SMALL)
    ev = pred.evaluate(keys[400:], target[400:])
    assert ev["n"] == 200
    assert ev["kendall_tau"] >= 0.8
    assert ev["rmse"] < target[400:].std()  # better than predicting the mean


def test_pairs_target_ranks_held_out_candidates_and_predicts_on_the_accuracy_scale():
    # The order of every pair of the 400 (RankNet loss), on the same real quantity; the free scale
    # of the network's output is mapped onto the training values, so predictions read as the target.
    space = SPACES.get("mobile_small")
    keys = _sample(space, 600, 1)
    target = np.array([np.log(analytic_cost(space.decode(k)).macs) for k in keys])
    pred = fit_predictor(space, keys[:400], target[:400], dataclasses.replace(SMALL, target="pairs"))
    ev = pred.evaluate(keys[400:], target[400:])
    assert ev["kendall_tau"] >= 0.8
    assert ev["rmse"] < target[400:].std()
    train = pred.predict(keys[:400])  # the training predictions land on the training values' quantiles
    assert np.isclose(train.min(), target[:400].min()) and np.isclose(train.max(), target[:400].max())


def test_pairs_target_compares_a_random_subset_of_rows_per_step_when_there_are_many(monkeypatch):
    import evaluators.predictor as predictor

    monkeypatch.setattr(predictor, "PAIR_ROWS", 64)  # 200 measurements: each step compares 64 of them
    fits = []
    fit = predictor._fit
    monkeypatch.setattr(predictor, "_fit", lambda *a, **k: fits.append(k) or fit(*a, **k))
    space = SPACES.get("mobile_small")
    keys = _sample(space, 300, 5)
    target = np.array([np.log(analytic_cost(space.decode(k)).macs) for k in keys])
    pred = fit_predictor(space, keys[:200], target[:200], dataclasses.replace(SMALL, target="pairs"))
    assert [(k["loss"], k["pair_rows"]) for k in fits] == [("pairs", 64)]
    assert pred.evaluate(keys[200:], target[200:])["kendall_tau"] >= 0.7


def test_saved_predictor_loads_with_the_same_predictions_and_refuses_another_space(tmp_path):
    space = SPACES.get("mobile_small")
    keys = _sample(space, 40, 2)
    pred = fit_predictor(space, keys, np.linspace(0.5, 0.9, 40), PredictorConfig(hidden=(16,), members=2, steps=20))
    path = pred.save(tmp_path / "p.msgpack")
    again = load_predictor(path, space)
    np.testing.assert_allclose(again.predict(keys), pred.predict(keys), rtol=1e-6)
    with pytest.raises(NasError, match="trained on space 'mobile_small'"):
        load_predictor(path, SPACES.get("macro_cifar"))
    with pytest.raises(NasError, match="no predictor file"):
        load_predictor(tmp_path / "missing.msgpack")


def test_fit_refuses_too_few_or_mismatched_measurements():
    space = SPACES.get("mobile_small")
    keys = _sample(space, 3, 3)
    with pytest.raises(NasError, match="at least 2"):
        fit_predictor(space, keys[:1], [0.5])
    with pytest.raises(NasError, match="3 keys but 2 accuracies"):
        fit_predictor(space, keys, [0.5, 0.6])
    with pytest.raises(NasError, match="predictor.members"):
        PredictorConfig(members=0)


def test_rank_target_maps_back_to_accuracy_monotonically_beyond_the_measured_range():
    from evaluators.predictor import _from_quantiles, _normal_scores

    y = np.array([0.1, 0.9, 0.95, 0.95, 0.97, 0.98])  # one broken candidate, one tie
    z = _normal_scores(y)
    assert z[2] == z[3] and np.all(np.diff(z[np.argsort(y, kind="stable")]) >= 0)
    zq, first = np.unique(z, return_index=True)
    yq = y[first]
    np.testing.assert_allclose(_from_quantiles(zq, zq, yq), yq)  # the training pairs map to themselves
    grid = np.linspace(zq[0] - 3, zq[-1] + 3, 101)
    assert np.all(np.diff(_from_quantiles(grid, zq, yq)) > 0)  # no ties past the best or the worst


def test_rank_and_standard_predictors_save_and_load_and_an_old_file_reads_as_standard(tmp_path):
    import json

    from flax import serialization

    space = SPACES.get("mobile_small")
    keys = _sample(space, 40, 4)
    acc = np.r_[np.linspace(0.9, 0.98, 38), 0.1, 0.12]
    cfg = PredictorConfig(hidden=(16,), members=2, steps=20)
    for target in ("rank", "standard", "pairs"):
        pred = fit_predictor(space, keys, acc, dataclasses.replace(cfg, target=target))
        again = load_predictor(pred.save(tmp_path / f"{target}.msgpack"), space)
        assert again.cfg.target == target and (again.quantiles is None) == (target == "standard")
        np.testing.assert_allclose(again.predict(keys), pred.predict(keys), rtol=1e-6)
    # a file written before `target` existed: its meta has neither the key nor quantiles
    doc = serialization.msgpack_restore((tmp_path / "standard.msgpack").read_bytes())
    meta = json.loads(doc["meta"])
    del meta["config"]["target"], meta["quantiles"]
    old = tmp_path / "old.msgpack"
    old.write_bytes(serialization.msgpack_serialize({"meta": json.dumps(meta), "params": doc["params"]}))
    legacy = load_predictor(old, space)
    assert legacy.cfg.target == "standard"
    np.testing.assert_allclose(legacy.predict(keys), load_predictor(tmp_path / "standard.msgpack").predict(keys))
    with pytest.raises(NasError, match="predictor.target: 'ranks'; allowed rank, standard, pairs"):
        PredictorConfig(target="ranks")
