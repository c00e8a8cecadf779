"""Layer signatures: what a layer's measured latency depends on, and a one-layer network for each.

Every layer a space can produce has a *signature* (block type, kernel, expansion, SE,
activation, channels in/out, stride, input resolution; plus stem and head entries). The
latency look-up table (`evaluators.lut`) is keyed by `LayerSig.key()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp

from search_spaces.architecture import Architecture, Layer, Ranks, ranks_token
from search_spaces.catalog import load_space
from search_spaces.graph import conv_out
from search_spaces.model import Block, ConvBN, FactorizedDense
from search_spaces.space import SearchSpace, make_divisible


@dataclass(frozen=True)
class LayerSig:
    """What a layer's latency depends on. `part` is 'stem', 'block' or 'head' (head conv + pool + classifier)."""

    part: str
    in_channels: int
    out_channels: int
    stride: int
    resolution: int  # input height = width
    block: str = ""
    kernel: int = 0
    expansion: float = 1
    se: float = 0.0
    act: str = ""
    classes: int = 0
    ranks: Ranks = ()  # low-rank factorized convs (never in a space: a table misses them, see evaluators.latency)

    @property
    def identity(self) -> bool:
        """An identity skip: no operators, costs nothing, never measured."""
        return self.part == "block" and self.block == "skip" and self.stride == 1 and self.in_channels == self.out_channels

    def key(self) -> str:
        """Canonical string form, the cache key."""
        io = f"c{self.in_channels}>{self.out_channels}_s{self.stride}_r{self.resolution}"
        if self.part == "stem":
            return f"stem_k{self.kernel}_{self.act}_{io}"
        if self.part == "head":
            return f"head_{self.act}_{io}_n{self.classes}" + ranks_token(self.ranks)
        layer = Layer(self.block, self.in_channels, self.out_channels, self.stride, self.kernel, self.expansion,
                      self.se, self.act)
        tok = layer.token().rsplit("_c", 1)[0] if self.block != "skip" else "skip"
        return f"{tok}_{io}" + ranks_token(self.ranks)

    def in_shape(self) -> tuple[int, int, int]:
        return (self.resolution, self.resolution, self.in_channels)


def arch_signatures(arch: Architecture) -> list[LayerSig]:
    """One signature per layer index of `layer_names(arch)` (the classifier rides with the head: its
    entry is the last one and the head's carries both)."""
    r = arch.resolution
    sigs = [LayerSig("stem", arch.in_channels, arch.stem.channels, arch.stem.stride, r, kernel=arch.stem.kernel,
                     act=arch.stem.act)]
    r = conv_out(r, arch.stem.stride)
    for ly in arch.layers:
        sigs.append(LayerSig("block", ly.in_channels, ly.out_channels, ly.stride, r, ly.block, ly.kernel,
                             ly.expansion, ly.se, ly.act, ranks=ly.ranks))
        r = conv_out(r, ly.stride)
    cin = arch.layers[-1].out_channels if arch.layers else arch.stem.channels
    sigs.append(LayerSig("head", cin, arch.head.channels, 1, r, act=arch.head.act, classes=arch.num_classes,
                         ranks=arch.head.ranks))
    return sigs


def space_signatures(space: SearchSpace | str) -> set[LayerSig]:
    """Every distinct layer signature any architecture of `space` can contain (without enumerating it)."""
    space = load_space(space) if isinstance(space, str) else space
    out: set[LayerSig] = set()
    for res in space.resolutions:
        for w in space.width_mults:
            def scale(c: int) -> int:
                return c if w == 1 else make_divisible(c * w, space.divisor)

            st = space.stem
            out.add(LayerSig("stem", space.in_channels, scale(st.channels), st.stride, res, kernel=st.kernel, act=st.act))
            r = conv_out(res, st.stride)
            prev = {scale(st.channels)}
            for stage in space.stages:
                outs = {scale(c) for c in stage.channels}
                for li, ops in enumerate(stage.layer_ops):
                    stride = stage.stride if li == 0 else 1
                    pairs = [(ci, co) for ci in prev for co in outs] if li == 0 else [(c, c) for c in outs]
                    for ci, co in pairs:
                        for op in ops:
                            sig = LayerSig("block", ci, co, stride, r, op.block, op.kernel, op.expansion, op.se, op.act)
                            if not sig.identity:
                                out.add(sig)
                    r = conv_out(r, stride)
                prev = outs
            for hc in space.head_channels:
                for ci in prev:
                    out.add(LayerSig("head", ci, hc, 1, r, act=space.head_act, classes=space.num_classes))
    return out


class LayerUnit(nn.Module):
    """A one-layer network for a signature (reuses the model's ConvBN / Block)."""

    sig: LayerSig
    impl: str = "reference"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        s = self.sig
        if s.part == "stem":
            return ConvBN(s.out_channels, "conv", s.kernel, s.stride, s.act, self.impl, name="stem")(x, train)
        if s.part == "block":
            layer = Layer(s.block, s.in_channels, s.out_channels, s.stride, s.kernel, s.expansion, s.se, s.act, s.ranks)
            return Block(layer, self.impl, name="layer")(x, train)
        ranks = dict(s.ranks)
        x = ConvBN(s.out_channels, "pwconv", act=s.act, impl=self.impl, rank=ranks.get("conv"), name="head")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if "classifier" in ranks:
            return FactorizedDense(s.classes, ranks["classifier"], name="classifier")(x)
        return nn.Dense(s.classes, name="classifier")(x)
