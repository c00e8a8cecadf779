"""Train and evaluate one architecture: pure steps under `jax.jit`, one compiled loop per epoch.

The training step is pure, `train_step(state, batch) -> (state, loss)`, with a `TrainState`
that also carries BatchNorm statistics and the dropout key. A loss function is plugged into
that one step: cross-entropy, or Hinton distillation against stored teacher logits, optionally
plus a hint loss between the student's and the teacher's penultimate features through a learned
projection (held next to the model's parameters, updated by the same optimizer). An epoch
runs as one compiled `lax.scan` over pre-shuffled, fixed-shape batches of the training set,
which sits on the device for the whole run (the last partial batch is dropped, so nothing
recompiles). The programs are compiled ahead of time, so `compile_s` is measured exactly, and
kept in a small per-process cache keyed by (architecture, config, data shapes).

Parameters are initialised from `jax.eval_shape` plus NumPy draws from the distributions the
model declares (conv kernels: He normal on fan-out; dense kernels: LeCun truncated normal;
biases 0, BatchNorm scale 1): a jitted `model.init` costs seconds per new architecture here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any, Callable, Mapping, Sequence

import flax.serialization
from flax import serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from evaluators.datasets import Dataset, epoch_indices, pad_batches
from evaluators.augment import AugmentConfig
from evaluators.losses import check_kd, cross_entropy, distillation, function_matching, hint_loss, soft_cross_entropy
from evaluators.teaching import Lesson, TeacherForward, lesson_key
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import BN_MOMENTUM, MOMENTS, Net, build_model, input_shape
from search_spaces.ops import IMPLS, bn_moments
from search_spaces.registry import Registry

Variables = dict[str, Any]
Schedule = Callable[[Any], Any]
EVAL_BATCH = 256
HINT = "hint_projection"  # the hint projection's entry in the trained parameter tree (never in the model's)
TEACHER_VARIABLES = "teacher_variables"  # an online teacher's members' variables, passed to the epoch with hparams


class TrainingDiverged(NasError):
    """The loss became NaN or infinite; `epoch` and `step` (1-based) say where."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


# ==================================================================== optimizers and schedules
SCHEDULES: Registry[Callable[["TrainConfig", int], Schedule]] = Registry("schedule")
OPTIMIZERS: Registry[Callable[[Schedule, "TrainConfig"], optax.GradientTransformation]] = Registry("optimizer")


@SCHEDULES.register("constant")
def _constant(cfg: "TrainConfig", steps_per_epoch: int) -> Schedule:
    return optax.constant_schedule(cfg.learning_rate)


@SCHEDULES.register("cosine")
def _cosine(cfg: "TrainConfig", steps_per_epoch: int) -> Schedule:
    return optax.cosine_decay_schedule(cfg.learning_rate, max(1, cfg.epochs * steps_per_epoch))


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine(cfg: "TrainConfig", steps_per_epoch: int) -> Schedule:
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if warmup == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, total)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total, end_value=0.0)


def _decay_mask(params: Mapping[str, Any]) -> Any:
    """Weight decay applies to conv and dense kernels only, not to biases or BatchNorm: the
    'kernels' vector of packed parameters (see `Packing`), or the leaves of more than one axis
    of a parameter tree."""
    if set(params) == set(GROUPS):
        return {group: group == "kernels" for group in params}
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _with_decay(cfg: "TrainConfig", tx: optax.GradientTransformation) -> optax.GradientTransformation:
    if not cfg.weight_decay:
        return tx
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask), tx)


@OPTIMIZERS.register("adamw")
def _adamw(lr: Schedule, cfg: "TrainConfig") -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=_decay_mask)


@OPTIMIZERS.register("adam")
def _adam(lr: Schedule, cfg: "TrainConfig") -> optax.GradientTransformation:
    return _with_decay(cfg, optax.adam(lr))  # weight_decay as a coupled L2 term


@OPTIMIZERS.register("sgd")
def _sgd(lr: Schedule, cfg: "TrainConfig") -> optax.GradientTransformation:
    return _with_decay(cfg, optax.sgd(lr, momentum=0.9, nesterov=True))


@OPTIMIZERS.register("rmsprop")
def _rmsprop(lr: Schedule, cfg: "TrainConfig") -> optax.GradientTransformation:
    return _with_decay(cfg, optax.rmsprop(lr))


# ==================================================================== configs
@dataclass(frozen=True)
class TrainConfig:
    """How one candidate is trained. Build from user data with `TrainConfig.from_dict`."""

    epochs: int = 3
    batch_size: int = 64
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    conv_impl: str = "fast"

    def __post_init__(self) -> None:
        _validate_train(self.__dict__, "train")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "train") -> "TrainConfig":
        """Validate a mapping (e.g. the `train:` section of a YAML file) into a config.

        Unknown keys and bad values raise `NasError` naming `{source}.{key}` and what is allowed.
        """
        values = _coerce(d, cls, source, float_keys=("learning_rate", "warmup_epochs", "weight_decay",
                                                     "label_smoothing"))
        _validate_train({**_defaults(cls), **values}, source)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (round-trips through `from_dict`)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KDConfig:
    """Hinton distillation: loss = alpha*T^2*KL(teacher || student at temperature T) + (1-alpha)*CE,
    plus beta * hint loss (student features through a learned projection vs teacher features) when
    `train` is given teacher features."""

    temperature: float = 2.0  # chosen on the validation split: benchmarks/distill_sweep.py
    alpha: float = 0.5
    beta: float = 0.0

    def __post_init__(self) -> None:
        check_kd(self.temperature, self.alpha, beta=self.beta)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "kd") -> "KDConfig":
        """Validate a mapping into a KDConfig; errors name `{source}.{key}`."""
        values = _coerce(d, cls, source, float_keys=("temperature", "alpha", "beta"))
        merged = {**_defaults(cls), **values}
        check_kd(merged["temperature"], merged["alpha"], source, beta=merged["beta"])
        return cls(**values)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _coerce(d: Mapping[str, Any] | None, cls: type, source: str, float_keys: tuple[str, ...]) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise NasError(f"{source}: expected a mapping, got {type(d).__name__}")
    allowed = [f.name for f in fields(cls)]
    out = {}
    for k, v in d.items():
        if k not in allowed:
            raise NasError(f"{source}.{k}: unknown key; allowed: {', '.join(allowed)}")
        if k in float_keys and isinstance(v, str):
            try:  # YAML 1.1 reads '3e-3' (no dot) as a string
                v = float(v)
            except ValueError:
                raise NasError(f"{source}.{k}: {v!r} is not a number") from None
        out[k] = v
    return out


