"""Score candidates on a supernet's weights: inherited accuracy, pure functions, `jax.jit` at the boundary.

For each candidate, BatchNorm statistics are re-estimated on a fixed set of training images (OFA:
the shared statistics fit no single candidate), then validation (or test) accuracy is measured.
Candidates run `SCORE_CHUNK` at a time through one compiled program (`lax.map` over stacked
candidate arrays), so the number of compiled programs does not grow with the number of candidates.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evaluators.datasets import Dataset, pad_batches
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace
from search_spaces.supernet import Supernet, candidate, check_arch, stack_candidates

Variables = dict[str, Any]
SCORE_CHUNK = 8  # candidates per compiled scoring call (the last chunk is padded)
RECAL_BATCH = 250
# BatchNorm re-estimation images per candidate. OFA uses 2,000 (ImageNet); on mnist5k, 500 rank 40
# candidates as 2,000 do (Kendall tau vs 2,000 images 0.89, as for 1,000; tau against stand-alone
# training 0.275 vs 0.273) at 2.2x the candidates per CPU-minute (docs/supernet.md, benchmarks/supernet.py).
RECAL_IMAGES = 500


@functools.lru_cache(maxsize=4096)
def candidate_arrays(space: SearchSpace, arch: Architecture) -> dict:
    """`search_spaces.supernet.candidate`, cached: training and scoring draw the same candidates often."""
    return candidate(space, arch)


def _stats_of(net: Supernet, params: Any, stats0: Any, xs: jnp.ndarray, c: dict) -> Any:
    """BatchNorm statistics of candidate `c` over the batches `xs` (k, b, ...): the mean of the batch
    means and of the batch means of squares, var = E[x^2] - E[x]^2 (the statistics of all k*b images)."""
    def body(acc, xb):
        _, mom = net.apply({"params": params, "batch_stats": stats0}, xb, c, train=True, moments=True)
        return jax.tree.map(jnp.add, acc, mom), None

    zero = jax.tree.map(jnp.zeros_like, stats0)
    total, _ = jax.lax.scan(body, zero, xs)
    k = xs.shape[0]
    return _finish(total, k)


def _finish(total: Any, k: int) -> Any:
    out = {}
    for name, node in total.items():
        if "bn" in node and isinstance(node["bn"], dict) and "mean" in node["bn"]:
            m, m2 = node["bn"]["mean"] / k, node["bn"]["var"] / k
            out[name] = {"bn": {"mean": m, "var": jnp.maximum(m2 - m * m, 0.0)}}
        else:
            out[name] = _finish(node, k)
    return out


def _score_chunk(space: SearchSpace, params: Any, stats0: Any, recal: jnp.ndarray, xv: jnp.ndarray,
                 yv: jnp.ndarray, mv: jnp.ndarray, cands: dict) -> tuple[jnp.ndarray, Any]:
    """(correct counts, statistics) for stacked candidates: re-estimate BatchNorm, then evaluate."""
    net = Supernet(space)

    def one(c):
        stats = _stats_of(net, params, stats0, recal, c)

        def body(acc, inp):
            xb, yb, mb = inp
            logits = net.apply({"params": params, "batch_stats": stats}, xb, c, train=False)
            return acc + jnp.sum((jnp.argmax(logits, -1) == yb) * mb), None

        correct, _ = jax.lax.scan(body, jnp.float32(0), (xv, yv, mv))
        return correct, stats

    return jax.lax.map(one, cands)


@functools.lru_cache(maxsize=8)
def _score_program(space: SearchSpace):
    return jax.jit(functools.partial(_score_chunk, space))


def _recal_batches(data: Dataset, n_images: int, batch: int) -> np.ndarray:
    n = min(int(n_images), len(data.y_train))
    b = min(batch, n)
    k = max(1, n // b)
    rows = np.random.default_rng(0).permutation(len(data.y_train))[:k * b]  # fixed rows: comparable scores
    return np.asarray(data.x_train)[np.sort(rows)].reshape(k, b, *data.input_shape)


def _val_batches(x: np.ndarray, y: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = max(1, -(-len(y) // batch))
    b = -(-len(y) // k)
    xp, n = pad_batches(np.asarray(x), b)
    yp, _ = pad_batches(np.asarray(y), b)
    mask = (np.arange(k * b) < n).astype(np.float32)
    return xp.reshape(k, b, *xp.shape[1:]), yp.reshape(k, b), mask.reshape(k, b)


def _run_chunks(space: SearchSpace, variables: Variables, archs: Sequence[Architecture], recal: np.ndarray,
                val: tuple[np.ndarray, np.ndarray, np.ndarray], chunk: int) -> tuple[np.ndarray, list[Any]]:
    for a in archs:
        check_arch(space, a)
        if a.resolution != recal.shape[2]:
            raise NasError(f"supernet: architecture '{a.key}' has resolution {a.resolution}; the data is "
                           f"{recal.shape[2]}x{recal.shape[2]}")
    program = _score_program(space)
    params = jax.device_put(variables["params"])
    stats0 = jax.device_put(variables["batch_stats"])
    recal_d, val_d = jax.device_put(recal), jax.device_put(val)
    correct, stats = [], []
    pad = candidate_arrays(space, archs[0]) if archs else None
    for i in range(0, len(archs), chunk):
        part = [candidate_arrays(space, a) for a in archs[i:i + chunk]]
        real = len(part)
        part += [pad] * (chunk - real)
        c, s = program(params, stats0, recal_d, *val_d, stack_candidates(part))
        correct.append(np.asarray(c)[:real])
        s = jax.device_get(s)
        stats += [jax.tree.map(lambda a, j=j: np.asarray(a[j]), s) for j in range(real)]
    return (np.concatenate(correct) if correct else np.zeros(0)), stats


def recalibrate(space: SearchSpace, variables: Variables, archs: Sequence[Architecture], data: Dataset,
                n_images: int = RECAL_IMAGES, *, batch: int = RECAL_BATCH, chunk: int = SCORE_CHUNK) -> list[Variables]:
    """BatchNorm statistics re-estimated on `n_images` training images (capped at the split) for each
    candidate (OFA), as full supernet 'batch_stats' trees (entries a candidate does not use are zero)."""
    _, stats = _run_chunks(space, variables, list(archs), _recal_batches(data, n_images, batch),
                           _val_batches(data.x_val[:1], data.y_val[:1], 1), chunk)
    return stats


def score(space: SearchSpace, variables: Variables, archs: Sequence[Architecture], data: Dataset, *,
          n_images: int | None = None, batch: int = RECAL_BATCH, chunk: int = SCORE_CHUNK,
          split: str = "val") -> np.ndarray:
    """Inherited accuracy of each candidate on the whole validation split (or `split='test'`), after
    re-estimating its BatchNorm statistics on `n_images` training images (default RECAL_IMAGES, capped at the
    split). Candidates run `chunk` at a time through one compiled program: the number of compiled
    programs does not depend on how many candidates are scored.

    Example:
      >>> acc = score(space, load_supernet(path).variables, [space.sample(rng) for _ in range(100)], data)
    """
    return score_with_statistics(space, variables, archs, data, n_images=n_images, batch=batch, chunk=chunk,
                                 split=split)[0]


def score_with_statistics(space: SearchSpace, variables: Variables, archs: Sequence[Architecture], data: Dataset,
                          *, n_images: int | None = None, batch: int = RECAL_BATCH, chunk: int = SCORE_CHUNK,
                          split: str = "val") -> tuple[np.ndarray, list[Any]]:
    """`score`, and each candidate's re-estimated statistics (full supernet 'batch_stats' trees), from the
    same compiled program as `score` (`recalibrate` evaluates one image, so it compiles another)."""
    if split not in ("val", "test"):
        raise NasError(f"score: split {split!r}; allowed val, test")
    x, y = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    correct, stats = _run_chunks(space, variables, list(archs),
                                 _recal_batches(data, n_images or RECAL_IMAGES, batch), _val_batches(x, y, batch), chunk)
    return correct / len(y), stats
