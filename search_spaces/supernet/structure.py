"""The supernet's static layout: per layer slot (stage s, layer l) its stride, largest widths and
kernels, and the branches a candidate may take there; and where a smaller kernel sits in the largest.

Everything here is Python data computed once per space (cached): the compiled program's shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from search_spaces.architecture import Layer
from search_spaces.errors import SpaceError
from search_spaces.ops import same_padding
from search_spaces.space import SearchSpace


@dataclass(frozen=True)
class Slot:
    """One layer position of the supernet (stage `stage`, layer `index`) at its largest."""

    name: str
    stage: int
    index: int
    stride: int
    cin: int  # largest input channels
    cout: int  # largest output channels
    ds_kernel: int  # largest ds kernel (0: no ds op here)
    mb_kernel: int  # largest mb kernel (0: no mb op here)
    expanded: int  # largest mb expanded width (0: no mb op)
    se: int  # largest SE width (0: no SE op)
    shortcut: bool  # a skip op may need its 1x1 shortcut (stride 2 or cin != cout)
    branches: tuple[tuple[str, str], ...]  # (kind, act): off | ds | mb | mb_noexp | skip_id | skip_conv
    # what a branch runs at less than the largest (an inner `lax.switch`, so a candidate pays for its own size):
    ds_kernels: tuple[int, ...] = ()  # the ds kernels offered here, ascending
    mb_kernels: tuple[int, ...] = ()  # the mb kernels offered here, ascending
    mb_widths: tuple[int, ...] = ()  # expanded widths an expanding mb op is computed at (the largest per expansion)


@dataclass(frozen=True)
class Layout:
    """The supernet's static shape: stem, slots, head widths at their largest."""

    stem: int
    stages: tuple[int, ...]  # largest output channels per stage
    slots: tuple[Slot, ...]
    head: int


def _scaled(space: SearchSpace, channels: int) -> set[int]:
    return {space._scale(channels, w) for w in space.width_mults}


def _stage_widths(space: SearchSpace, s: int) -> set[int]:
    return {space._scale(c, w) for c in space.stages[s].channels for w in space.width_mults}


def _expanded(cin: int, e: float) -> int:
    return Layer("mb", cin, cin, 1, 3, e).expanded_channels


def _se_width(cin: int, se: float) -> int:
    return Layer("mb", cin, cin, 1, 3, 2, se).se_channels


@functools.lru_cache(maxsize=32)
def layout(space: SearchSpace) -> Layout:
    """The supernet's slots and largest widths for `space` (cached; spaces are hashable values)."""
    slots = []
    stem_w = _scaled(space, space.stem.channels)
    for s, st in enumerate(space.stages):
        cur = _stage_widths(space, s)
        for li, ops in enumerate(st.layer_ops):
            stride = st.stride if li == 0 else 1
            # (cin, cout) pairs one candidate can have: one width multiplier scales both
            if li > 0:
                pairs = {(c, c) for c in cur}
            else:
                before = space.stages[s - 1].channels if s > 0 else (space.stem.channels,)
                pairs = {(space._scale(a, w), space._scale(c, w))
                         for w in space.width_mults for a in before for c in st.channels}
            ins = {a for a, _ in pairs}
            ds = [o for o in ops if o.block == "ds"]
            mb = [o for o in ops if o.block == "mb"]
            skip = [o for o in ops if o.block == "skip"]
            branches: list[tuple[str, str]] = []
            if li >= min(st.depths):
                branches.append(("off", ""))
            for a in dict.fromkeys(o.act for o in ds):
                branches.append(("ds", a))
            for a in dict.fromkeys(o.act for o in mb):
                exps = {(cin, o.expansion) for o in mb if o.act == a for cin in ins}
                if any(_expanded(c, e) != c for c, e in exps):
                    branches.append(("mb", a))
                if any(_expanded(c, e) == c for c, e in exps):
                    branches.append(("mb_noexp", a))
            identity = stride == 1 and any(a == b for a, b in pairs)
            shortcut = bool(skip) and (stride != 1 or any(a != b for a, b in pairs))
            if skip and identity:
                branches.append(("skip_id", ""))
            if shortcut:
                branches.append(("skip_conv", ""))
            cin_max, cout_max = max(ins), max(cur)
            slots.append(Slot(
                name=f"s{s}_l{li}", stage=s, index=li, stride=stride, cin=cin_max, cout=cout_max,
                ds_kernel=max((o.kernel for o in ds), default=0), mb_kernel=max((o.kernel for o in mb), default=0),
                expanded=max((_expanded(cin_max, o.expansion) for o in mb), default=0),
                se=max((_se_width(cin_max, o.se) for o in mb), default=0),
                shortcut=shortcut, branches=tuple(branches),
                ds_kernels=tuple(sorted({o.kernel for o in ds})), mb_kernels=tuple(sorted({o.kernel for o in mb})),
                mb_widths=tuple(sorted({_expanded(cin_max, o.expansion) for o in mb
                                        if any(_expanded(c, o.expansion) != c for c in ins)}))))
    return Layout(max(stem_w), tuple(max(_stage_widths(space, s)) for s in range(len(space.stages))),
                  tuple(slots), max(space.head_channels))


def input_sizes(space: SearchSpace, resolution: int) -> list[int]:
    """Feature-map size at each slot's input, in slot order."""
    size = same_padding(resolution, space.stem.kernel, space.stem.stride)[0]
    out = []
    for st in space.stages:
        for li in range(len(st.layer_ops)):
            out.append(size)
            if li == 0:
                size = -(-size // st.stride)
    return out


def kernel_window(size: int, kernel: int, largest: int, stride: int) -> int:
    """Offset of the k x k window of a largest x largest kernel that computes a SAME k x k convolution
    on a `size` map: before(largest) - before(k) of the SAME paddings (the centre, (K - k) / 2, except
    where SAME padding is clipped at zero)."""
    off = same_padding(size, largest, stride)[1] - same_padding(size, kernel, stride)[1]
    if not 0 <= off <= largest - kernel:
        raise SpaceError(f"kernel {kernel} has no window in a {largest}x{largest} kernel at input size {size}")
    return off