def _validate_train(v: Mapping[str, Any], source: str) -> None:
    def bad(key: str, allowed: str) -> NasError:
        return NasError(f"{source}.{key}: invalid value {v[key]!r}; allowed {allowed}")

    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    def is_num(x: Any) -> bool:
        return isinstance(x, Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)

    for key in ("epochs", "batch_size"):
        if not is_int(v[key]) or v[key] < 1:
            raise bad(key, "an integer >= 1")
    if not is_int(v["seed"]) or v["seed"] < 0:
        raise bad("seed", "an integer >= 0")
    if not is_num(v["learning_rate"]) or v["learning_rate"] <= 0:
        raise bad("learning_rate", "a number > 0")
    if not is_num(v["weight_decay"]) or v["weight_decay"] < 0:
        raise bad("weight_decay", "a number >= 0")
    if not is_num(v["label_smoothing"]) or not 0 <= v["label_smoothing"] < 1:
        raise bad("label_smoothing", "a number in [0, 1)")
    for key, reg in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if not isinstance(v[key], str) or v[key] not in reg:
            raise bad(key, f"one of {', '.join(reg.names())}")
    if not isinstance(v["conv_impl"], str) or v["conv_impl"] not in IMPLS:
        raise bad("conv_impl", f"one of {', '.join(IMPLS)}")
    if not is_num(v["warmup_epochs"]) or v["warmup_epochs"] < 0:
        raise bad("warmup_epochs", "a number >= 0")
    if v["warmup_epochs"] and v["schedule"] != "warmup_cosine":
        raise NasError(f"{source}.warmup_epochs: {v['warmup_epochs']!r} needs schedule 'warmup_cosine' "
                       f"(schedule is '{v['schedule']}')")
    if v["warmup_epochs"] >= v["epochs"]:
        raise bad("warmup_epochs", f"a number below epochs ({v['epochs']})")


# ==================================================================== state and initialisation
class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics and the base dropout key."""

    batch_stats: Any
    key: jax.Array


@functools.lru_cache(maxsize=16)
def variable_shapes(arch: Architecture) -> Variables:
    """{'params', 'batch_stats'} of `arch` as ShapeDtypeStructs (plain dicts; do not modify). Cached:
    tracing the Flax model is a noticeable part of a new candidate's start-up, and initialisation,
    checks and compilation all need the shapes. Both convolution implementations declare the same
    variables (tests/test_ops.py runs one tree through both), so this traces the reference form,
    whose single convolution ops trace faster than the fast form's shifted multiply-adds, with
    zeros initialisers (`Net.zero_init`): only the shapes are kept."""
    model = Net(arch, "reference", zero_init=True)
    return _plain(jax.eval_shape(lambda inp: model.init(jax.random.PRNGKey(0), inp, train=False),
                                 jax.ShapeDtypeStruct(input_shape(arch, 1), jnp.float32)))


def initialize(arch: Architecture, *, seed: int = 0, conv_impl: str = "fast") -> Variables:
    """Fresh {'params', 'batch_stats'} as NumPy arrays, deterministic in `seed`.

    Shapes come from `jax.eval_shape(model.init)`; values are NumPy draws from the model's
    declared initialisers (falls back to a jitted `model.init` for a leaf it does not know).
    """
    flat = flax.traverse_util.flatten_dict(variable_shapes(arch))
    out = {}
    for path, spec in sorted(flat.items()):
        value = _init_leaf(path, tuple(spec.shape), seed)
        if value is None:  # a leaf this module does not know: use the model's own initialisers
            model = build_model(arch, conv_impl)
            real = jax.jit(lambda inp: model.init(jax.random.PRNGKey(seed), inp, train=False))(
                jnp.zeros(input_shape(arch, 1), jnp.float32))
            return jax.tree.map(np.asarray, _plain(real))
        out[path] = value.astype(spec.dtype)
    return flax.traverse_util.unflatten_dict(out)


def _init_leaf(path: tuple[str, ...], shape: tuple[int, ...], seed: int) -> np.ndarray | None:
    collection, name = path[0], path[-1]
    rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
    if collection == "batch_stats":
        return {"mean": np.zeros(shape), "var": np.ones(shape)}.get(name)
    if name == "bias":
        return np.zeros(shape)
    if name == "scale":
        return np.ones(shape)
    if name == "kernel" and len(shape) == 4:  # conv HWIO: variance_scaling(2, fan_out, normal)
        fan_out = shape[0] * shape[1] * shape[3]
        return rng.normal(0.0, math.sqrt(2.0 / fan_out), shape)
    if name == "kernel" and len(shape) == 2:  # dense: lecun_normal = truncated normal on fan_in
        std = math.sqrt(1.0 / shape[0]) / 0.87962566103423978
        z = rng.standard_normal(shape)
        while np.any(np.abs(z) > 2):
            bad = np.abs(z) > 2
            z[bad] = rng.standard_normal(int(bad.sum()))
        return z * std
    return None


def _plain(tree: Any) -> Any:
    """FrozenDict/dict tree -> nested plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def check_variables(arch: Architecture, variables: Mapping[str, Any], what: str = "variables") -> Variables:
    """{'params', 'batch_stats'} of `variables` after checking their tree and shapes fit `arch`
    (raises `NasError` naming `what` and the first mismatching entry)."""
    return _check_variables(variables, variable_shapes(arch), what)


