"""Optimizers, learning-rate schedules and the training configs (`TrainConfig`, `KDConfig`).

Optimizers and schedules are registries by name (Optax transformations); the configs are plain
frozen dataclasses validated once, at the edge, by `from_dict` (and again in `__post_init__`, so
a config built in code is checked too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from evaluators.losses import check_kd
from evaluators.packing import GROUPS
from search_spaces.errors import NasError
from search_spaces.ops import IMPLS
from search_spaces.registry import Registry

Schedule = Callable[[Any], Any]


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
