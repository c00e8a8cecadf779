"""Training objectives as pure functions of arrays: cross-entropy (hard or soft targets), Hinton
distillation, function matching on a shared view, hints.

Every loss returns a scalar mean over the batch and is safe under `jax.jit` and `jax.grad`.
Hyperparameters (temperature, alpha, label smoothing) are plain Python floats, checked
when the loss is called (at trace time under jit), so a bad value fails with a `NasError`.
"""

from __future__ import annotations

from numbers import Real

import jax
import jax.numpy as jnp

from search_spaces.errors import NasError


def _check_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise NasError(f"label_smoothing: {label_smoothing!r}; allowed a number in [0, 1)")
    return float(label_smoothing)


def check_kd(temperature: float, alpha: float, source: str = "kd", *, beta: float = 0.0) -> None:
    """Raise `NasError` unless temperature > 0, 0 <= alpha <= 1 and beta (hint weight) >= 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature > 0:
        raise NasError(f"{source}.temperature: {temperature!r}; allowed a number > 0")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
        raise NasError(f"{source}.alpha: {alpha!r}; allowed a number in [0, 1]")
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= beta < float("inf"):
        raise NasError(f"{source}.beta: {beta!r}; allowed a number >= 0")


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Mean softmax cross-entropy of integer `labels`, with optional label smoothing."""
    ls = _check_smoothing(label_smoothing)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if ls:
        targets = targets * (1.0 - ls) + ls / num_classes
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def soft_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Mean cross-entropy against soft `targets` (N, C) rows summing to 1 (e.g. mixup's blended labels)."""
    ls = _check_smoothing(label_smoothing)
    targets = targets.astype(logits.dtype)
    if ls:
        targets = targets * (1.0 - ls) + ls / logits.shape[-1]
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def function_matching(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, targets: jnp.ndarray,
                      temperature: jnp.ndarray | float, alpha: jnp.ndarray | float,
                      label_smoothing: float = 0.0) -> jnp.ndarray:
    """Distillation on one (augmented, possibly mixed) view that teacher and student both saw:
    alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(soft targets), batch mean.

    alpha = 1 is pure function matching (Beyer et al. 2022): no labels at all. The teacher is a constant.
    """
    teacher = jax.lax.stop_gradient(teacher_logits).astype(student_logits.dtype)
    log_p_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
    return alpha * temperature * temperature * kl + (1.0 - alpha) * soft_cross_entropy(
        student_logits, targets, label_smoothing)


def kd_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, labels: jnp.ndarray, *,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Hinton distillation: alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(labels), batch mean.

    The teacher is treated as a constant (no gradient flows into `teacher_logits`).
    """
    check_kd(temperature, alpha)
    return distillation(student_logits, teacher_logits, labels, float(temperature), float(alpha),
                        _check_smoothing(label_smoothing))


def distillation(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, labels: jnp.ndarray,
                 temperature: jnp.ndarray | float, alpha: jnp.ndarray | float,
                 label_smoothing: float = 0.0) -> jnp.ndarray:
    """`kd_loss` without argument checks; temperature and alpha may be traced arrays (one compile for all)."""
    teacher = jax.lax.stop_gradient(teacher_logits).astype(student_logits.dtype)
    log_p_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
    ce = cross_entropy(student_logits, labels, label_smoothing)
    return alpha * temperature * temperature * kl + (1.0 - alpha) * ce


def hint_loss(student_feats: jnp.ndarray, teacher_feats: jnp.ndarray,
              projection_kernel: jnp.ndarray) -> jnp.ndarray:
    """Mean squared error between `student_feats @ projection_kernel` and `teacher_feats`.

    Features may be (N, C) vectors or (N, H, W, C) maps; the projection is a learned
    (C_student, C_teacher) matrix applied to the last axis (a 1x1 convolution on maps).
    The teacher is treated as a constant.
    """
    cs, ct = student_feats.shape[-1], teacher_feats.shape[-1]
    if projection_kernel.shape != (cs, ct):
        raise NasError(f"hint_loss: projection kernel has shape {tuple(projection_kernel.shape)}; "
                       f"expected ({cs}, {ct}) for student width {cs} and teacher width {ct}")
    if student_feats.shape[:-1] != teacher_feats.shape[:-1]:
        raise NasError(f"hint_loss: student features {tuple(student_feats.shape)} and teacher features "
                       f"{tuple(teacher_feats.shape)} differ outside the channel axis")
    projected = jnp.einsum("...c,cd->...d", student_feats, projection_kernel)
    return jnp.mean(jnp.square(projected - jax.lax.stop_gradient(teacher_feats)))