def _check_variables(variables: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> Variables:
    """Keep 'params'/'batch_stats' and check their tree and shapes against `expected`."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise NasError(f"{what}: expected a mapping with 'params' and 'batch_stats'")
    got = {k: _plain(variables[k]) for k in ("params", "batch_stats") if k in variables}
    want = flax.traverse_util.flatten_dict(expected)
    have = flax.traverse_util.flatten_dict(got)
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise NasError(f"{what}: missing {'/'.join(path)} for this architecture")
        if path not in want:
            raise NasError(f"{what}: unexpected {'/'.join(path)} for this architecture")
        if tuple(np.shape(have[path])) != tuple(want[path].shape):
            raise NasError(f"{what}: {'/'.join(path)} has shape {tuple(np.shape(have[path]))}, "
                           f"this architecture needs {tuple(want[path].shape)}")
    return got


# ==================================================================== packed parameters
GROUPS = ("kernels", "others")
STATS_GROUP = GROUPS[1]  # where `Packing.of(batch_stats)` puts the (rank-1) running statistics


@dataclass(frozen=True)
class Packing:
    """Where each trained parameter lives in two flat vectors: 'kernels' (conv and dense kernels,
    the weight-decayed ones) and 'others' (biases, BatchNorm scales and offsets).

    The train state and the optimizer hold the two vectors; the step unpacks them into the
    model's tree (static slices, fused into their consumers). XLA:CPU compiles a kernel per
    parameter leaf and per optimizer update otherwise, and compile time follows the number of
    kernels: packing cut a mobile_small candidate's epoch program from 429 to 334 kernels and
    its compile by about a fifth, with steps as fast (same-process A/B; README, candidate speed).
    """

    leaves: tuple[tuple[tuple[str, ...], str, int, tuple[int, ...]], ...]  # (path, group, offset, shape)
    sizes: tuple[int, ...]  # length of each group's vector, in GROUPS order

    @classmethod
    def of(cls, tree: Mapping[str, Any], by_name: bool = False) -> "Packing":
        """The packing of a parameter tree (arrays or ShapeDtypeStructs), leaves in path order, or
        with `by_name` grouped by leaf name first (all 'mean's, then all 'var's, each in path order)."""
        offsets = dict.fromkeys(GROUPS, 0)
        leaves = []
        order = (lambda kv: (kv[0][-1], kv[0])) if by_name else (lambda kv: kv[0])
        for path, leaf in sorted(flax.traverse_util.flatten_dict(_plain(tree)).items(), key=order):
            shape = tuple(leaf.shape)
            group = GROUPS[0] if len(shape) > 1 else GROUPS[1]
            leaves.append((path, group, offsets[group], shape))
            offsets[group] += math.prod(shape)
        return cls(tuple(leaves), tuple(offsets[g] for g in GROUPS))

    def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {g: jax.ShapeDtypeStruct((n,), jnp.float32) for g, n in zip(GROUPS, self.sizes)}

    def pack(self, tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The tree's leaves copied into the two float32 vectors (NumPy)."""
        flat = flax.traverse_util.flatten_dict(_plain(tree))
        out = {g: np.empty(n, np.float32) for g, n in zip(GROUPS, self.sizes)}
        for path, group, offset, shape in self.leaves:
            out[group][offset:offset + math.prod(shape)] = np.asarray(flat[path], np.float32).reshape(-1)
        return out

    def pack_traced(self, tree: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
        """`pack` inside a traced function: one concatenation per vector."""
        flat = flax.traverse_util.flatten_dict(_plain(tree))
        return {g: jnp.concatenate([jnp.ravel(flat[path]) for path, group, _, _ in self.leaves if group == g]
                                   or [jnp.zeros((0,), jnp.float32)]) for g in GROUPS}

    def unpack(self, packed: Mapping[str, Any]) -> dict[str, Any]:
        """The parameter tree back from the vectors: NumPy in, NumPy out; traced in, traced out."""
        return flax.traverse_util.unflatten_dict({
            path: packed[group][offset:offset + math.prod(shape)].reshape(shape)
            for path, group, offset, shape in self.leaves})


# ==================================================================== the step and the loss
LossFn = Callable[[jnp.ndarray, Mapping[str, jnp.ndarray], Mapping[str, jnp.ndarray]], jnp.ndarray]


def make_loss(cfg: TrainConfig, distill: bool = False, hints: bool = False, soft: bool = False) -> LossFn:
    """`loss(logits, batch, hparams)`: CE on batch['y'], or (`distill`) Hinton KD against batch['teacher']
    with hparams['temperature'] and hparams['alpha'] (runtime scalars: one compile serves every KDConfig).
    With `soft`, the labels are batch['targets'] (soft, e.g. mixed by `Lesson`) and KD is
    `function_matching` on the view both networks saw.

    With `hints`, plus hparams['beta'] * hint_loss(batch['student_features'], batch['teacher_features'],
    batch['hint_projection']): `train_step` adds the student's features and the projection to the batch.
    """
    ls = cfg.label_smoothing
    if soft and not distill:
        return lambda logits, batch, hp: soft_cross_entropy(logits, batch["targets"], ls)
    if not distill:
        return lambda logits, batch, hp: cross_entropy(logits, batch["y"], ls)

    def kd(logits, batch, hp):
        if soft:
            return function_matching(logits, batch["teacher"], batch["targets"], hp["temperature"], hp["alpha"], ls)
        return distillation(logits, batch["teacher"], batch["y"], hp["temperature"], hp["alpha"], ls)

    if not hints:
        return kd
    return lambda logits, batch, hp: kd(logits, batch, hp) + hp["beta"] * hint_loss(
        batch["student_features"], batch["teacher_features"], batch[HINT])


def model_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model's own parameters: the trained tree without the hint projection."""
    return {k: v for k, v in params.items() if k != HINT} if HINT in params else params


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], hparams: Mapping[str, jnp.ndarray],
               loss_fn: LossFn, packing: Packing | None = None) -> tuple[TrainState, jnp.ndarray]:
    """One optimizer step on one batch ({'x', 'y', ...}); pure, returns (new state, loss).

    With `packing`, `state.params` are the packed vectors (see `Packing`), else the tree.
    When the trained parameters hold a hint projection (`HINT`), the model also returns its
    penultimate features, and both reach the loss through the batch.
    """
    state, loss, batch_stats = _step(state, state.batch_stats, batch, hparams, loss_fn, packing, "batch_stats")
    return state.replace(batch_stats=batch_stats), loss


