"""Quantization-aware training: folding is exact, fake quantization is int8, the export is what was trained."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.qat import (
    export_variables, fake_quant_act, fake_quant_weight, fold, forward, observe_ranges, qat_predict, qat_train,
)
from evaluators.predict import predict_logits
from test_compress_prune import ARCH, random_variables


@pytest.fixture(scope="module")
def variables():
    return random_variables(ARCH, seed=3)


def test_folded_network_computes_the_original(variables):
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
    got = np.asarray(forward(ARCH, jax.tree.map(jnp.asarray, fold(ARCH, variables)), jnp.asarray(x), None))
    np.testing.assert_allclose(got, predict_logits(ARCH, variables, x), atol=1e-4, rtol=1e-4)


def test_weight_fake_quant_is_per_channel_symmetric_int8_with_identity_gradient():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float32))
    q = np.asarray(fake_quant_weight(w))
    s = np.abs(np.asarray(w)).max(axis=(0, 1, 2)) / 127
    steps = q / s
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(steps).max() <= 127 + 1e-3 and np.abs(q - np.asarray(w)).max() <= s.max() / 2 + 1e-7
    g = jax.grad(lambda t: jnp.sum(fake_quant_weight(t) * 3.0))(w)
    np.testing.assert_allclose(np.asarray(g), 3.0)  # straight-through


def test_activation_fake_quant_has_256_levels_including_zero():
    x = jnp.linspace(-1.0, 3.0, 10001)
    q = np.asarray(fake_quant_act(x, jnp.float32(-1.0), jnp.float32(3.0)))
    assert len(np.unique(q)) <= 256 and 0.0 in q
    assert np.abs(q - np.asarray(x)).max() <= 4 / 255 / 2 + 1e-6


def test_exported_variables_hold_the_trained_weights_on_their_int8_grid(variables):
    folded = fold(ARCH, variables)
    v = export_variables(ARCH, folded)
    x = np.random.default_rng(2).normal(size=(8, 8, 8, 1)).astype(np.float32)
    quantized = jax.tree.map(np.asarray, jax.tree_util.tree_map_with_path(
        lambda p, a: fake_quant_weight(jnp.asarray(a)) if jax.tree_util.keystr(p).endswith("['kernel']") else a,
        folded))
    ref = np.asarray(forward(ARCH, jax.tree.map(jnp.asarray, quantized), jnp.asarray(x), None))
    np.testing.assert_allclose(predict_logits(ARCH, v, x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_qat_trains_and_onnx_runtime_int8_agrees_with_the_fake_quantized_network(tmp_path):
    """On digits: the int8 QDQ model ONNX Runtime runs predicts what QAT's fake-quantized network predicts."""
    import onnx

    from evaluators.datasets import load_dataset
    from evaluators.onnx_export import ort_session, run, to_onnx
    from evaluators.quantize import quantize_static_int8
    from evaluators.optim import TrainConfig
    from evaluators.predict import evaluate
    from evaluators.train import train
    from search_spaces.catalog import load_space

    data = load_dataset("digits", seed=0)
    arch = load_space("mobile_small").with_input(resolution=8).decode("100-100--100--1")
    res = train(arch, data, TrainConfig(epochs=3, learning_rate=0.005))
    fp32 = evaluate(arch, res.variables, data.x_test, data.y_test)[0]
    folded, ranges, hist = qat_train(arch, res.variables, data, epochs=1, batch_size=64)
    assert len(hist) == 1 and np.isfinite(hist[0]["train_loss"])
    fake = qat_predict(arch, folded, ranges, data.x_test)
    src, dst = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    onnx.save(to_onnx(arch, export_variables(arch, folded)), str(src))
    quantize_static_int8(src, dst, data.x_train[:256], method="minmax")
    int8 = run(ort_session(str(dst)), data.x_test)
    agree = float(np.mean(int8.argmax(-1) == fake.argmax(-1)))
    # ONNX Runtime also quantizes a tensor QAT does not (a hard-swish conv's output, before the
    # activation it runs in float) and calibrates the ranges again, so a few of the 270 borderline
    # images flip: 0.948 on an AMD EPYC on 2026-12-07 (>= 0.95 on the Intel machine before); a 10%
    # bound is far above that noise
    assert agree >= 0.90, agree
    assert float(np.mean(int8.argmax(-1) == data.y_test)) >= fp32 - 0.05
