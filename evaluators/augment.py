"""Batch augmentation inside the compiled step: random crop with padding, flip, mixup, cutmix.

Pure functions of a PRNG key and NHWC float arrays, safe under `jax.jit` and `lax.scan`, so an
epoch program augments every batch on the device with a key derived from the train state's
(key, step): a resumed run draws the same augmentations as an uninterrupted one.

Labels travel as soft targets (N, C) so that mixing can blend them; `mix` blends any per-row
arrays (targets, cached teacher logits) with the same weight and partner rows as the images.
`AugmentConfig` says which of them a training run applies (all off by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from search_spaces.errors import NasError


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations a run applies to each training batch (hashable: part of a compile key).

    crop: pad each side by this many pixels (zeros, i.e. the normalised mean) and crop back at a
      random offset per image; 0 = off.
    flip: random left-right flip per image (not for digits or letters).
    mixup: Beta(mixup, mixup) concentration of the mixing weight; 0 = off (Zhang et al. 2018).
    cutmix: Beta concentration for CutMix's box area (Yun et al. 2019); 0 = off. With both on, each
      batch uses one of the two, chosen with probability 1/2.
    """

    crop: int = 0
    flip: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        check_augment(self.__dict__, "augment")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "augment") -> "AugmentConfig":
        """Validate a mapping (e.g. `distill.augment`); errors name `{source}.{key}` and what is allowed."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise NasError(f"{source}: expected a mapping, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        values = {}
        for k, v in d.items():
            if k not in allowed:
                raise NasError(f"{source}.{k}: unknown key; allowed: {', '.join(allowed)}")
            if k in ("mixup", "cutmix") and isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise NasError(f"{source}.{k}: {v!r} is not a number") from None
            values[k] = v
        check_augment({**{f.name: f.default for f in fields(cls)}, **values}, source)
        return cls(**values)

    @property
    def mixes(self) -> bool:
        """Whether labels become soft (blended) targets."""
        return bool(self.mixup or self.cutmix)

    @property
    def active(self) -> bool:
        return bool(self.crop or self.flip or self.mixes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_augment(v: Mapping[str, Any], source: str) -> None:
    """Raise `NasError` naming `{source}.{key}` unless every augmentation setting is allowed."""
    crop = v["crop"]
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise NasError(f"{source}.crop: {crop!r}; allowed an integer >= 0 (padding pixels, 0 = off)")
    if not isinstance(v["flip"], bool):
        raise NasError(f"{source}.flip: {v['flip']!r}; allowed true or false")
    for k in ("mixup", "cutmix"):
        x = v[k]
        if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(x) or x < 0:
            raise NasError(f"{source}.{k}: {x!r}; allowed a number >= 0 (Beta concentration, 0 = off)")


# ============================================================ geometric
def crop_pad(key: jax.Array, x: jnp.ndarray, pad: int) -> jnp.ndarray:
    """Each image padded by `pad` zeros on every side, then cropped back to its size at a random offset."""
    if pad == 0:
        return x
    n, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(
        padded, offsets)


def flip(key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    """Each image flipped left-right with probability 1/2."""
    do = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)


# ============================================================ mixing
def mix(arrays: Mapping[str, jnp.ndarray], weight: jnp.ndarray, partner: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Every per-row array blended as `weight * a + (1 - weight) * a[partner]` (one weight per batch)."""
    return {k: weight * a + (1.0 - weight) * jnp.take(a, partner, axis=0) for k, a in arrays.items()}


def mixup(key: jax.Array, x: jnp.ndarray, targets: Mapping[str, jnp.ndarray],
          concentration: float) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Mixup: images and `targets` (soft labels, logits, ...) blended with a shuffled copy of the batch,
    with one weight lambda ~ Beta(concentration, concentration) for the batch."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, concentration, concentration)
    partner = jax.random.permutation(k_perm, x.shape[0])
    out = mix({"x": x, **targets}, lam, partner)
    return out.pop("x"), out


def box_mask(key: jax.Array, h: int, w: int, area: jnp.ndarray) -> jnp.ndarray:
    """(h, w) float mask, 1 inside a box of about `area` x (h*w) pixels centred uniformly at random
    (clipped at the borders), 0 elsewhere."""
    k_y, k_x = jax.random.split(key)
    side = jnp.sqrt(area)
    bh, bw = jnp.round(side * h), jnp.round(side * w)
    cy, cx = jax.random.uniform(k_y, (), maxval=h), jax.random.uniform(k_x, (), maxval=w)
    ys, xs = jnp.arange(h)[:, None] + 0.5, jnp.arange(w)[None, :] + 0.5
    inside = (jnp.abs(ys - cy) < bh / 2) & (jnp.abs(xs - cx) < bw / 2)
    return inside.astype(jnp.float32)


def cutmix(key: jax.Array, x: jnp.ndarray, targets: Mapping[str, jnp.ndarray],
           concentration: float) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """CutMix: a random box of each image replaced by the same box of a partner image; `targets`
    blended by the share of pixels kept (lambda ~ Beta(concentration, concentration) sets the box)."""
    k_lam, k_perm, k_box = jax.random.split(key, 3)
    lam = jax.random.beta(k_lam, concentration, concentration)
    partner = jax.random.permutation(k_perm, x.shape[0])
    _, h, w, _ = x.shape
    box = box_mask(k_box, h, w, 1.0 - lam)[None, :, :, None]
    kept = 1.0 - jnp.mean(box)
    mixed = x * (1.0 - box) + jnp.take(x, partner, axis=0) * box
    return mixed, mix(targets, kept, partner)


# ============================================================ a whole batch
def augment_batch(cfg: AugmentConfig, key: jax.Array, x: jnp.ndarray,
                  targets: Mapping[str, jnp.ndarray]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`cfg`'s augmentations applied to one batch: crop, flip (per image), then mixup or cutmix (per
    batch) with `targets` (per-row arrays) blended alike. Static in `cfg`: switched-off steps cost nothing."""
    k_crop, k_flip, k_mix, k_which = jax.random.split(key, 4)
    if cfg.crop:
        x = crop_pad(k_crop, x, cfg.crop)
    if cfg.flip:
        x = flip(k_flip, x)
    targets = dict(targets)
    if cfg.mixup and cfg.cutmix:
        return jax.lax.cond(jax.random.bernoulli(k_which),
                            lambda: mixup(k_mix, x, targets, cfg.mixup),
                            lambda: cutmix(k_mix, x, targets, cfg.cutmix))
    if cfg.mixup:
        return mixup(k_mix, x, targets, cfg.mixup)
    if cfg.cutmix:
        return cutmix(k_mix, x, targets, cfg.cutmix)
    return x, targets