def _step(state: TrainState, batch_stats: Any, batch: Mapping[str, jnp.ndarray], hparams: Mapping[str, jnp.ndarray],
          loss_fn: LossFn, packing: Packing | None, collection: str) -> tuple[TrainState, jnp.ndarray, Any]:
    """The optimizer step, given the running-statistics tree `batch_stats`; returns the model's
    `collection` ('batch_stats': updated running statistics; `MOMENTS`: this batch's BatchNorm
    sums) instead of storing it in the state.

    Packed parameters are unpacked before differentiation and the gradient tree packed with one
    concatenation per vector: differentiating through the unpacking instead made XLA write each
    leaf's gradient into a zero vector of full length (one kernel per leaf) and sum them."""
    dropout_key = jax.random.fold_in(state.key, state.step)

    def objective(params):
        hints = HINT in params  # static: the tree's structure
        out, updates = state.apply_fn({"params": model_params(params), "batch_stats": batch_stats},
                                      batch["x"], train=True, mutable=[collection], rngs={"dropout": dropout_key},
                                      **({"features": True} if hints else {}))
        if not hints:
            return loss_fn(out, batch, hparams), updates[collection]
        logits, feats = out
        return loss_fn(logits, {**batch, "student_features": feats, HINT: params[HINT]["kernel"]}, hparams), \
            updates[collection]

    params = state.params if packing is None else packing.unpack(state.params)
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    if packing is not None:
        grads = packing.pack_traced(grads)
    return state.apply_gradients(grads=grads), loss, aux


def train_epoch(state: TrainState, data: Mapping[str, jnp.ndarray], idx: jnp.ndarray,
                hparams: Mapping[str, jnp.ndarray], loss_fn: LossFn, packing: Packing | None = None,
                stats: Packing | None = None, lesson: Lesson | None = None) -> tuple[TrainState, jnp.ndarray]:
    """All steps of an epoch as one `lax.scan`; `idx` is (steps, batch) rows of `data`. Returns per-step losses.

    With an active `lesson`, each gathered batch is first augmented and, with an online teacher, given
    the teacher's logits on that view (`evaluators.teaching`; the teacher's variables are
    hparams[TEACHER_VARIABLES]), with a key of the state's (key, step).

    With `stats` (`Packing.of(batch_stats, by_name=True)`; needs the fast BatchNorm), `state.batch_stats`
    is that packed vector, and the running averages are updated once, after the loop, from every
    step's batch moments (`fold_moments`): the same numbers as one update per step, without
    XLA:CPU's two or three small kernels per BatchNorm per step (10-13% of an epoch's kernels).
    """
    def gather(st, rows):
        b = {k: jnp.take(v, rows, axis=0) for k, v in data.items()}
        if lesson is None or not lesson.active:
            return b
        return lesson(b, lesson_key(st.key, st.step), hparams.get(TEACHER_VARIABLES))

    loss_hparams = {k: v for k, v in hparams.items() if k != TEACHER_VARIABLES}
    if stats is None:
        return jax.lax.scan(lambda st, rows: train_step(st, gather(st, rows), loss_hparams, loss_fn, packing),
                            state, idx)

    layers = [path[:-1] for path, *_ in stats.leaves if path[-1] == "mean"]  # the packed means' order
    counts = []  # per channel, in that order: static, filled while tracing the body

    def body(st, rows):
        st, loss, moments = _step(st, stats.unpack(st.batch_stats), gather(st, rows), loss_hparams, loss_fn,
                                  packing, MOMENTS)
        flat = flax.traverse_util.flatten_dict(moments)
        counts[:] = [np.full(flat[(*k, "sum")].shape, flat[(*k, "count")], np.float32) for k in layers]
        return st, (loss, jnp.concatenate([flat[(*k, "sum")] for k in layers] + [flat[(*k, "sumsq")] for k in layers]))

    state, (losses, sums) = jax.lax.scan(body, state, idx)
    h = sums.shape[1] // 2
    mean, var = bn_moments(np.concatenate(counts), sums[:, :h], sums[:, h:])
    running = fold_moments(state.batch_stats[STATS_GROUP], jnp.concatenate([mean, var], axis=1), BN_MOMENTUM)
    return state.replace(batch_stats={**state.batch_stats, STATS_GROUP: running}), losses


