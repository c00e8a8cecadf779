"""The training and validation programs of one (architecture, config, data shapes), compiled ahead of time.

Compiling ahead of time measures `compile_s` exactly; `compiled_programs` keeps the last few in
a small per-process cache, so a second training run of the same shapes compiles nothing.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from evaluators.augment import AugmentConfig
from evaluators.optim import OPTIMIZERS, SCHEDULES, KDConfig, TrainConfig
from evaluators.packing import Packing
from evaluators.step import HINT, TEACHER_VARIABLES, eval_split, loss_hparams, make_loss, train_epoch
from evaluators.teaching import Lesson, TeacherForward
from evaluators.variables import TrainState, Variables, variable_shapes
from search_spaces.architecture import Architecture
from search_spaces.model import build_model, input_shape


@dataclass(frozen=True)
class Programs:
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
def compiled_programs(arch: Architecture, cfg: TrainConfig, steps: int, n_train: int,
                      val_batches: tuple[int, int], teacher_classes: int | None,
                      compiler_options: tuple[tuple[str, Any], ...] = (),
                      teacher_features: int | None = None, augment: AugmentConfig | None = None,
                      steps_per_epoch: int | None = None, teacher: TeacherForward | None = None) -> Programs:
    """Compile the optimizer init, the epoch (`train_epoch` over `steps` batches of `n_train` rows) and
    the validation program (`val_batches` = (batches, batch size)); with `teacher_classes` the epoch
    distils, with `teacher_features` it adds the hint loss, with `augment` it augments the training
    batches (with mixup/cutmix on soft targets), with an online `teacher` its logits on each augmented
    batch replace stored ones (`evaluators.teaching.Lesson`); `steps_per_epoch` (default `steps`) sets
    the learning-rate schedule when a streamed epoch takes several calls. Cached per process (last 4)."""
    t0 = time.perf_counter()
    opts = dict(compiler_options) or None
    model = build_model(arch, cfg.conv_impl)
    tx = OPTIMIZERS.get(cfg.optimizer)(SCHEDULES.get(cfg.schedule)(cfg, steps_per_epoch or steps), cfg)
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
    lesson = Lesson(augment or AugmentConfig(), teacher, arch.num_classes)
    lesson = lesson if lesson.active else None
    online = teacher is not None
    if teacher_classes is not None and not online:
        data["teacher"] = jax.ShapeDtypeStruct((n_train, teacher_classes), jnp.float32)
    if teacher_features is not None:
        data["teacher_features"] = jax.ShapeDtypeStruct((n_train, teacher_features), jnp.float32)
    loss_fn = make_loss(cfg, distill=teacher_classes is not None, hints=teacher_features is not None,
                        soft=lesson is not None and lesson.soft_targets)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    names = loss_hparams(KDConfig(), teacher_features is not None) if teacher_classes is not None else {}
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
        epoch = jax.jit(functools.partial(train_epoch, loss_fn=loss_fn, packing=packing, stats=stats,
                                          lesson=lesson),
                        donate_argnums=0).lower(
            state, data, jax.ShapeDtypeStruct((steps, cfg.batch_size), jnp.int32), hparams).compile(opts)
        evaluate = compiling_eval.result()
    return Programs(model, tx, packing, stats, opt_init, epoch, evaluate, time.perf_counter() - t0)
