"""Training: configs, determinism, callbacks, accuracy, divergence, distillation, persistence, inference.

One small architecture and one config are shared by most tests, so the compiled programs are
reused (compilation dominates the runtime on a small CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.datasets import epoch_indices, load_dataset
from evaluators.optim import OPTIMIZERS, SCHEDULES, KDConfig, TrainConfig
from evaluators.packing import Packing
from evaluators.predict import evaluate, predict_logits
from evaluators.step import make_loss, train_epoch
from evaluators.train import TrainingDiverged, train
from evaluators.variables import TrainState, initialize, load_variables, save_variables
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError
from search_spaces.model import build_model

KEY = "002-002--002--0"  # mobile_small at 8x8: one mb_k3_e3 layer per stage, 16/24/48 channels
CFG = TrainConfig(epochs=3, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def arch():
    return SPACES.get("mobile_small").with_input(resolution=8).decode(KEY)


@pytest.fixture(scope="module")
def run(arch, digits):
    calls = []
    result = train(arch, digits, CFG, on_epoch=lambda epoch, metrics: calls.append((epoch, metrics)))
    return result, calls


def _leaves(variables):
    return jax.tree_util.tree_leaves_with_path(variables)


def _identical(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(pa == pb and np.array_equal(np.asarray(x), np.asarray(y))
                                      for (pa, x), (pb, y) in zip(la, lb))


# ------------------------------------------------------------------ configs
def test_train_config_from_dict_validates_at_the_edge():
    cfg = TrainConfig.from_dict({"epochs": 5, "learning_rate": "3e-3", "optimizer": "sgd"})
    assert (cfg.epochs, cfg.learning_rate, cfg.optimizer) == (5, 3e-3, "sgd")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(NasError, match=r"run.yaml: train\.epoch: unknown key; allowed: epochs, batch_size"):
        TrainConfig.from_dict({"epoch": 3}, source="run.yaml: train")
    for bad, match in [({"epochs": 0}, r"train\.epochs"), ({"learning_rate": 0}, r"train\.learning_rate"),
                       ({"learning_rate": "fast"}, "not a number"), ({"epochs": True}, r"train\.epochs"),
                       ({"optimizer": "lion"}, "allowed one of adam, adamw, rmsprop, sgd"),
                       ({"schedule": "step"}, "allowed one of constant, cosine, warmup_cosine"),
                       ({"warmup_epochs": 1}, "needs schedule 'warmup_cosine'"),
                       ({"warmup_epochs": 3, "schedule": "warmup_cosine"}, "below epochs"),
                       ({"label_smoothing": 1.0}, "label_smoothing"), ({"conv_impl": "gpu"}, "conv_impl")]:
        with pytest.raises(NasError, match=match):
            TrainConfig.from_dict(bad)
    with pytest.raises(NasError, match=r"train\.batch_size"):
        TrainConfig(batch_size=0)


def test_kd_config_is_validated():
    assert KDConfig.from_dict({"temperature": 2}).temperature == 2
    with pytest.raises(NasError, match=r"kd\.alpha"):
        KDConfig(alpha=2.0)
    with pytest.raises(NasError, match=r"kd\.temperature"):
        KDConfig.from_dict({"temperature": 0})
    with pytest.raises(NasError, match=r"kd\.tau: unknown key"):
        KDConfig.from_dict({"tau": 1})


# ------------------------------------------------------------------ initialisation
def test_initialize_is_deterministic_and_matches_the_model_tree(arch):
    a, b, c = initialize(arch, seed=0), initialize(arch, seed=0), initialize(arch, seed=1)
    assert _identical(a, b) and not _identical(a, c)
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda x: build_model(arch).init(jax.random.PRNGKey(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
    spec = [(p, s.shape, s.dtype) for p, s in _leaves(dict(shapes))]
    assert [(p, x.shape, x.dtype) for p, x in _leaves(a)] == spec
    stem = a["params"]["stem"]["kernel"]  # He normal on fan-out: std sqrt(2 / (3*3*16))
    assert abs(stem.std() - np.sqrt(2 / 144)) < 0.03


def test_packing_round_trips_every_parameter_exactly(arch):
    params = initialize(arch, seed=0)["params"]
    packing = Packing.of(params)
    packed = packing.pack(params)
    kernels = [x for _, x in _leaves(params) if x.ndim > 1]
    others = [x for _, x in _leaves(params) if x.ndim <= 1]
    assert packing.sizes == (sum(x.size for x in kernels), sum(x.size for x in others))
    assert _identical(packing.unpack(packed), params)  # NumPy
    traced = jax.jit(packing.unpack)(packed)  # inside a compiled step
    assert _identical(jax.device_get(traced), params)


def test_packing_inside_a_step_matches_packing_on_the_host(arch):
    """`pack_traced` (gradients in a step) lays leaves out as `pack` does; `by_name` puts every
    running mean before every running variance, each in path order."""
    variables = initialize(arch, seed=0)
    packing = Packing.of(variables["params"])
    for g, v in jax.jit(packing.pack_traced)(variables["params"]).items():
        assert np.array_equal(np.asarray(v), packing.pack(variables["params"])[g])
    stats = Packing.of(variables["batch_stats"], by_name=True)
    half = len(stats.leaves) // 2
    assert [path[-1] for path, *_ in stats.leaves] == ["mean"] * half + ["var"] * half
    layers = [path[:-1] for path, *_ in stats.leaves]
    assert layers[:half] == layers[half:] == sorted(layers[:half])
    assert _identical(stats.unpack(stats.pack(variables["batch_stats"])), variables["batch_stats"])


def test_epoch_folds_batch_moments_into_running_statistics_as_per_step_updates_would(arch, digits):
    """The compiled epoch updates BatchNorm's running averages once, from every step's moments;
    parameters, losses and running statistics equal those of one `train_step` after another."""
    model = build_model(arch)
    tx = OPTIMIZERS.get(CFG.optimizer)(SCHEDULES.get(CFG.schedule)(CFG, 8), CFG)
    variables = initialize(arch, seed=0)
    packing = Packing.of(variables["params"])
    stats = Packing.of(variables["batch_stats"], by_name=True)
    data = {"x": jnp.asarray(digits.x_train), "y": jnp.asarray(digits.y_train)}
    idx = jnp.asarray(epoch_indices(len(digits.y_train), CFG.batch_size, np.random.default_rng(0))[:8])
    out = {}
    for name, packed_stats in (("per step", None), ("folded", stats)):
        state = TrainState.create(apply_fn=model.apply, params=packing.pack(variables["params"]), tx=tx,
                                  batch_stats=variables["batch_stats"] if packed_stats is None else
                                  stats.pack(variables["batch_stats"]), key=jax.random.PRNGKey(0))
        epoch = jax.jit(functools.partial(train_epoch, loss_fn=make_loss(CFG), packing=packing, stats=packed_stats))
        state, losses = epoch(state, data, idx, {})
        running = state.batch_stats if packed_stats is None else stats.unpack(jax.device_get(state.batch_stats))
        out[name] = (np.asarray(losses), jax.device_get(state.params), jax.device_get(running))
    (la, pa, ra), (lb, pb, rb) = out["per step"], out["folded"]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for g in pa:
        np.testing.assert_allclose(pb[g], pa[g], rtol=1e-4, atol=1e-6)
    assert jax.tree.structure(rb) == jax.tree.structure(ra)
    for (path, b), (_, a) in zip(_leaves(rb), _leaves(ra)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=str(path))
    assert not _identical(ra, variables["batch_stats"])  # the statistics did move


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_weight_decay_reaches_kernels_only(arch, name):
    """With zero gradients every optimizer's update is the decay alone: nonzero on the packed
    kernels, exactly zero on biases and BatchNorm parameters."""
    params = initialize(arch, seed=0)["params"]
    packed = Packing.of(params).pack(params)
    cfg = dataclasses.replace(CFG, optimizer=name, weight_decay=0.1)
    tx = OPTIMIZERS.get(name)(SCHEDULES.get(cfg.schedule)(cfg, 10), cfg)
    updates, _ = tx.update({g: np.zeros_like(v) for g, v in packed.items()}, tx.init(packed), packed)
    assert np.all(np.asarray(updates["others"]) == 0)
    assert np.all(np.sign(np.asarray(updates["kernels"])) == -np.sign(packed["kernels"]))
    tree_updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)  # unpacked
    for (path, u), (_, p) in zip(_leaves(tree_updates), _leaves(params)):
        assert np.all(np.sign(np.asarray(u)) == (-np.sign(p) if p.ndim > 1 else 0)), path


# ------------------------------------------------------------------ training
def test_training_learns_digits_and_reports_every_epoch(run):
    result, calls = run
    assert [epoch for epoch, _ in calls] == [1, 2, 3]
    for _, metrics in calls:
        assert set(metrics) == {"train_loss", "val_loss", "val_accuracy", "epoch_s"}
        assert all(np.isfinite(v) for v in metrics.values())
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.val_accuracy > 0.8, result.history
    assert result.val_accuracy == calls[-1][1]["val_accuracy"] and result.val_loss == calls[-1][1]["val_loss"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.compile_s > 0 and result.train_s > 0 and result.init_s > 0
    assert result.steps == 3 * (1257 // 32)
    assert set(result.variables) == {"params", "batch_stats"}


def test_same_seed_is_bitwise_identical_and_another_seed_differs(run, arch, digits):
    result, _ = run
    again = train(arch, digits, CFG)
    assert _identical(result.variables, again.variables)
    assert again.history[-1]["val_loss"] == result.history[-1]["val_loss"]
    assert again.compile_s == 0.0  # same architecture and config: compiled programs are reused
    other = train(arch, digits, dataclasses.replace(CFG, seed=1))
    assert not _identical(result.variables, other.variables)


def test_nan_loss_raises_training_diverged(arch, digits):
    poisoned = dataclasses.replace(digits, x_train=np.full_like(digits.x_train, np.nan))
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1") as e:
        train(arch, poisoned, CFG)
    assert isinstance(e.value, NasError) and (e.value.epoch, e.value.step) == (1, 1)


def test_fine_tuning_starts_from_given_variables(run, arch, digits):
    result, _ = run
    tuned = train(arch, digits, CFG, init_variables=result.variables)
    assert tuned.history[0]["val_accuracy"] > 0.8  # already good after its first epoch
    bad = {"params": {"stem": {}}, "batch_stats": {}}
    with pytest.raises(NasError, match="init_variables: missing"):
        train(arch, digits, CFG, init_variables=bad)


def test_mismatched_inputs_are_user_errors(arch, digits):
    wrong = SPACES.get("mobile_small").decode(KEY)  # 28x28 inputs
    with pytest.raises(NasError, match="expects 28x28x1 inputs"):
        train(wrong, digits, CFG)
    with pytest.raises(NasError, match="teacher_logits: shape"):
        train(arch, digits, CFG, teacher_logits=np.zeros((10, 10)))
    with pytest.raises(NasError, match="needs teacher_logits"):
        train(arch, digits, CFG, kd=KDConfig())
    with pytest.raises(NasError, match="batch_size"):
        train(arch, digits, dataclasses.replace(CFG, batch_size=5000))


def test_distillation_plugs_kd_loss_into_the_same_step(run, arch, digits):
    result, _ = run
    teacher = predict_logits(arch, result.variables, digits.x_train, batch_size=16)
    # alpha = 0: the KD loss is exactly cross-entropy, so training matches the plain run
    kd0 = train(arch, digits, CFG, teacher_logits=teacher, kd=KDConfig(temperature=4.0, alpha=0.0))
    assert kd0.compile_s > 0
    for (_, a), (_, b) in zip(_leaves(result.variables), _leaves(kd0.variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # alpha = 1 from the teacher's own weights: teacher rows must line up with the shuffled batches
    aligned = train(arch, digits, CFG, teacher_logits=teacher, kd=KDConfig(temperature=2.0, alpha=1.0),
                    init_variables=result.variables)
    shuffled = train(arch, digits, CFG, teacher_logits=teacher[::-1].copy(), kd=KDConfig(temperature=2.0, alpha=1.0),
                     init_variables=result.variables)
    assert aligned.compile_s == 0.0 and shuffled.compile_s == 0.0  # KD settings are data, not constants
    assert aligned.history[0]["train_loss"] < 0.2 * shuffled.history[0]["train_loss"]
    assert aligned.val_accuracy > 0.8


# ------------------------------------------------------------------ inference and persistence
def test_predict_logits_pads_without_changing_results(run, arch, digits):
    result, _ = run
    x = digits.x_val[:37]
    got = predict_logits(arch, result.variables, x, batch_size=16)  # 16 + 16 + 5 padded to 16
    assert got.shape == (37, 10)
    want = np.asarray(jax.jit(build_model(arch).apply, static_argnames="train")(result.variables, x, train=False))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    one = predict_logits(arch, result.variables, x[:3], batch_size=16)  # padded to a batch of 4
    np.testing.assert_allclose(one, want[:3], rtol=1e-5, atol=1e-5)
    acc, loss = evaluate(arch, result.variables, digits.x_val, digits.y_val, batch_size=16)
    assert acc == pytest.approx(result.val_accuracy, abs=1e-6)
    assert loss == pytest.approx(result.val_loss, rel=1e-4)


def test_save_and_load_variables_round_trip_exactly(run, tmp_path):
    result, _ = run
    path = tmp_path / "sub" / "weights.msgpack"
    save_variables(path, result.variables)
    loaded = load_variables(path)
    assert _identical(result.variables, loaded)
    assert all(np.asarray(x).dtype == np.float32 for _, x in _leaves(loaded))
    assert [p.name for p in path.parent.iterdir()] == ["weights.msgpack"]  # no temporary file left
    with pytest.raises(NasError, match="not found"):
        load_variables(tmp_path / "nope.msgpack")
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1\xc1junk")
    with pytest.raises(NasError, match="not a Flax msgpack"):
        load_variables(tmp_path / "junk.msgpack")


def test_training_resumed_from_a_mid_run_checkpoint_equals_an_uninterrupted_run():
    """What a retried Tune trial does after losing its node: continue from the last epoch's state."""
    from search_spaces.catalog import SPACES

    arch = SPACES.get("mobile_small").with_input(resolution=8).decode("100-100--100--1")
    data = load_dataset("digits", seed=0)
    cfg = TrainConfig(epochs=3, batch_size=64, seed=3)
    blobs: dict[int, bytes] = {}
    full = train(arch, data, cfg, checkpoint=lambda e, b: blobs.__setitem__(e, b))
    assert sorted(blobs) == [1, 2, 3]
    seen: list[int] = []
    resumed = train(arch, data, cfg, resume_from=blobs[1], on_epoch=lambda e, m: seen.append(e))
    assert seen == [2, 3]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(jax.tree.leaves(full.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(a, b)
