"""Training-time data augmentation as pure JAX functions of (key, batch), usable under jit and scan.

They run inside the compiled training step on the training batches only (never on validation or
test data), so the in-memory path keeps its one `lax.scan` per epoch and the streaming path gets
the very same augmentation with no second implementation. Batches are normalised NHWC floats:
zero padding and cut-out fill with 0, which is the training split's mean pixel.

`mixup` and `cutmix` mix pairs of images and their labels: `y` is one array (N, classes) or a
mapping of per-row arrays (soft labels, cached teacher logits, ...), all blended with the same
weight and partner rows as the images. `AugmentConfig.mixup`/`cutmix` switch them on for a run;
the step then trains on soft targets (`augment_batch`, `evaluators.teaching.Lesson`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping, TypeVar

import jax
import jax.numpy as jnp

from search_spaces.errors import NasError
from search_spaces.schema import spec

Targets = TypeVar("Targets")  # one (N, ...) array or a mapping of them


def random_crop(key: jax.Array, x: jnp.ndarray, padding: int) -> jnp.ndarray:
    """Each image zero-padded by `padding` pixels on every side, then cropped back to its size at a
    uniformly drawn offset (the CIFAR recipe: padding 4 at 32x32)."""
    if padding <= 0:
        return x
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def random_flip(key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    """Each image mirrored left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def cutout(key: jax.Array, x: jnp.ndarray, size: int) -> jnp.ndarray:
    """Each image with a `size` x `size` square (clipped at the borders) set to 0, centred at a
    uniformly drawn pixel (DeVries & Taylor, 2017)."""
    if size <= 0:
        return x
    n, h, w, _ = x.shape
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (n, 1), 0, h) - size // 2
    cx = jax.random.randint(kx, (n, 1), 0, w) - size // 2
    rows = (jnp.arange(h)[None] >= cy) & (jnp.arange(h)[None] < cy + size)  # (n, h)
    cols = (jnp.arange(w)[None] >= cx) & (jnp.arange(w)[None] < cx + size)  # (n, w)
    hole = rows[:, :, None] & cols[:, None, :]
    return jnp.where(hole[..., None], jnp.zeros((), x.dtype), x)


def mix(y: Targets, weight: jnp.ndarray, partner: jnp.ndarray) -> Targets:
    """Every per-row array of `y` blended as `weight * a + (1 - weight) * a[partner]` (one weight per batch)."""
    return jax.tree.map(lambda a: weight * a + (1 - weight) * jnp.take(a, partner, axis=0), y)


def mixup(key: jax.Array, x: jnp.ndarray, y: Targets, alpha: float) -> tuple[jnp.ndarray, Targets]:
    """(x, y) mixed with a shuffled copy of the batch by one weight lam ~ Beta(alpha, alpha)
    (Zhang et al., 2018); `y` holds one-hot or soft labels (N, classes), or a mapping of per-row arrays."""
    kl, kp = jax.random.split(key)
    lam = jax.random.beta(kl, alpha, alpha).astype(x.dtype)
    perm = jax.random.permutation(kp, x.shape[0])
    return lam * x + (1 - lam) * x[perm], mix(y, lam, perm)


