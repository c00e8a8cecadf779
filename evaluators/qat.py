"""Quantization-aware training: int8 fake quantization with BatchNorm folded, and its QDQ ONNX export.

ONNX Runtime runs an int8 model with every BatchNorm folded into the convolution before it
(`quant_pre_process`), per-output-channel symmetric int8 weights of the *folded* kernel, and
per-tensor uint8 activations. QAT trains exactly that network:

* BatchNorm is folded with its running statistics frozen (`fold`): kernel' = kernel * g / sqrt(var + eps),
  bias' = beta - mean * g / sqrt(var + eps); the folded kernel and bias are what is trained.
* Every weight (conv kernels, dense kernels) is fake-quantized per output channel, symmetric,
  scale = max|w| / 127 (`fake_quant_weight`; / 64 with `weight_range='reduced'`, the 7-bit weights
  ONNX Runtime computes exactly on x86-64 CPUs without VNNI: `evaluators.quantize`); every
  activation that ONNX Runtime quantizes (the input, each conv output after its activation, and
  before it where ONNX Runtime runs the activation in float (hard-swish), the SE block's pool,
  dense outputs, gate and product, each residual sum, the pooled features) is fake-quantized per
  tensor to uint8 over a range observed on calibration images (`fake_quant_act`, ranges from
  `observe_ranges`). Rounding passes gradients straight through
  (straight-through estimator, Bengio et al. 2013).
* A low-rank factorized layer (`evaluators.lowrank`) runs as ONNX Runtime runs it: its bare first
  half is a conv (or matmul) of its own with int8 weights and a quantized output; the BatchNorm
  folds into the second half.
* `export_variables` writes the trained network back as Flax variables of the same architecture
  with identity BatchNorm (scale 1, mean 0, var 1 - eps) and kernels already on their int8 grid,
  so ONNX Runtime's folding is exact, its max-abs per-channel weight scales are the ones trained
  with, and the int8 weights are the trained values. `range_hints` carries the activation ranges
  trained with into `quantize_static_int8`, so ONNX Runtime quantizes each tensor over the range QAT
  trained it for, instead of calibrating it again on the trained weights.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evaluators.losses import cross_entropy, distillation
from evaluators.quantize import WEIGHT_MAX, RangeHints, value_signature, weight_max
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import ACT_FNS, BN_EPS
from search_spaces.ops import KERNELS

W_MAX = WEIGHT_MAX["full"]
FUSED_ACTS = ("relu", "relu6")  # ONNX Runtime folds these into the quantized op's output range
A_LEVELS = 255.0
Ranges = dict[str, tuple[float, float]]


# ============================================================ fake quantization
def fake_quant_weight(w: jnp.ndarray, w_max: float = W_MAX) -> jnp.ndarray:
    """Per-output-channel (last axis) symmetric int8 fake quantization to [-w_max, w_max] steps,
    straight-through gradient."""
    s = jnp.maximum(jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / w_max, 1e-12)
    q = jnp.clip(jnp.round(w / s), -w_max, w_max) * s
    return w + jax.lax.stop_gradient(q - w)


def fake_quant_act(x: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
    """Per-tensor uint8 fake quantization over [lo, hi] (widened to include 0, as ONNX Runtime does),
    straight-through gradient inside the range."""
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    s = jnp.maximum((hi - lo) / A_LEVELS, 1e-12)
    zp = jnp.round(-lo / s)
    q = (jnp.clip(jnp.round(x / s) + zp, 0, A_LEVELS) - zp) * s
    return x + jax.lax.stop_gradient(q - x)


# ============================================================ folded network
def fold(arch: Architecture, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The params tree with every ConvBN replaced by {'kernel', 'bias'} of the folded convolution
    (evaluation-mode BatchNorm folded in); Dense layers unchanged."""
    def walk(p: Mapping[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in p.items():
            if isinstance(v, Mapping) and "bn" in v:
                bn, st = v["bn"], s[k]["bn"]
                g = np.asarray(bn["scale"]) / np.sqrt(np.asarray(st["var"]) + BN_EPS)
                out[k] = {"kernel": np.asarray(v["kernel"]) * g,
                          "bias": np.asarray(bn["bias"]) - np.asarray(st["mean"]) * g}
                if "down" in v:  # a low-rank factorized conv: BatchNorm folds into its second half
                    out[k]["down"] = {"kernel": np.asarray(v["down"]["kernel"])}
            elif isinstance(v, Mapping) and "kernel" in v:
                out[k] = jax.tree.map(np.asarray, dict(v))
            else:
                out[k] = walk(v, s.get(k, {}))
        return out

    return walk(variables["params"], variables.get("batch_stats", {}))


def forward(arch: Architecture, folded: Mapping[str, Any], x: jnp.ndarray, ranges: Mapping[str, Any] | None,
            observe: dict[str, list] | None = None, capture: dict[str, jnp.ndarray] | None = None,
            w_max: float = W_MAX) -> jnp.ndarray:
    """Logits of the folded network. With `ranges`, weights (to [-w_max, w_max] steps) and
    activations are fake-quantized;
    with `observe` (a dict), each quantization point's (min, max) on this batch is appended to it;
    with `capture` (a dict), each point's float tensor is stored in it."""
    quant = ranges is not None

    def q_act(name: str, t: jnp.ndarray) -> jnp.ndarray:
        if observe is not None:
            observe.setdefault(name, []).append((jnp.min(t), jnp.max(t)))
        if capture is not None:
            capture[name] = t
        return fake_quant_act(t, *ranges[name]) if quant else t

    def w(t: jnp.ndarray) -> jnp.ndarray:
        return fake_quant_weight(t, w_max) if quant else t

    def conv(name: str, mod, t, kind, stride, act):
        if "down" in mod:  # low-rank factorized: a bare 1x1 conv whose output ONNX Runtime quantizes too
            t = q_act(f"{name}.down", KERNELS["fast"]["pwconv"](t, w(mod["down"]["kernel"]), stride))
            stride = 1
        y = KERNELS["fast"][kind](t, w(mod["kernel"]), stride) + mod["bias"]
        if act and act not in FUSED_ACTS:  # ONNX Runtime quantizes the conv's output, then runs act in float
            y = q_act(f"{name}.pre", y)
        return q_act(name, ACT_FNS[act](y) if act else y)

    def dense(mod, t, name=""):
        if "down" in mod:
            t = q_act(f"{name}.down", t @ w(mod["down"]["kernel"]))
        return t @ w(mod["kernel"]) + mod["bias"]

    a = arch
    h = q_act("input", x)
    h = conv("stem", folded["stem"], h, "conv", a.stem.stride, a.stem.act)
    for i, ly in enumerate(a.layers):
        m, n = folded.get(f"layer{i}", {}), f"layer{i}"
        if ly.block == "skip":
            if not ly.residual:
                h = conv(f"{n}.shortcut", m["shortcut"], h, "pwconv", ly.stride, "")
            continue
        if ly.block == "ds":
            y = conv(f"{n}.dw", m["dw"], h, "dwconv", ly.stride, ly.act)
            h = conv(f"{n}.pw", m["pw"], y, "pwconv", 1, ly.act)
            continue
        y = h
        if ly.expanded_channels != ly.in_channels:
            y = conv(f"{n}.expand", m["expand"], y, "pwconv", 1, ly.act)
        y = conv(f"{n}.dw", m["dw"], y, "dwconv", ly.stride, ly.act)
        if ly.se:
            s = q_act(f"{n}.se.pool", jnp.mean(y, axis=(1, 2)))
            s = q_act(f"{n}.se.reduce", jax.nn.relu(dense(m["se"]["reduce"], s)))
            g = q_act(f"{n}.se.expand", dense(m["se"]["expand"], s))
            gate = q_act(f"{n}.se.gate", ACT_FNS["hsigmoid" if ly.act == "hswish" else "sigmoid"](g))
            y = q_act(f"{n}.se.mul", y * gate[:, None, None, :])
        y = conv(f"{n}.project", m["project"], y, "pwconv", 1, "")
        h = q_act(f"{n}.add", h + y) if ly.residual else y
    h = conv("head", folded["head"], h, "pwconv", 1, a.head.act)
    feats = q_act("pool", jnp.mean(h, axis=(1, 2)))
    return dense(folded["classifier"], feats, "classifier")


def observe_ranges(arch: Architecture, folded: Mapping[str, Any], x: np.ndarray, batch_size: int = 128) -> Ranges:
    """(min, max) of every quantization point over the rows of `x` (float network)."""
    @jax.jit
    def stats(f, xb):
        obs: dict[str, list] = {}
        forward(arch, f, xb, None, obs)
        return {k: v[0] for k, v in obs.items()}

    f = jax.tree.map(jnp.asarray, folded)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for i in range(0, len(x), batch_size):
        for k, (a, b) in stats(f, jnp.asarray(x[i:i + batch_size])).items():
            lo[k], hi[k] = min(lo.get(k, math.inf), float(a)), max(hi.get(k, -math.inf), float(b))
    return {k: (lo[k], hi[k]) for k in lo}


# ============================================================ training
def qat_train(arch: Architecture, variables: Mapping[str, Any], data, *, epochs: int = 2,
              learning_rate: float = 2e-4, batch_size: int = 128, teacher_logits: np.ndarray | None = None,
              temperature: float = 2.0, alpha: float = 0.5, calibration_images: int = 512,
              seed: int = 0, weight_range: str = "full") -> tuple[dict[str, Any], Ranges, list[dict[str, float]]]:
    """Fine-tune the folded, fake-quantized network (Adam, cosine schedule; KD when `teacher_logits`);
    `weight_range` 'full' or 'reduced' (`evaluators.quantize.WEIGHT_RANGES`): the int8 weights' range.

    Returns (trained folded params, the activation ranges trained with, per-epoch history)."""
    if epochs < 1 or learning_rate <= 0:
        raise NasError(f"qat: epochs {epochs!r} and learning_rate {learning_rate!r}; allowed >= 1 and > 0")
    w_max = weight_max(weight_range)
    rng = np.random.default_rng(seed)
    n = len(data.y_train)
    calib = data.x_train[rng.choice(n, min(calibration_images, n), replace=False)]
    folded = jax.tree.map(jnp.asarray, fold(arch, variables))
    ranges = {k: (jnp.float32(a), jnp.float32(b)) for k, (a, b) in observe_ranges(arch, folded, calib).items()}
    steps = n // batch_size
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(1, epochs * steps)))
    opt = tx.init(folded)

    @jax.jit
    def step(params, opt, xb, yb, tb):
        def loss(p):
            logits = forward(arch, p, xb, ranges, w_max=w_max)
            return distillation(logits, tb, yb, temperature, alpha) if teacher_logits is not None else (
                cross_entropy(logits, yb))

        l, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, l

    tl = np.asarray(teacher_logits if teacher_logits is not None else np.zeros((n, arch.num_classes)), np.float32)
    history = []
    for e in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        losses = []
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            folded, opt, l = step(folded, opt, jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx]),
                                  jnp.asarray(tl[idx]))
            losses.append(float(l))
        if not all(map(math.isfinite, losses)):
            raise NasError(f"qat: the training loss became non-finite in epoch {e + 1}")
        history.append({"epoch": e + 1, "train_loss": float(np.mean(losses)), "epoch_s": time.perf_counter() - t0})
    return jax.tree.map(np.asarray, folded), {k: (float(a), float(b)) for k, (a, b) in ranges.items()}, history


