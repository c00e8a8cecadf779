"""Train and evaluate one architecture: pure steps under `jax.jit`, one compiled loop per epoch.

The training set sits on the device for the whole run; an epoch runs as one compiled
`lax.scan` over pre-shuffled, fixed-shape batches (the last partial batch is dropped, so
nothing recompiles), followed by one validation pass. The pieces: configs in
`evaluators.optim`, variables in `evaluators.variables`, the step and loss in
`evaluators.step`, the compiled programs in `evaluators.programs`, inference in
`evaluators.predict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from evaluators.augment import AugmentConfig
from evaluators.datasets import Dataset, epoch_indices, pad_batches
from evaluators.optim import KDConfig, TrainConfig
from evaluators.predict import EVAL_BATCH
from evaluators.programs import compiled_programs
from evaluators.step import HINT, TEACHER_VARIABLES, loss_hparams, model_params
from evaluators.streaming import StreamFeed, chunk_steps
from evaluators.teaching import TeacherForward
from evaluators.variables import TrainState, Variables, check_variables, init_leaf, initialize, plain_tree
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import input_shape


class TrainingDiverged(NasError):
    """The loss became NaN or infinite; `epoch` and `step` (1-based) say where."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


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
      augment: augmentation of every training batch inside the compiled step (`AugmentConfig`; default
        the dataset's own `data.augment`); with mixup/cutmix the labels (and cached teacher logits) are
        blended like the images.
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
    # --- streaming hook (evaluators/streaming.py): `chunk` batches per call instead of the device-resident split
    chunk = steps if data.stream is None else chunk_steps(steps, cfg.batch_size)
    if data.stream is not None and teacher_logits is not None:
        raise NasError(f"dataset '{data.name}' streams its training split; distillation needs it in memory "
                       f"(set dataset.streaming: false)")

    if init_variables is None:
        variables = initialize(arch, seed=cfg.seed, conv_impl=cfg.conv_impl)
    else:
        variables = check_variables(arch, init_variables, "init_variables")
    trained = dict(variables["params"])
    if teacher_features is not None:
        kernel = init_leaf(("params", HINT, "kernel"), (arch.head.channels, teacher_features.shape[1]), cfg.seed)
        trained[HINT] = {"kernel": kernel.astype(np.float32)}
    init_s = time.perf_counter() - t_init

    if teacher is not None and kd.beta:
        raise NasError(f"kd.beta: {kd.beta}; an online teacher gives logits only (hints need cached teacher_features)")
    val_plan = _val_plan(len(data.y_val), eval_batch_size)
    misses = compiled_programs.cache_info().misses
    progs = compiled_programs(arch, dataclasses.replace(cfg, seed=0), chunk,
                              n_train if data.stream is None else chunk * cfg.batch_size, val_plan,
                              None if teacher_logits is None and teacher is None else data.num_classes,
                              tuple(sorted((compiler_options or {}).items())),
                              None if teacher_features is None else teacher_features.shape[1],
                              augment if augment is not None else data.augment, steps,
                              None if teacher is None else TeacherForward(tuple(a for a, _ in teacher), cfg.conv_impl))
    compile_s = progs.compile_s if compiled_programs.cache_info().misses > misses else 0.0  # 0 on a cache hit

    t0 = time.perf_counter()
    params = jax.device_put(progs.packing.pack(trained))
    state = TrainState(step=jnp.zeros((), jnp.int32), apply_fn=progs.model.apply, params=params, tx=progs.tx,
                       opt_state=progs.opt_init(params),
                       batch_stats=jax.device_put(progs.state_stats(variables["batch_stats"])),
                       key=jax.random.PRNGKey(cfg.seed))
    dev = {} if data.stream is not None else {"x": jax.device_put(data.x_train), "y": jax.device_put(data.y_train)}
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
    hparams: dict[str, Any] = {k: jnp.float32(v) for k, v in loss_hparams(kd, teacher_features is not None).items()}
    if teacher is not None:
        hparams[TEACHER_VARIABLES] = jax.device_put(tuple(v for _, v in teacher))
    order_rng = np.random.default_rng([cfg.seed, 1])
    init_s += time.perf_counter() - t0

    history: list[dict[str, float]] = []
    first = 1
    if resume_from is not None:
        state, history, first = _restore_blob(resume_from, state, order_rng)
    t_train = time.perf_counter()
    feed = None if data.stream is None else StreamFeed(data.stream, cfg.batch_size, seed=cfg.seed, epochs=cfg.epochs,
                                                       first_epoch=first, steps=steps, chunk=chunk)
    for epoch in range(first, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        if feed is not None:
            state, losses = feed.epoch(progs.epoch, state, hparams)
        else:
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
    if feed is not None:
        feed.close()
    if not history:
        raise NasError(f"resume_from: the saved state is already past the last epoch ({cfg.epochs})")
    train_s = time.perf_counter() - t_train
    trained = progs.packing.unpack(jax.device_get(state.params))
    final = {"params": model_params(trained), "batch_stats": progs.stats_tree(state.batch_stats)}
    projection = np.asarray(trained[HINT]["kernel"]) if HINT in trained else None
    return TrainResult(variables=plain_tree(final), history=history, val_accuracy=history[-1]["val_accuracy"],
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
        checked = check_variables(a, v, f"teacher member {i} '{a.key}'")
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
