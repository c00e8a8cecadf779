"""The network as a flat list of operators with shapes: the one description cost models read.

The Flax builder (`model.py`) and this list describe the same network; tests check that the
parameter counts agree for sampled architectures of every space.
"""

from __future__ import annotations

from dataclasses import dataclass

from search_spaces.architecture import Architecture, Layer

Shape = tuple[int, ...]


@dataclass(frozen=True)
class OpSpec:
    """One operator. `kind` is conv (k x k), pwconv (1 x 1), dwconv, dense, bn, act, pool, add or mul."""

    layer: int  # 0 = stem, 1..n = blocks, n+1 = head conv, n+2 = classifier
    name: str
    kind: str
    in_shape: Shape
    out_shape: Shape
    kernel: int = 1
    stride: int = 1
    bias: bool = False
    act: str = ""
    held: int = 0  # elements kept alive alongside (the residual input of a block)


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a SAME-padded convolution."""
    return -(-size // stride)


class _Builder:
    def __init__(self) -> None:
        self.ops: list[OpSpec] = []

    def conv(self, layer, name, kind, shape, cout, kernel=1, stride=1, act="", held=0, bias=False, rank=None):
        """A conv + BN (+ act); with `rank`, a 1x1 conv factorized as `NAME.down` (cin -> rank, no BN)
        then NAME (rank -> cout, with the BN)."""
        h, w, c = shape
        out = (conv_out(h, stride), conv_out(w, stride), c if kind == "dwconv" else cout)
        if rank is not None:
            mid = (out[0], out[1], rank)
            self.ops.append(OpSpec(layer, name + ".down", kind, shape, mid, kernel, stride, held=held))
            shape, stride = mid, 1
        self.ops.append(OpSpec(layer, name, kind, shape, out, kernel, stride, bias, held=held))
        self.ops.append(OpSpec(layer, name + ".bn", "bn", out, out, held=held))
        if act:
            self.ops.append(OpSpec(layer, name + ".act", "act", out, out, act=act, held=held))
        return out


def layer_ops(b: _Builder, idx: int, layer: Layer, shape: Shape) -> Shape:
    """Append the operators of one block; return its output shape."""
    held = shape[0] * shape[1] * shape[2] if layer.residual else 0
    if layer.block == "skip":
        if layer.residual:
            return shape
        return b.conv(idx, "shortcut", "pwconv", shape, layer.out_channels, stride=layer.stride,
                      rank=layer.rank("shortcut"))
    if layer.block == "ds":
        x = b.conv(idx, "dw", "dwconv", shape, shape[2], layer.kernel, layer.stride, layer.act)
        return b.conv(idx, "pw", "pwconv", x, layer.out_channels, act=layer.act, rank=layer.rank("pw"))
    x = shape
    if layer.expanded_channels != layer.in_channels:
        x = b.conv(idx, "expand", "pwconv", x, layer.expanded_channels, act=layer.act, held=held,
                   rank=layer.rank("expand"))
    x = b.conv(idx, "dw", "dwconv", x, x[2], layer.kernel, layer.stride, layer.act, held=held)
    if layer.se:
        c, r = x[2], layer.se_channels
        gate = "hsigmoid" if layer.act == "hswish" else "sigmoid"
        b.ops += [
            OpSpec(idx, "se.pool", "pool", x, (c,), held=held),
            OpSpec(idx, "se.reduce", "dense", (c,), (r,), bias=True, held=held),
            OpSpec(idx, "se.act", "act", (r,), (r,), act="relu", held=held),
            OpSpec(idx, "se.expand", "dense", (r,), (c,), bias=True, held=held),
            OpSpec(idx, "se.gate", "act", (c,), (c,), act=gate, held=held),
            OpSpec(idx, "se.mul", "mul", x, x, held=held),
        ]
    out = b.conv(idx, "project", "pwconv", x, layer.out_channels, held=held, rank=layer.rank("project"))
    if layer.residual:
        b.ops.append(OpSpec(idx, "add", "add", out, out, held=held))
    return out


def network_ops(arch: Architecture) -> list[OpSpec]:
    """Every operator of `arch` at batch 1, in execution order."""
    b = _Builder()
    shape: Shape = (arch.resolution, arch.resolution, arch.in_channels)
    shape = b.conv(0, "stem", "conv", shape, arch.stem.channels, arch.stem.kernel, arch.stem.stride, arch.stem.act)
    for i, layer in enumerate(arch.layers, start=1):
        shape = layer_ops(b, i, layer, shape)
    n = len(arch.layers) + 1
    shape = b.conv(n, "head", "pwconv", shape, arch.head.channels, act=arch.head.act, rank=arch.head.rank("conv"))
    b.ops.append(OpSpec(n + 1, "pool", "pool", shape, (shape[2],)))
    feats = (shape[2],)
    if arch.head.rank("classifier") is not None:
        b.ops.append(OpSpec(n + 1, "fc.down", "dense", feats, (arch.head.rank("classifier"),)))
        feats = (arch.head.rank("classifier"),)
    b.ops.append(OpSpec(n + 1, "fc", "dense", feats, (arch.num_classes,), bias=True))
    return b.ops


def layer_names(arch: Architecture) -> list[str]:
    """Readable name per layer index used in `OpSpec.layer`."""
    return ["stem"] + [f"{i}:{l.token()}" for i, l in enumerate(arch.layers, 1)] + ["head", "classifier"]