def qat_predict(arch: Architecture, folded: Mapping[str, Any], ranges: Ranges, x: np.ndarray,
                batch_size: int = 256, weight_range: str = "full") -> np.ndarray:
    """Logits of the fake-quantized network (what the int8 model should compute)."""
    f = jax.tree.map(jnp.asarray, folded)
    r = {k: (jnp.float32(a), jnp.float32(b)) for k, (a, b) in ranges.items()}
    fn = jax.jit(functools.partial(forward, arch, w_max=weight_max(weight_range)))
    return np.concatenate([np.asarray(fn(f, jnp.asarray(x[i:i + batch_size]), r)) for i in range(0, len(x), batch_size)])


# ============================================================ export
def range_hints(arch: Architecture, folded: Mapping[str, Any], ranges: Ranges, rows: np.ndarray,
                weight_range: str = "full") -> RangeHints:
    """The ranges QAT trained with, as `RangeHints` for `quantize_static_int8`: each quantization
    point's values on `rows` in the network the export writes (weights on their int8 grid,
    activations in float), so that ONNX Runtime quantizes each activation over the range trained
    with instead of a range calibrated again on the trained weights."""
    w_max = weight_max(weight_range)

    def on_grid(f: Mapping[str, Any]) -> dict[str, Any]:
        return {k: on_grid(v) if isinstance(v, Mapping) else
                (fake_quant_weight(jnp.asarray(v), w_max) if k == "kernel" else jnp.asarray(v)) for k, v in f.items()}

    captured: dict[str, jnp.ndarray] = {}
    forward(arch, on_grid(folded), jnp.asarray(rows), None, capture=captured)
    names = list(captured)
    return RangeHints(np.asarray(rows, np.float32), [value_signature(captured[k]) for k in names],
                      [tuple(map(float, ranges[k])) for k in names])


