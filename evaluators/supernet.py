"""Train a weight-sharing supernet: pure functions, `jax.jit` at the boundary.

Training (`train_supernet`) follows the sandwich rule with in-place distillation (BigNAS,
AttentiveNAS): every step trains the largest candidate, the smallest and N random ones on one
batch, summing their gradients; the largest learns from the labels, the others also from the
largest's soft targets (stop-gradient). The candidates of a step are stacked arrays
(`search_spaces.supernet.candidate`), scanned inside ONE compiled step, itself scanned over the
epoch, so one program trains every candidate and `lax.switch` runs only each one's own branches.
Optionally the elastic dimensions open one after another (OFA's progressive shrinking: kernel,
then depth, then expansion, then width and op type), and at the end of every epoch each channel
group is re-ordered by importance so that narrow candidates use the strongest channels.

Scoring a candidate on the trained weights (BatchNorm re-estimation, then accuracy) is
`evaluators.supernet_score`; `save_supernet`/`load_supernet` write and read a trained supernet.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from evaluators.datasets import Dataset, epoch_indices
from evaluators.supernet_score import RECAL_IMAGES, candidate_arrays, score, score_with_statistics
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.schema import build, spec
from search_spaces.space import SearchSpace
from search_spaces.supernet import Supernet, channel_importance, extreme, initialize, permute_channels, stack_candidates

Variables = dict[str, Any]
PHASES = ("largest", "kernel", "depth", "expansion", "all")  # progressive shrinking, in order


# ==================================================================== config
@dataclass(frozen=True)
class SupernetConfig:
    """How a supernet is trained: the `supernet:` section of an experiment (built by
    `search_spaces.schema.build`, the project's one config builder)."""

    epochs: int = spec(10, ge=1)
    batch_size: int = spec(64, ge=1)
    learning_rate: float = spec(3e-3, gt=0)
    optimizer: str = spec("adamw", choices=("adamw", "adam", "sgd"), what="optimizer")
    weight_decay: float = spec(1e-4, ge=0)
    # random candidates per step besides the largest and the smallest; on mnist5k 2 / 4 / 8 ranked 40
    # candidates at Kendall tau 0.204 / 0.271 / 0.307 against training, for 488 / 759 / 1,213 s of
    # training over 15 epochs (docs/supernet.md): 4 is the default, 8 when the time is there.
    candidates_per_step: int = spec(4, ge=0)
    # in-place distillation weight for all but the largest (1 = soft targets only, 0 = labels only). On
    # mnist5k, 4 per step, 2 seeds each: 0 ranked 40 candidates at tau 0.315 / 0.308 against training, 1 at
    # 0.271 / 0.253, for the same training time (docs/supernet.md): 0 is the default
    kd_weight: float = spec(0.0, ge=0, le=1)
    kd_temperature: float = spec(1.0, gt=0)
    progressive: bool = False  # OFA progressive shrinking over the epochs
    # How a random candidate picks each layer's op: 'uniform' draws among all op options, so a block
    # with more variants (mb: 12 in mobile_small, ds: 2) is trained that many times more often;
    # 'block' draws the block (ds/mb/skip) uniformly, then its kernel/expansion/SE. On mnist5k 'block'
    # ranked no better (tau 0.210 vs 0.204) and lowered mean inherited accuracy (0.82 vs 0.92).
    op_sampling: str = spec("uniform", choices=("uniform", "block"), what="op sampling")
    sort_channels: bool = True  # re-order channel groups by importance after every epoch
    recalibration_images: int = spec(RECAL_IMAGES, ge=1)  # BatchNorm re-estimation images per candidate (capped at the train split)
    seed: int = spec(0, ge=0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "supernet") -> "SupernetConfig":
        """Validate a mapping; `source` is 'FILE: KEY' or just 'KEY' (one-line `NasError` naming the key)."""
        file, _, key = source.rpartition(": ")
        return build(cls, {} if d is None else d, file, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


_OPTIMIZERS: dict[str, Callable[[Any, float], optax.GradientTransformation]] = {
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd, mask=_decay_mask),
    "adam": lambda lr, wd: optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), optax.adam(lr)),
    "sgd": lambda lr, wd: optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask),
                                      optax.sgd(lr, momentum=0.9, nesterov=True)),
}


