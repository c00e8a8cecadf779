"""The JAX side of benchmarks/candidate_speed.py: one train step, inference, one whole candidate.

Imported only by a child process that measures JAX alone (no PyTorch in the process), at JAX's
own defaults. Each function returns plain figures in seconds.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from evaluators.datasets import Dataset
from evaluators.optim import OPTIMIZERS, SCHEDULES, TrainConfig
from evaluators.packing import Packing
from evaluators.step import make_loss, train_step
from evaluators.train import train
from evaluators.variables import TrainState, initialize
from search_spaces.architecture import Architecture
from search_spaces.model import build_model, input_shape


def warm_up() -> None:
    """Start the CPU backend before any clock runs (a user's process has done this once)."""
    jnp.zeros(8).block_until_ready()


def train_step_fn(arch: Architecture, batch: int):
    """`(run, compile_s)`: `run()` does one compiled framework train step (AdamW, cross-entropy,
    BatchNorm in training mode) at `batch` and blocks on its loss."""
    cfg = TrainConfig(batch_size=batch)
    model = build_model(arch, cfg.conv_impl)
    tx = OPTIMIZERS.get(cfg.optimizer)(SCHEDULES.get(cfg.schedule)(cfg, 100), cfg)
    v = initialize(arch, seed=0, conv_impl=cfg.conv_impl)
    packing = Packing.of(v["params"])
    state = TrainState.create(apply_fn=model.apply, params=jax.device_put(packing.pack(v["params"])), tx=tx,
                              batch_stats=v["batch_stats"], key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.standard_normal(input_shape(arch, batch), np.float32)),
            "y": jnp.asarray(rng.integers(0, arch.num_classes, batch).astype(np.int32))}
    t = time.perf_counter()
    step = jax.jit(functools.partial(train_step, loss_fn=make_loss(cfg), packing=packing), donate_argnums=0)
    step = step.lower(state, data, {}).compile()
    compile_s = time.perf_counter() - t
    box = [state]

    def run():
        box[0], loss = step(box[0], data, {})
        loss.block_until_ready()

    return run, compile_s


def infer_fn(arch: Architecture, batch: int):
    """`run()`: one jitted forward pass in eval mode at `batch`."""
    model = build_model(arch)
    v = initialize(arch, seed=0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(input_shape(arch, batch), np.float32))
    f = jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).compile()
    return lambda: f(v, x).block_until_ready()


def candidate(arch: Architecture, data: Dataset, epochs: int, batch: int) -> dict[str, float]:
    """A fresh candidate: `evaluators.train.train` (init, XLA compile, epochs, validation after each)."""
    jax.config.update("jax_enable_compilation_cache", False)  # every candidate compiles, as an unseen one does
    t = time.perf_counter()
    res = train(arch, data, TrainConfig(epochs=epochs, batch_size=batch))
    wall = time.perf_counter() - t
    return {"wall_s": wall, "compile_s": res.compile_s, "init_s": res.init_s, "train_s": res.train_s,
            "compile_share": (res.compile_s + res.init_s) / wall, "val_accuracy": res.val_accuracy}


def versions() -> dict[str, str]:
    return {"jax": jax.__version__}