def export_variables(arch: Architecture, folded: Mapping[str, Any], weight_range: str = "full") -> dict[str, Any]:
    """Flax variables of `arch` computing the folded network with its weights on their int8 grid
    (of `weight_range`): identity BatchNorm (scale 1, bias = folded bias, mean 0, var = 1 - eps)."""
    w_max = weight_max(weight_range)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def walk(f: Mapping[str, Any], p: dict, s: dict) -> None:
        for k, v in f.items():
            if "kernel" not in v:
                p[k], s[k] = {}, {}
                walk(v, p[k], s[k])
                if not s[k]:
                    s.pop(k)
                continue
            kq = np.asarray(fake_quant_weight(jnp.asarray(v["kernel"]), w_max), np.float32)
            bias = np.asarray(v["bias"], np.float32)
            down = {"down": {"kernel": np.asarray(fake_quant_weight(jnp.asarray(v["down"]["kernel"]), w_max),
                                                  np.float32)}} if "down" in v else {}
            if kq.ndim == 2:  # Dense (SE, classifier)
                p[k] = {**down, "kernel": kq, "bias": bias}
                continue
            c = kq.shape[-1]
            p[k] = {**down, "kernel": kq, "bn": {"scale": np.ones(c, np.float32), "bias": bias}}
            s[k] = {"bn": {"mean": np.zeros(c, np.float32), "var": np.full(c, 1 - BN_EPS, np.float32)}}

    walk(folded, params, stats)
    return {"params": params, "batch_stats": stats}