def fold_moments(running: jnp.ndarray, moments: jnp.ndarray, momentum: float) -> jnp.ndarray:
    """Running averages after `r <- momentum * r + (1 - momentum) * moments[t]` for every row t,
    as one weighted sum (the recurrence is linear)."""
    t = moments.shape[0]
    weights = (1 - momentum) * momentum ** np.arange(t - 1, -1, -1, dtype=np.float64)
    return momentum ** t * running + jnp.asarray(weights, jnp.float32) @ moments


def eval_split(model: Any, variables: Variables, x: jnp.ndarray, y: jnp.ndarray,
               mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(mean CE loss, accuracy) over pre-batched (k, b, ...) inputs; `mask` marks real rows."""

    def body(carry, inp):
        xb, yb, mb = inp
        logits = model.apply(variables, xb, train=False)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, -1) == yb).astype(jnp.float32)
        return (carry[0] + jnp.sum(nll * mb), carry[1] + jnp.sum(correct * mb)), None

    (loss, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (x, y, mask))
    n = jnp.sum(mask)
    return loss / n, correct / n


def _hparams(kd: KDConfig | None, hints: bool = False) -> dict[str, float]:
    """Loss hyperparameters passed to the compiled epoch as data."""
    if kd is None:
        return {}
    out = {"temperature": float(kd.temperature), "alpha": float(kd.alpha)}
    return {**out, "beta": float(kd.beta)} if hints else out


@dataclass(frozen=True)
class _Programs:
    """Ahead-of-time compiled programs for one (architecture, config, data shapes)."""

    model: Any
    tx: optax.GradientTransformation
    packing: Packing
    stats: Packing | None  # packing of the running statistics in the epoch's state (fast BatchNorm only)
    opt_init: Any
    epoch: Any
    evaluate: Any
    compile_s: float

    def state_stats(self, tree: Mapping[str, Any]) -> Any:
        """Running statistics (tree) as the epoch program's state holds them."""
        return self.stats.pack(tree) if self.stats is not None else tree

    def stats_tree(self, held: Any) -> Variables:
        """The running-statistics tree (NumPy) from the epoch program's state."""
        host = jax.device_get(held)
        return self.stats.unpack(host) if self.stats is not None else host


@functools.lru_cache(maxsize=4)
def _programs(arch: Architecture, cfg: TrainConfig, steps: int, n_train: int,
              val_batches: tuple[int, int], teacher_classes: int | None,
              compiler_options: tuple[tuple[str, Any], ...] = (), teacher_features: int | None = None,
              lesson: Lesson | None = None) -> _Programs:
    t0 = time.perf_counter()
    opts = dict(compiler_options) or None
    model = build_model(arch, cfg.conv_impl)
    tx = OPTIMIZERS.get(cfg.optimizer)(SCHEDULES.get(cfg.schedule)(cfg, steps), cfg)
    shapes = variable_shapes(arch)
    trained = dict(shapes["params"])
    if teacher_features is not None:
        trained[HINT] = {"kernel": jax.ShapeDtypeStruct((arch.head.channels, teacher_features), jnp.float32)}
    packing = Packing.of(trained)
    stats = Packing.of(shapes["batch_stats"], by_name=True) if cfg.conv_impl == "fast" else None  # train_epoch
    state = jax.eval_shape(lambda p, b: TrainState.create(apply_fn=model.apply, params=p, tx=tx, batch_stats=b,
                                                          key=jax.random.PRNGKey(0)),
                           packing.shapes(), shapes["batch_stats"] if stats is None else stats.shapes())
    hwc = input_shape(arch, 1)[1:]
    data = {"x": jax.ShapeDtypeStruct((n_train, *hwc), jnp.float32),
            "y": jax.ShapeDtypeStruct((n_train,), jnp.int32)}
    online = lesson is not None and lesson.teacher is not None
    if teacher_classes is not None and not online:
        data["teacher"] = jax.ShapeDtypeStruct((n_train, teacher_classes), jnp.float32)
    if teacher_features is not None:
        data["teacher_features"] = jax.ShapeDtypeStruct((n_train, teacher_features), jnp.float32)
    loss_fn = make_loss(cfg, distill=teacher_classes is not None, hints=teacher_features is not None,
                        soft=lesson is not None and lesson.soft_targets)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    names = _hparams(KDConfig(), teacher_features is not None) if teacher_classes is not None else {}
    hparams: dict[str, Any] = {k: scalar for k in names}
    if online:
        hparams[TEACHER_VARIABLES] = tuple(variable_shapes(a) for a in lesson.teacher.archs)
    k, b = val_batches
    lowered_eval = jax.jit(functools.partial(eval_split, model)).lower(
        {"params": shapes["params"], "batch_stats": shapes["batch_stats"]},
        jax.ShapeDtypeStruct((k, b, *hwc), jnp.float32), jax.ShapeDtypeStruct((k, b), jnp.int32),
        jax.ShapeDtypeStruct((k, b), jnp.float32))
    # XLA compiles the validation program in a second thread while this one traces the epoch:
    # tracing is single-threaded Python, so the other core was idle for that second or two.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        compiling_eval = pool.submit(lowered_eval.compile, opts)
        opt_init = jax.jit(tx.init).lower(state.params).compile()
        epoch = jax.jit(functools.partial(train_epoch, loss_fn=loss_fn, packing=packing, stats=stats, lesson=lesson),
                        donate_argnums=0).lower(
            state, data, jax.ShapeDtypeStruct((steps, cfg.batch_size), jnp.int32), hparams).compile(opts)
        evaluate = compiling_eval.result()
    return _Programs(model, tx, packing, stats, opt_init, epoch, evaluate, time.perf_counter() - t0)


# ==================================================================== train
@dataclass(frozen=True)
class TrainResult:
    """What `train` returns; `variables` are NumPy arrays, `history` one dict per epoch."""

    variables: Variables
    history: list[dict[str, float]]
    val_accuracy: float
    val_loss: float
    train_s: float
    compile_s: float
    init_s: float
    steps: int = 0
    hint_projection: np.ndarray | None = None  # the learned (C_student, C_teacher) projection, with hints


def _val_plan(n: int, batch_size: int) -> tuple[int, int]:
    """(batches, batch size) covering n rows with the least padding, batches of at most `batch_size`."""
    k = max(1, -(-n // batch_size))
    return k, -(-n // k)


def train(arch: Architecture, data: Dataset, cfg: TrainConfig, *,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          init_variables: Mapping[str, Any] | None = None, teacher_logits: np.ndarray | None = None,
          kd: KDConfig | None = None, eval_batch_size: int = EVAL_BATCH,
          compiler_options: Mapping[str, Any] | None = None,
          teacher_features: np.ndarray | None = None,
          checkpoint: Callable[[int, bytes], None] | None = None,
          resume_from: bytes | None = None, augment: AugmentConfig | None = None,
          teacher: Sequence[tuple[Architecture, Mapping[str, Any]]] | None = None) -> TrainResult:
    """Train `arch` on `data.x_train` per `cfg`, evaluating on the validation split after every epoch.

    Args:
      arch: the architecture; its input shape and class count must match `data`.
      data: the dataset (see `evaluators.datasets.load_dataset`).
      cfg: the training config.
      checkpoint: called after every epoch (after `on_epoch`) as `checkpoint(epoch, blob)`; `blob` is
        the whole training state (optimizer state, step, RNGs, history) as bytes.
      resume_from: such a blob: training continues after its epoch exactly as if never stopped.
      on_epoch: called as `on_epoch(epoch, {"train_loss", "val_loss", "val_accuracy", "epoch_s"})`
        after every epoch (1-based), e.g. to report to a tuner.
      init_variables: {'params', 'batch_stats'} to start from (fine-tuning) instead of a fresh init.
      teacher_logits: (n_train, num_classes) logits aligned with `data.x_train` rows; with them the
        loss is `kd_loss` (with `kd`, default `KDConfig()`) instead of cross-entropy.
      kd: distillation settings; requires `teacher_logits`.
      teacher_features: (n_train, C_teacher) teacher features aligned like `teacher_logits` (e.g. the
        teacher's penultimate pooled features); with them the loss adds `kd.beta * hint_loss` between
        the student's penultimate features, through a learned (C_student, C_teacher) projection
        (initialised LeCun-normal from `cfg.seed`, trained by the same optimizer), and these.
      augment: augmentation of every training batch inside the compiled step (`AugmentConfig`); with
        mixup/cutmix the labels (and cached teacher logits) are blended like the images.
      teacher: an online teacher, (architecture, variables) per member: its logits (averaged over
        members, evaluation mode) are computed inside the step on exactly the view the student sees,
        and the loss is `function_matching` / `kd_loss` with `kd` (default `KDConfig()`). Exclusive
        with `teacher_logits`; no hints.
      eval_batch_size: largest batch used for validation.
      compiler_options: XLA options for the training and validation programs, e.g.
        {"xla_backend_optimization_level": 1} (compiles faster, may run slower).

    Returns:
      A `TrainResult` with the final variables (NumPy), per-epoch history and timings: `init_s`
      (parameters, optimizer state, data to device), `compile_s` (0 when this architecture,
      config and data shapes were compiled earlier in the process) and `train_s` (all epochs).

    Raises:
      NasError: mismatched data/architecture/teacher/initial variables.
      TrainingDiverged: the training loss (or validation loss) became NaN or infinite.

    Example:
      >>> res = train(arch, load_dataset("digits"), TrainConfig(epochs=2))
      >>> res.val_accuracy
    """
    t_init = time.perf_counter()
    if tuple(data.input_shape) != tuple(input_shape(arch, 1)[1:]) or data.num_classes != arch.num_classes:
        h, w, c = input_shape(arch, 1)[1:]
        dh, dw, dc = data.input_shape
        raise NasError(f"architecture '{arch.key}' expects {h}x{w}x{c} inputs and {arch.num_classes} classes; "
                       f"dataset '{data.name}' has {dh}x{dw}x{dc} and {data.num_classes} classes "
                       f"(use space.with_input(resolution=..., in_channels=..., num_classes=...))")
    n_train = len(data.y_train)
    if cfg.batch_size > n_train:
        raise NasError(f"train.batch_size: {cfg.batch_size} exceeds the {n_train} training rows of '{data.name}'")
    if len(data.y_val) == 0:
        raise NasError(f"dataset '{data.name}' has an empty validation split")
    if teacher is not None:
        if teacher_logits is not None or teacher_features is not None:
            raise NasError("teacher: an online teacher replaces teacher_logits/teacher_features; give one or the other")
        teacher = _check_teacher(teacher, data)
        kd = kd or KDConfig()
    elif kd is not None and teacher_logits is None:
        raise NasError("kd: distillation needs teacher_logits (one row of logits per training image) or a teacher")
    if teacher_logits is not None:
        kd = kd or KDConfig()
        teacher_logits = np.asarray(teacher_logits, np.float32)
        if teacher_logits.shape != (n_train, data.num_classes):
            raise NasError(f"teacher_logits: shape {teacher_logits.shape}; expected ({n_train}, {data.num_classes}) "
                           f"aligned with the training rows of '{data.name}'")
        if not np.all(np.isfinite(teacher_logits)):
            raise NasError("teacher_logits: contains NaN or infinite values")
    if teacher_features is not None:
        if teacher_logits is None:
            raise NasError("teacher_features: the hint loss needs teacher_logits too (use kd alpha=0 for CE + hints)")
        teacher_features = np.asarray(teacher_features, np.float32)
        if teacher_features.ndim != 2 or len(teacher_features) != n_train:
            raise NasError(f"teacher_features: shape {teacher_features.shape}; expected ({n_train}, C) "
                           f"aligned with the training rows of '{data.name}'")
        if not np.all(np.isfinite(teacher_features)):
            raise NasError("teacher_features: contains NaN or infinite values")
    elif kd is not None and kd.beta and teacher is None:
        raise NasError(f"kd.beta: {kd.beta} weighs a hint loss, which needs teacher_features")
    steps = n_train // cfg.batch_size

    if init_variables is None:
        variables = initialize(arch, seed=cfg.seed, conv_impl=cfg.conv_impl)
    else:
        variables = _check_variables(init_variables, variable_shapes(arch), "init_variables")
    trained = dict(variables["params"])
    if teacher_features is not None:
        kernel = _init_leaf(("params", HINT, "kernel"), (arch.head.channels, teacher_features.shape[1]), cfg.seed)
        trained[HINT] = {"kernel": kernel.astype(np.float32)}
    init_s = time.perf_counter() - t_init

    if teacher is not None and kd.beta:
        raise NasError(f"kd.beta: {kd.beta}; an online teacher gives logits only (hints need cached teacher_features)")
    lesson = Lesson(augment or AugmentConfig(),
                    None if teacher is None else TeacherForward(tuple(a for a, _ in teacher), cfg.conv_impl),
                    data.num_classes)
    val_plan = _val_plan(len(data.y_val), eval_batch_size)
    misses = _programs.cache_info().misses
    progs = _programs(arch, dataclasses.replace(cfg, seed=0), steps, n_train, val_plan,
                      None if teacher_logits is None and teacher is None else data.num_classes,
                      tuple(sorted((compiler_options or {}).items())),
                      None if teacher_features is None else teacher_features.shape[1],
                      lesson if lesson.active else None)
    compile_s = progs.compile_s if _programs.cache_info().misses > misses else 0.0  # 0 on a cache hit

    t0 = time.perf_counter()
    params = jax.device_put(progs.packing.pack(trained))
    state = TrainState(step=jnp.zeros((), jnp.int32), apply_fn=progs.model.apply, params=params, tx=progs.tx,
                       opt_state=progs.opt_init(params),
                       batch_stats=jax.device_put(progs.state_stats(variables["batch_stats"])),
                       key=jax.random.PRNGKey(cfg.seed))
    dev = {"x": jax.device_put(data.x_train), "y": jax.device_put(data.y_train)}
    if teacher_logits is not None:
        dev["teacher"] = jax.device_put(teacher_logits)
    if teacher_features is not None:
        dev["teacher_features"] = jax.device_put(teacher_features)
    k, b = val_plan
    xv, nv = pad_batches(np.asarray(data.x_val), b)
    yv, _ = pad_batches(np.asarray(data.y_val), b)
    mask = (np.arange(k * b) < nv).astype(np.float32)
    val = (jax.device_put(xv.reshape(k, b, *xv.shape[1:])), jax.device_put(yv.reshape(k, b)),
           jax.device_put(mask.reshape(k, b)))
    hparams: dict[str, Any] = {k: jnp.float32(v) for k, v in _hparams(kd, teacher_features is not None).items()}
    if teacher is not None:
        hparams[TEACHER_VARIABLES] = jax.device_put(tuple(v for _, v in teacher))
    order_rng = np.random.default_rng([cfg.seed, 1])
    init_s += time.perf_counter() - t0

    history: list[dict[str, float]] = []
    first = 1
    if resume_from is not None:
        state, history, first = _restore_blob(resume_from, state, order_rng)
    t_train = time.perf_counter()
    for epoch in range(first, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        idx = jax.device_put(epoch_indices(n_train, cfg.batch_size, order_rng))
        state, losses = progs.epoch(state, dev, idx, hparams)
        losses = np.asarray(losses)
        if not np.all(np.isfinite(losses)):
            i = int(np.argmax(~np.isfinite(losses)))
            raise TrainingDiverged(
                f"training diverged: loss is {losses[i]} at epoch {epoch}, step {i + 1} of {steps} "
                f"(learning_rate {cfg.learning_rate:g}); try a lower learning rate", epoch, i + 1)
        params = model_params(progs.packing.unpack(jax.device_get(state.params)))  # NumPy: nothing to compile
        val_loss, val_acc = (float(v) for v in progs.evaluate(
            {"params": params, "batch_stats": progs.stats_tree(state.batch_stats)}, *val))
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"training diverged: validation loss is {val_loss} after epoch {epoch}",
                                   epoch, steps)
        metrics = {"train_loss": float(losses.mean()), "val_loss": val_loss, "val_accuracy": val_acc,
                   "epoch_s": time.perf_counter() - t_epoch}
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, dict(metrics))
        if checkpoint is not None:
            checkpoint(epoch, _state_blob(state, history, epoch, order_rng))
    if not history:
        raise NasError(f"resume_from: the saved state is already past the last epoch ({cfg.epochs})")
    train_s = time.perf_counter() - t_train
    trained = progs.packing.unpack(jax.device_get(state.params))
    final = {"params": model_params(trained), "batch_stats": progs.stats_tree(state.batch_stats)}
    projection = np.asarray(trained[HINT]["kernel"]) if HINT in trained else None
    return TrainResult(variables=_plain(final), history=history, val_accuracy=history[-1]["val_accuracy"],
                       val_loss=history[-1]["val_loss"], train_s=train_s, compile_s=compile_s, init_s=init_s,
                       steps=steps * cfg.epochs, hint_projection=projection)


def _check_teacher(teacher: Sequence[tuple[Architecture, Mapping[str, Any]]],
                   data: Dataset) -> tuple[tuple[Architecture, Variables], ...]:
    """An online teacher's members, each checked against the dataset and its own architecture."""
    members = tuple(teacher)
    if not members:
        raise NasError("teacher: no members")
    out = []
    for i, (a, v) in enumerate(members):
        if tuple(input_shape(a, 1)[1:]) != tuple(data.input_shape) or a.num_classes != data.num_classes:
            raise NasError(f"teacher member {i} '{a.key}': takes {input_shape(a, 1)[1:]} -> {a.num_classes} classes; "
                           f"dataset '{data.name}' has {tuple(data.input_shape)} -> {data.num_classes}")
        checked = _check_variables(v, variable_shapes(a), f"teacher member {i} '{a.key}'")
        out.append((a, jax.tree.map(lambda x: np.asarray(x, np.float32), checked)))
    return tuple(out)


def _state_blob(state: TrainState, history: list[dict[str, float]], epoch: int,
                order_rng: np.random.Generator) -> bytes:
    """Everything needed to continue training after `epoch`, as msgpack bytes."""
    return serialization.msgpack_serialize({
        "state": serialization.to_state_dict(jax.device_get(state)), "epoch": epoch,
        "history": json.dumps(history), "order_rng": json.dumps(order_rng.bit_generator.state),
    })


def _restore_blob(blob: bytes, state: TrainState,
                  order_rng: np.random.Generator) -> tuple[TrainState, list[dict[str, float]], int]:
    try:
        d = serialization.msgpack_restore(blob)
        restored = serialization.from_state_dict(state, d["state"])
        order_rng.bit_generator.state = json.loads(d["order_rng"])
        history = json.loads(d["history"])
        epoch = int(d["epoch"])
    except (KeyError, ValueError, TypeError) as e:
        raise NasError(f"resume_from: not a training state of this architecture/config ({e})") from None
    return jax.device_put(restored), history, epoch + 1


# ==================================================================== inference
@functools.partial(jax.jit, static_argnames=("arch", "impl"))
def _forward(variables: Variables, x: jnp.ndarray, *, arch: Architecture, impl: str) -> jnp.ndarray:
    return build_model(arch, impl).apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnames=("arch", "impl"))
def _forward_features(variables: Variables, x: jnp.ndarray, *, arch: Architecture,
                      impl: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    return build_model(arch, impl).apply(variables, x, train=False, features=True)


def predict_logits(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, *,
                   batch_size: int = EVAL_BATCH, conv_impl: str = "fast") -> np.ndarray:
    """Logits for every row of `x` (normalised NHWC), in fixed-shape batches (the last one padded).

    Fewer rows than `batch_size` run as one batch padded to the next power of two.
    """
    return _predict(arch, variables, x, batch_size, conv_impl, features=False)


def predict_features(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, *,
                     batch_size: int = EVAL_BATCH, conv_impl: str = "fast") -> tuple[np.ndarray, np.ndarray]:
    """(logits, penultimate pooled features) for every row of `x`, batched like `predict_logits`."""
    return _predict(arch, variables, x, batch_size, conv_impl, features=True)


def _predict(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, batch_size: int, conv_impl: str,
             features: bool) -> Any:
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1:] != tuple(input_shape(arch, 1)[1:]):
        raise NasError(f"predict: inputs of shape {x.shape}; architecture '{arch.key}' expects "
                       f"(N, {', '.join(map(str, input_shape(arch, 1)[1:]))})")
    if batch_size < 1:
        raise NasError(f"batch_size: {batch_size}; allowed an integer >= 1")
    v = jax.device_put({k: _plain(variables[k]) for k in ("params", "batch_stats") if k in variables})
    if 0 < len(x) < batch_size:  # small inputs: the next power of two, so few shapes ever compile
        batch_size = 1 << (len(x) - 1).bit_length()
    xp, n = pad_batches(x, batch_size)
    if features:
        outs = [jax.device_get(_forward_features(v, xp[i:i + batch_size], arch=arch, impl=conv_impl))
                for i in range(0, len(xp), batch_size)]
        return (np.concatenate([np.asarray(o[0]) for o in outs])[:n],
                np.concatenate([np.asarray(o[1]) for o in outs])[:n])
    out = [np.asarray(_forward(v, xp[i:i + batch_size], arch=arch, impl=conv_impl))
           for i in range(0, len(xp), batch_size)]
    return np.concatenate(out)[:n]


def evaluate(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, y: np.ndarray, *,
             batch_size: int = EVAL_BATCH, conv_impl: str = "fast") -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of `variables` on (x, y)."""
    y = np.asarray(y)
    if len(y) != len(x) or len(y) == 0:
        raise NasError(f"evaluate: x has {len(x)} rows and y has {len(y)}; need the same, non-zero count")
    logits = predict_logits(arch, variables, x, batch_size=batch_size, conv_impl=conv_impl).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    acc = float((logits.argmax(axis=1) == y).mean())
    return acc, loss


# ==================================================================== persistence
def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Write variables as Flax msgpack, atomically (temporary file in the same folder + os.replace)."""
    path = os.fspath(path)
    data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, _plain(jax.device_get(dict(variables)))))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".msgpack", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_variables(path: str | os.PathLike) -> Variables:
    """Read variables written by `save_variables` (nested dicts of NumPy arrays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NasError(f"{path}: variables file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        restored = flax.serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise NasError(f"{path}: not a Flax msgpack variables file ({type(e).__name__})") from None
    if not isinstance(restored, dict):
        raise NasError(f"{path}: not a Flax msgpack variables file (top level is {type(restored).__name__})")
    return restored
