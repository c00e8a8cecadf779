"""The pure training step and epoch over a `TrainState`, and the loss plugged into them.

A loss function is plugged into the one step: cross-entropy, or Hinton distillation against
stored teacher logits, optionally plus a hint loss between the student's and the teacher's
penultimate features through a learned projection (held next to the model's parameters under
`HINT`, updated by the same optimizer). An epoch is one `lax.scan` over pre-shuffled,
fixed-shape batches (`train_epoch`); `eval_split` scores pre-batched validation data.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from evaluators.losses import cross_entropy, distillation, function_matching, hint_loss, soft_cross_entropy
from evaluators.optim import KDConfig, TrainConfig
from evaluators.packing import STATS_GROUP, Packing
from evaluators.teaching import Lesson, lesson_key
from evaluators.variables import TrainState, Variables
from search_spaces.model import BN_MOMENTUM, MOMENTS
from search_spaces.ops import bn_moments

HINT = "hint_projection"  # the hint projection's entry in the trained parameter tree (never in the model's)
TEACHER_VARIABLES = "teacher_variables"  # an online teacher's members' variables, passed to the epoch with hparams


LossFn = Callable[[jnp.ndarray, Mapping[str, jnp.ndarray], Mapping[str, jnp.ndarray]], jnp.ndarray]


def make_loss(cfg: TrainConfig, distill: bool = False, hints: bool = False, soft: bool = False) -> LossFn:
    """`loss(logits, batch, hparams)`: CE on batch['y'], or (`distill`) Hinton KD against batch['teacher']
    with hparams['temperature'] and hparams['alpha'] (runtime scalars: one compile serves every KDConfig).
    With `soft`, the labels are batch['targets'] (soft, e.g. mixed by a `Lesson`) and KD is
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
        if lesson is None or not lesson.active:  # --- augmentation hook (evaluators/augment.py via teaching.Lesson)
            return b
        return lesson(b, lesson_key(st.key, st.step), hparams.get(TEACHER_VARIABLES))

    loss_hp = {k: v for k, v in hparams.items() if k != TEACHER_VARIABLES}
    if stats is None:
        return jax.lax.scan(lambda st, rows: train_step(st, gather(st, rows), loss_hp, loss_fn, packing), state, idx)

    layers = [path[:-1] for path, *_ in stats.leaves if path[-1] == "mean"]  # the packed means' order
    counts = []  # per channel, in that order: static, filled while tracing the body

    def body(st, rows):
        st, loss, moments = _step(st, stats.unpack(st.batch_stats), gather(st, rows), loss_hp, loss_fn, packing,
                                  MOMENTS)
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


def loss_hparams(kd: KDConfig | None, hints: bool = False) -> dict[str, float]:
    """Loss hyperparameters passed to the compiled epoch as data."""
    if kd is None:
        return {}
    out = {"temperature": float(kd.temperature), "alpha": float(kd.alpha)}
    return {**out, "beta": float(kd.beta)} if hints else out