# ==================================================================== sampling candidates
def phase(cfg: SupernetConfig, epoch: int) -> str:
    """The progressive-shrinking phase of `epoch` (1-based): PHASES spread evenly over the epochs, the
    last epoch always 'all' (with fewer epochs than phases the first phases are the ones left out)."""
    if not cfg.progressive:
        return "all"
    return PHASES[-(-epoch * len(PHASES) // cfg.epochs) - 1]


_OPEN = {"largest": set(), "kernel": {"kernel"}, "depth": {"kernel", "depth"},
         "expansion": {"kernel", "depth", "expansion"}, "all": {"kernel", "depth", "expansion", "width", "op"}}


def sample_arch(space: SearchSpace, rng: np.random.Generator | None, stage: str = "all",
                mode: str = "random", op_sampling: str = "uniform") -> Architecture:
    """A random (`mode='random'`), smallest ('min') or largest ('max') architecture among those the
    progressive-shrinking `stage` has opened (the others keep the largest architecture's choice).
    A random op is drawn block first (`op_sampling='block'`) or among all op options ('uniform')."""
    largest = space.to_choices(extreme(space, largest=True))
    open_ = _OPEN[stage]
    choices = {}
    for d in space.decisions():
        n = len(d.options)
        if d.name.endswith(".op"):
            big = d.options[largest[d.name]]
            dims = {"kernel": lambda o: o.kernel, "expansion": lambda o: (o.expansion, o.se),
                    "op": lambda o: (o.block, o.act)}
            allowed = [i for i in range(n) if all(f(d.options[i]) == f(big) for k, f in dims.items() if k not in open_)]
            rank = lambda i: (("skip", "ds", "mb").index(d.options[i].block), d.options[i].expansion,  # noqa: E731
                              d.options[i].kernel, d.options[i].se)
        else:
            dim = "depth" if d.name.endswith(".depth") else "width"
            allowed = list(range(n)) if dim in open_ or d.name == "resolution" else [largest[d.name]]
            rank = lambda i: d.options[i]  # noqa: E731
        if mode == "random":
            if d.name.endswith(".op") and op_sampling == "block":
                blocks = sorted({d.options[i].block for i in allowed})
                block = blocks[rng.integers(len(blocks))]
                allowed = [i for i in allowed if d.options[i].block == block]
            choices[d.name] = int(allowed[rng.integers(len(allowed))])
        else:
            choices[d.name] = (min if mode == "min" else max)(allowed, key=rank)
    return space.from_choices(choices)


# ==================================================================== state
@dataclass(frozen=True)
class SupernetResult:
    """What `train_supernet` returns: NumPy variables (batch_stats re-estimated for the largest
    candidate), one history dict per epoch, and timings."""

    variables: Variables
    history: list[dict[str, float]]
    train_s: float
    compile_s: float


def _loss_terms(logits, teacher, y, kd_weight, temperature, is_student):
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    t = jax.lax.stop_gradient(teacher)
    log_pt = jax.nn.log_softmax(t / temperature)
    log_ps = jax.nn.log_softmax(logits / temperature)
    kd = jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)) * temperature ** 2
    w = kd_weight * is_student
    return (1.0 - w) * ce + w * kd


def _train_epoch(space: SearchSpace, tx: optax.GradientTransformation, state: dict, stats: Variables,
                 x: jnp.ndarray, y: jnp.ndarray, idx: jnp.ndarray, cands: dict, hp: dict) -> tuple[dict, jnp.ndarray]:
    """One epoch: scan over steps; each step scans over its stacked candidates (largest first),
    sums their gradients and takes one optimizer step. Returns (state, losses (steps, candidates))."""
    net = Supernet(space)

    def step(st, inp):
        rows, step_cands = inp
        xb, yb = jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0)
        key = jax.random.fold_in(st["key"], st["step"])

        def one(carry, c_i):
            grads, teacher = carry
            c, i = c_i

            def loss_fn(params):
                logits = net.apply({"params": params, "batch_stats": stats}, xb, c, train=True,
                                   rngs={"dropout": jax.random.fold_in(key, i)})
                return _loss_terms(logits, teacher, yb, hp["kd_weight"], hp["kd_temperature"],
                                   (i > 0).astype(jnp.float32)), logits

            (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
            teacher = jnp.where(i == 0, jax.lax.stop_gradient(logits), teacher)
            return (jax.tree.map(jnp.add, grads, g), teacher), loss

        n = jax.tree.leaves(step_cands)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, st["params"])
        teacher0 = jnp.zeros((xb.shape[0], space.num_classes), jnp.float32)
        (grads, _), losses = jax.lax.scan(one, (zeros, teacher0), (step_cands, jnp.arange(n)))
        updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
        params = optax.apply_updates(st["params"], updates)
        return {**st, "params": params, "opt_state": opt_state, "step": st["step"] + 1}, losses

    return jax.lax.scan(step, state, (idx, cands))


@functools.lru_cache(maxsize=4)
def _epoch_program(space: SearchSpace, cfg: SupernetConfig, steps: int):
    tx = _optimizer(cfg, steps)
    return tx, jax.jit(functools.partial(_train_epoch, space, tx), donate_argnums=0)


