"""What a student is shown at each step: one augmented view of the batch and, when distilling, the
teacher's outputs on exactly that view.

`Lesson` is a hashable description (augmentation, online teacher, class count) that the epoch
program closes over: `lesson(batch, key, teacher_variables)` turns the gathered rows {'x', 'y',
maybe 'teacher'} into the batch the loss sees, inside the compiled step:

- 'x': the augmented images (crop, flip, cut-out, then mixup or cutmix; `evaluators.augment`);
- 'targets': soft labels (N, C), blended like the images, when the augmentation mixes;
- 'teacher': logits of the teacher on that same 'x' (`TeacherForward`: every member in evaluation
  mode, logits averaged over an ensemble's members), or, with cached logits, the stored logits of
  the original rows blended with the same weight and partners as the images.

Running the teacher on the student's own view is the "consistent teaching" of Beyer et al.
(CVPR 2022, function matching): with logits cached once on un-augmented rows, the student
matches the teacher on images it never sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from evaluators.augment import AugmentConfig, augment_batch
from search_spaces.architecture import Architecture
from search_spaces.model import build_model

AUGMENT_KEY = 0x5A  # folded into the state's key for augmentation draws (dropout folds the step alone)


@dataclass(frozen=True)
class TeacherForward:
    """A teacher's forward pass in evaluation mode: one or more member architectures whose logits
    are averaged. Hashable (a compile-cache key); the members' variables are passed in at run time,
    so one compiled program serves any weights of the same architectures."""

    archs: tuple[Architecture, ...]
    conv_impl: str = "fast"

    def __call__(self, variables: Sequence[Mapping[str, Any]], x: jnp.ndarray) -> jnp.ndarray:
        """Mean over members of `model.apply(variables_i, x, train=False)`; no gradient flows back."""
        outs = [build_model(a, self.conv_impl).apply(
            {"params": v["params"], "batch_stats": v["batch_stats"]}, x, train=False)
            for a, v in zip(self.archs, variables)]
        return jax.lax.stop_gradient(sum(outs) / len(outs))


@dataclass(frozen=True)
class Lesson:
    """How each gathered batch becomes the batch the loss sees (see the module docstring)."""

    augment: AugmentConfig = AugmentConfig()
    teacher: TeacherForward | None = None  # online teacher; None: cached logits (if any) or no teacher
    num_classes: int = 0  # needed when the augmentation mixes labels

    @property
    def active(self) -> bool:
        """Whether the lesson changes the gathered batch at all (else the step uses it as it is)."""
        return self.augment.enabled or self.teacher is not None

    @property
    def soft_targets(self) -> bool:
        """Whether the loss gets soft 'targets' instead of integer 'y'."""
        return self.augment.mixes

    def __call__(self, batch: Mapping[str, jnp.ndarray], key: jax.Array,
                 teacher_variables: Sequence[Mapping[str, Any]] | None = None) -> dict[str, jnp.ndarray]:
        per_row = {}
        if self.soft_targets:
            per_row["targets"] = jax.nn.one_hot(batch["y"], self.num_classes, dtype=jnp.float32)
        if "teacher" in batch and self.teacher is None:
            per_row["teacher"] = batch["teacher"]  # cached: blended alongside the labels
        x, per_row = augment_batch(self.augment, key, batch["x"], per_row)
        out = {**batch, "x": x, **per_row}
        if self.teacher is not None:
            out["teacher"] = self.teacher(teacher_variables, x)
        return out


def lesson_key(state_key: jax.Array, step: jnp.ndarray) -> jax.Array:
    """The augmentation key of one step: a function of the run's key and the step only, so a
    resumed run and the same-seed baseline draw exactly the same views."""
    return jax.random.fold_in(jax.random.fold_in(state_key, AUGMENT_KEY), step)
