"""Packed parameters: a parameter tree held as two flat vectors (see `Packing`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from evaluators.variables import plain_tree


GROUPS = ("kernels", "others")
STATS_GROUP = GROUPS[1]  # where `Packing.of(batch_stats)` puts the (rank-1) running statistics


@dataclass(frozen=True)
class Packing:
    """Where each trained parameter lives in two flat vectors: 'kernels' (conv and dense kernels,
    the weight-decayed ones) and 'others' (biases, BatchNorm scales and offsets).

    The train state and the optimizer hold the two vectors; the step unpacks them into the
    model's tree (static slices, fused into their consumers). XLA:CPU compiles a kernel per
    parameter leaf and per optimizer update otherwise, and compile time follows the number of
    kernels: packing cut a mobile_small candidate's epoch program from 429 to 334 kernels and
    its compile by about a fifth, with steps as fast (same-process A/B; docs/performance.md).
    """

    leaves: tuple[tuple[tuple[str, ...], str, int, tuple[int, ...]], ...]  # (path, group, offset, shape)
    sizes: tuple[int, ...]  # length of each group's vector, in GROUPS order

    @classmethod
    def of(cls, tree: Mapping[str, Any], by_name: bool = False) -> "Packing":
        """The packing of a parameter tree (arrays or ShapeDtypeStructs), leaves in path order, or
        with `by_name` grouped by leaf name first (all 'mean's, then all 'var's, each in path order)."""
        offsets = dict.fromkeys(GROUPS, 0)
        leaves = []
        order = (lambda kv: (kv[0][-1], kv[0])) if by_name else (lambda kv: kv[0])
        for path, leaf in sorted(flax.traverse_util.flatten_dict(plain_tree(tree)).items(), key=order):
            shape = tuple(leaf.shape)
            group = GROUPS[0] if len(shape) > 1 else GROUPS[1]
            leaves.append((path, group, offsets[group], shape))
            offsets[group] += math.prod(shape)
        return cls(tuple(leaves), tuple(offsets[g] for g in GROUPS))

    def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {g: jax.ShapeDtypeStruct((n,), jnp.float32) for g, n in zip(GROUPS, self.sizes)}

    def pack(self, tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The tree's leaves copied into the two float32 vectors (NumPy)."""
        flat = flax.traverse_util.flatten_dict(plain_tree(tree))
        out = {g: np.empty(n, np.float32) for g, n in zip(GROUPS, self.sizes)}
        for path, group, offset, shape in self.leaves:
            out[group][offset:offset + math.prod(shape)] = np.asarray(flat[path], np.float32).reshape(-1)
        return out

    def pack_traced(self, tree: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
        """`pack` inside a traced function: one concatenation per vector."""
        flat = flax.traverse_util.flatten_dict(plain_tree(tree))
        return {g: jnp.concatenate([jnp.ravel(flat[path]) for path, group, _, _ in self.leaves if group == g]
                                   or [jnp.zeros((0,), jnp.float32)]) for g in GROUPS}

    def unpack(self, packed: Mapping[str, Any]) -> dict[str, Any]:
        """The parameter tree back from the vectors: NumPy in, NumPy out; traced in, traced out."""
        return flax.traverse_util.unflatten_dict({
            path: packed[group][offset:offset + math.prod(shape)].reshape(shape)
            for path, group, offset, shape in self.leaves})