def _optimizer(cfg: SupernetConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = optax.cosine_decay_schedule(cfg.learning_rate, max(1, cfg.epochs * steps_per_epoch))
    return _OPTIMIZERS[cfg.optimizer](lr, cfg.weight_decay)


def _permute_state(space: SearchSpace, state: dict, perms: list[np.ndarray]) -> dict:
    """Re-order every channel group in the parameters and in every parameter-shaped optimizer tree."""
    treedef = jax.tree.structure(state["params"])

    def walk(node):
        if isinstance(node, dict) and jax.tree.structure(node) == treedef:
            return permute_channels(space, node, perms)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(c) for c in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(c) for c in node)
        return node

    return {**state, "params": permute_channels(space, state["params"], perms), "opt_state": walk(state["opt_state"])}


def train_supernet(space: SearchSpace, data: Dataset, cfg: SupernetConfig, *,
                   on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                   checkpoint: Callable[[int, bytes], None] | None = None,
                   resume_from: bytes | None = None, init_variables: Variables | None = None) -> SupernetResult:
    """Train the supernet of `space` on `data` (sandwich rule + in-place distillation).

    Args:
      space: the search space; one input resolution, matching `data` (use `space.with_input`).
      data: the dataset.
      cfg: the supernet training config.
      on_epoch: called as `on_epoch(epoch, metrics)` after every epoch (1-based); metrics hold
        'train_loss' (the largest candidate's), 'train_loss_student', 'val_accuracy_largest',
        'val_accuracy_smallest' (inherited, BatchNorm re-estimated), 'phase' index and 'epoch_s'.
      checkpoint: called as `checkpoint(epoch, blob)` after `on_epoch`: the whole training state as bytes.
      resume_from: such a blob; training continues after its epoch as if never stopped.
      init_variables: supernet variables to start from instead of a fresh initialisation.

    Returns:
      A `SupernetResult`; its batch_stats are the largest candidate's, re-estimated.
    """
    if len(space.resolutions) != 1 or space.resolutions[0] != data.resolution \
            or space.in_channels != data.channels or space.num_classes != data.num_classes:
        raise NasError(f"supernet: space '{space.name}' expects {list(space.resolutions)}x{space.in_channels} inputs "
                       f"with {space.num_classes} classes; dataset '{data.name}' has {data.resolution}x"
                       f"{data.channels} with {data.num_classes} (set space_input; training takes one resolution)")
    n = len(data.y_train)
    if cfg.batch_size > n:
        raise NasError(f"supernet.batch_size: {cfg.batch_size} exceeds the {n} training rows of '{data.name}'")
    steps = n // cfg.batch_size
    variables = init_variables or initialize(space, cfg.seed)
    tx, program = _epoch_program(space, dataclasses.replace(cfg, seed=0), steps)
    params = jax.device_put(variables["params"])
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "key": jax.random.PRNGKey(cfg.seed)}
    stats = jax.device_put(variables["batch_stats"])
    rng = np.random.default_rng([cfg.seed, 2])
    history: list[dict[str, float]] = []
    first = 1
    if resume_from is not None:
        state, history, first = _restore(resume_from, state, rng)
    x, y = jax.device_put(data.x_train), jax.device_put(data.y_train)
    hp = {"kd_weight": jnp.float32(cfg.kd_weight), "kd_temperature": jnp.float32(cfg.kd_temperature)}
    n_recal = min(cfg.recalibration_images, n)
    compile_s = 0.0
    t_train = time.perf_counter()
    for epoch in range(first, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        stage = phase(cfg, epoch)
        idx = epoch_indices(n, cfg.batch_size, rng)
        cands = stack_candidates([stack_candidates(_step_candidates(space, rng, stage, cfg.candidates_per_step,
                                                                    cfg.op_sampling))
                                  for _ in range(steps)])
        if epoch == first:
            tc = time.perf_counter()
            compiled = program.lower(state, stats, x, y, idx, cands, hp).compile()
            compile_s = time.perf_counter() - tc
        state, losses = compiled(state, stats, x, y, jnp.asarray(idx), cands, hp)
        losses = np.asarray(losses)
        if not np.all(np.isfinite(losses)):
            raise NasError(f"supernet training diverged at epoch {epoch} (loss {losses[~np.isfinite(losses)][0]}); "
                           f"lower supernet.learning_rate ({cfg.learning_rate:g})")
        if cfg.sort_channels:
            state = jax.device_put(_permute_state(space, jax.device_get(state),
                                                  channel_importance(space, jax.device_get(state["params"]))))
        current = {"params": jax.device_get(state["params"]), "batch_stats": variables["batch_stats"]}
        ends = [sample_arch(space, None, stage, "max"), sample_arch(space, None, stage, "min")]
        acc = score(space, current, ends, data, n_images=n_recal)
        metrics = {"train_loss": float(losses[:, 0].mean()), "train_loss_student": float(losses[:, 1:].mean())
                   if losses.shape[1] > 1 else float("nan"), "val_accuracy_largest": float(acc[0]),
                   "val_accuracy_smallest": float(acc[1]), "phase": float(PHASES.index(stage)),
                   "epoch_s": time.perf_counter() - t_epoch}
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, dict(metrics))
        if checkpoint is not None:
            checkpoint(epoch, _blob(state, history, epoch, rng))
    if not history:
        raise NasError(f"resume_from: the saved state is already past the last epoch ({cfg.epochs})")
    params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    # the per-epoch scoring program, so training compiles nothing more for this
    _, (stats_big,) = score_with_statistics(space, {"params": params, "batch_stats": variables["batch_stats"]},
                                            [extreme(space, largest=True)], data, n_images=n_recal)
    return SupernetResult({"params": params, "batch_stats": stats_big}, history,
                          time.perf_counter() - t_train, compile_s)


