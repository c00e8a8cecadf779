"""Exact analytic cost of an architecture: parameters, MACs, activation memory, weight bytes.

Parameters count trainable values: conv and dense weights, dense biases, BatchNorm scale and
bias (not its running statistics). MACs count multiply-accumulates of conv and dense layers
(the convention of NAS-Bench-Macro's `flops`). Activation memory is the peak, over operators
executed one at a time at batch 1, of input + output + any residual input kept alive
(BatchNorm, activations, residual adds and SE scaling run in place).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from search_spaces.architecture import Architecture
from search_spaces.graph import OpSpec, layer_names, network_ops

FP32 = 4
WEIGHT_KINDS = ("conv", "pwconv", "dwconv", "dense")


def op_params(op: OpSpec) -> int:
    """Trainable parameters of one operator."""
    if op.kind in ("conv", "pwconv"):
        return op.kernel * op.kernel * op.in_shape[-1] * op.out_shape[-1]
    if op.kind == "dwconv":
        return op.kernel * op.kernel * op.in_shape[-1]
    if op.kind == "dense":
        return op.in_shape[-1] * op.out_shape[-1] + (op.out_shape[-1] if op.bias else 0)
    if op.kind == "bn":
        return 2 * op.out_shape[-1]
    return 0


def op_macs(op: OpSpec) -> int:
    """Multiply-accumulates of one operator (conv and dense only)."""
    if op.kind in ("conv", "pwconv", "dwconv", "dense"):
        out_pixels = math.prod(op.out_shape[:-1]) if len(op.out_shape) == 3 else 1
        per_output = op.kernel * op.kernel * (1 if op.kind == "dwconv" else op.in_shape[-1])
        return per_output * op.out_shape[-1] * out_pixels
    return 0


IN_PLACE = ("bn", "act", "add", "mul")


def op_activation_elems(op: OpSpec) -> int:
    """Live elements while `op` runs: input + output (one buffer for in-place elementwise ops)
    + a residual input kept alive."""
    inputs = 0 if op.kind in IN_PLACE else math.prod(op.in_shape)
    return inputs + math.prod(op.out_shape) + op.held


def op_int8_bytes(op: OpSpec) -> int:
    """Bytes after int8 quantisation: int8 weights; per-output-channel fp32 scale and bias
    (BatchNorm folds into them); BatchNorm itself then costs nothing."""
    if op.kind in WEIGHT_KINDS:
        weights = op_params(op) - (op.out_shape[-1] if op.bias else 0)
        return weights + 2 * FP32 * op.out_shape[-1]
    return 0


@dataclass(frozen=True)
class LayerCost:
    index: int
    name: str
    params: int
    macs: int
    activation_bytes: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class CostReport:
    params: int
    macs: int
    activation_bytes: int
    weight_bytes: dict[str, int]
    layers: tuple[LayerCost, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(l) | {"output_shape": list(l.output_shape)} for l in self.layers]
        return d


@functools.lru_cache(maxsize=8192)
def analytic_cost(arch: Architecture) -> CostReport:
    """Per-layer and total cost of `arch`, computed from its operator list.

    Memoised per Architecture (a frozen, hashable value): the objective reads several costs of
    the same candidate, and strategies screen every key of small spaces for feasibility."""
    ops = network_ops(arch)
    names = layer_names(arch)
    layers = []
    for idx, name in enumerate(names):
        mine = [o for o in ops if o.layer == idx]
        if not mine:  # an identity skip layer: no operators at all
            prev = layers[-1].output_shape
            layers.append(LayerCost(idx, name, 0, 0, 0, prev))
            continue
        layers.append(LayerCost(
            idx, name,
            params=sum(op_params(o) for o in mine),
            macs=sum(op_macs(o) for o in mine),
            activation_bytes=max(op_activation_elems(o) for o in mine) * FP32,
            output_shape=mine[-1].out_shape,
        ))
    params = sum(l.params for l in layers)
    return CostReport(
        params=params,
        macs=sum(l.macs for l in layers),
        activation_bytes=max(l.activation_bytes for l in layers),
        weight_bytes={"fp32": params * FP32, "int8": sum(op_int8_bytes(o) for o in ops)},
        layers=tuple(layers),
    )