def cutmix(key: jax.Array, x: jnp.ndarray, y: Targets, alpha: float) -> tuple[jnp.ndarray, Targets]:
    """A box of area (1 - lam) of each image replaced by the same box of a shuffled partner,
    lam ~ Beta(alpha, alpha), and the labels mixed by the box's actual area (Yun et al., 2019)."""
    n, h, w, _ = x.shape
    kl, kp, ky, kx = jax.random.split(key, 4)
    lam = jax.random.beta(kl, alpha, alpha)
    perm = jax.random.permutation(kp, n)
    bh = jnp.round(h * jnp.sqrt(1 - lam)).astype(jnp.int32)
    bw = jnp.round(w * jnp.sqrt(1 - lam)).astype(jnp.int32)
    cy, cx = jax.random.randint(ky, (), 0, h), jax.random.randint(kx, (), 0, w)
    y0, y1 = jnp.clip(cy - bh // 2, 0, h), jnp.clip(cy - bh // 2 + bh, 0, h)
    x0, x1 = jnp.clip(cx - bw // 2, 0, w), jnp.clip(cx - bw // 2 + bw, 0, w)
    rows = (jnp.arange(h) >= y0) & (jnp.arange(h) < y1)
    cols = (jnp.arange(w) >= x0) & (jnp.arange(w) < x1)
    box = (rows[:, None] & cols[None, :])[None, :, :, None]
    kept = 1 - ((y1 - y0) * (x1 - x0)) / (h * w)
    return jnp.where(box, x[perm], x), mix(y, kept.astype(x.dtype), perm)


@dataclass(frozen=True)
class AugmentConfig:
    """The training split's augmentation, declared in an experiment's `dataset.augment:`.

    crop_padding: pixels of zero padding before a random crop back to size (0: off).
    flip: random horizontal flips (leave off for digits and text, where mirroring changes the class).
    cutout: side of the square set to 0 at a random place (0: off).
    mixup: Beta(mixup, mixup) concentration of mixup's weight (0: off); the labels become soft targets.
    cutmix: Beta concentration of CutMix's box area (0: off). With both on, each batch uses one of
      the two, chosen with probability 1/2.
    Hashable: it is part of the compiled training program's cache key. Also a typed section of the
    one config builder (`search_spaces.schema.build`, e.g. `distill.augment`).
    """

    crop_padding: int = spec(0, ge=0)
    flip: bool = False
    cutout: int = spec(0, ge=0)
    mixup: float = spec(0.0, ge=0)
    cutmix: float = spec(0.0, ge=0)

    def __post_init__(self) -> None:
        for key in ("crop_padding", "cutout"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise NasError(f"augment.{key}: invalid value {v!r}; allowed an integer >= 0 (pixels; 0 = off)")
        if not isinstance(self.flip, bool):
            raise NasError(f"augment.flip: invalid value {self.flip!r}; allowed true or false")
        for key in ("mixup", "cutmix"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0:
                raise NasError(f"augment.{key}: invalid value {v!r}; allowed a number >= 0 (Beta concentration; 0 = off)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "augment") -> "AugmentConfig":
        """Validate a mapping (`dataset.augment:`); unknown keys and bad values name `{source}.{key}`."""
        if d is None:
            return cls()
        if isinstance(d, AugmentConfig):
            return d
        if not isinstance(d, Mapping):
            raise NasError(f"{source}: expected a mapping with keys crop_padding, flip, cutout, mixup, cutmix; got {d!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in allowed:
                raise NasError(f"{source}.{k}: unknown key; allowed: {', '.join(allowed)}")
        try:
            return cls(**d)
        except NasError as e:
            raise NasError(f"{source}.{str(e).removeprefix('augment.')}") from None

    @property
    def mixes(self) -> bool:
        """Whether the labels become soft (blended) targets."""
        return bool(self.mixup or self.cutmix)

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.cutout or self.mixes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __call__(self, key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
        """The augmented images: crop, then flip, then cut-out, each with its own key (no mixing: that
        needs the labels, see `augment_batch`)."""
        kc, kf, ko = jax.random.split(key, 3)
        x = random_crop(kc, x, self.crop_padding)
        if self.flip:
            x = random_flip(kf, x)
        return cutout(ko, x, self.cutout)


MIX_STREAM = 0x6D6978  # folded into the batch key for the mixing draws (the per-image ones keep `key`)


def augment_batch(cfg: AugmentConfig, key: jax.Array, x: jnp.ndarray, y: Targets) -> tuple[jnp.ndarray, Targets]:
    """`cfg`'s augmentations of one batch: the per-image ones (`cfg(key, x)`), then mixup or cutmix
    with the per-row `y` blended alike. Static in `cfg`: switched-off steps cost nothing."""
    x = cfg(key, x)
    if not cfg.mixes:
        return x, y
    k_mix, k_which = jax.random.split(jax.random.fold_in(key, MIX_STREAM))
    if cfg.mixup and cfg.cutmix:
        return jax.lax.cond(jax.random.bernoulli(k_which),
                            lambda: mixup(k_mix, x, y, cfg.mixup),
                            lambda: cutmix(k_mix, x, y, cfg.cutmix))
    if cfg.mixup:
        return mixup(k_mix, x, y, cfg.mixup)
    return cutmix(k_mix, x, y, cfg.cutmix)