def _step_candidates(space: SearchSpace, rng: np.random.Generator, stage: str, n_random: int,
                     op_sampling: str) -> list[dict]:
    archs = [sample_arch(space, None, stage, "max"), sample_arch(space, None, stage, "min")]
    archs += [sample_arch(space, rng, stage, op_sampling=op_sampling) for _ in range(n_random)]
    return [candidate_arrays(space, a) for a in archs]


def _blob(state: dict, history: list[dict], epoch: int, rng: np.random.Generator) -> bytes:
    return flax.serialization.msgpack_serialize({
        "state": flax.serialization.to_state_dict(jax.device_get(state)), "epoch": epoch,
        "history": json.dumps(history), "rng": json.dumps(rng.bit_generator.state)})


def _restore(blob: bytes, state: dict, rng: np.random.Generator) -> tuple[dict, list[dict], int]:
    try:
        d = flax.serialization.msgpack_restore(blob)
        restored = flax.serialization.from_state_dict(jax.device_get(state), d["state"])
        rng.bit_generator.state = json.loads(d["rng"])
        return jax.device_put(restored), json.loads(d["history"]), int(d["epoch"]) + 1
    except (KeyError, ValueError, TypeError) as e:
        raise NasError(f"resume_from: not a supernet training state of this space/config ({e})") from None


# ==================================================================== persistence
WEIGHTS, MANIFEST = "weights.msgpack", "manifest.json"


@dataclass(frozen=True)
class SavedSupernet:
    """A trained supernet read back: its space (input override applied), variables and manifest."""

    space: SearchSpace
    variables: Variables
    manifest: dict[str, Any]


def save_supernet(folder: str | os.PathLike, space: SearchSpace, variables: Variables, *,
                  space_ref: str, space_input: Mapping[str, int] | None = None,
                  config: SupernetConfig | None = None, history: list[dict] | None = None,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write `weights.msgpack` (Flax msgpack) and `manifest.json` (space name or file, input override,
    config, history) into `folder`, atomically per file. `space_ref` is what `load_space` takes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(variables)))
    _atomic(folder / WEIGHTS, blob)
    manifest = {"format": 1, "space": space_ref, "space_name": space.name, "space_input": dict(space_input or {}),
                "config": config.to_dict() if config else None, "history": history or [],
                "largest": extreme(space, True).key, **(extra or {})}
    _atomic(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
    return folder


def load_supernet(folder: str | os.PathLike, space_loader: Callable[[str], SearchSpace]) -> SavedSupernet:
    """Read a folder written by `save_supernet`; `space_loader` resolves the manifest's space reference
    (e.g. `search_spaces.catalog.load_space`). Missing/corrupt files are one-line `NasError`s."""
    folder = Path(folder)
    for name in (MANIFEST, WEIGHTS):
        if not (folder / name).is_file():
            raise NasError(f"{folder}: no trained supernet ({name} missing); run `nas supernet train` first")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        space = space_loader(manifest["space"])
    except (json.JSONDecodeError, KeyError) as e:
        raise NasError(f"{folder / MANIFEST}: not a supernet manifest ({e})") from None
    if manifest.get("space_input"):
        space = space.with_input(**manifest["space_input"])
    try:
        variables = flax.serialization.msgpack_restore((folder / WEIGHTS).read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise NasError(f"{folder / WEIGHTS}: not a Flax msgpack file ({type(e).__name__})") from None
    return SavedSupernet(space, variables, manifest)


def _atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
