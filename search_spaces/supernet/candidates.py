"""Candidates as arrays: an `Architecture` of a space turned into the masks, flags and branch indices
`Supernet.__call__` takes (so one compiled program serves every candidate), and the largest and
smallest architectures of a space (the sandwich rule's ends).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from search_spaces.architecture import Architecture, Layer
from search_spaces.errors import SpaceError
from search_spaces.space import SearchSpace
from search_spaces.supernet.structure import Slot, input_sizes, kernel_window, layout

Candidate = dict[str, Any]  # a pytree of NumPy arrays (see `candidate`)
_BLOCK_RANK = {"skip": 0, "ds": 1, "mb": 2}


def _mask(n: int, active: int) -> np.ndarray:
    return (np.arange(n) < active).astype(np.float32)


def slots_of(space: SearchSpace, arch: Architecture) -> list[Layer | None]:
    """The architecture's layer in each slot (None where the stage is shallower)."""
    choices = space.to_choices(arch)
    layers = iter(arch.layers)
    out: list[Layer | None] = []
    for s, st in enumerate(space.stages):
        depth = st.depths[choices.get(f"s{s}.depth", 0)]
        out += [next(layers) if li < depth else None for li in range(len(st.layer_ops))]
    return out


def check_arch(space: SearchSpace, arch: Architecture) -> None:
    """Raise a one-line `SpaceError` unless `arch` is an architecture of `space`."""
    if not isinstance(arch, Architecture):
        raise SpaceError(f"expected an Architecture of space '{space.name}', got {type(arch).__name__}")
    if arch.space != space.name:
        raise SpaceError(f"architecture '{arch.key}' is of space '{arch.space}', not of the supernet's space "
                         f"'{space.name}'")
    try:
        same = space.decode(arch.key) == arch
    except SpaceError as e:
        raise SpaceError(f"architecture '{arch.key}' is not of the supernet's space '{space.name}' ({e})") from None
    if not same:
        raise SpaceError(f"architecture '{arch.key}' does not match space '{space.name}' (another input size or "
                         f"declaration?)")


def candidate(space: SearchSpace, arch: Architecture) -> Candidate:
    """`arch` (an Architecture of `space`) as the arrays `Supernet.__call__` takes.

    Returns a dict: 'stem', 'head' (channel masks), 'stages' (a tuple of channel masks), and per slot
    name a dict with 'branch' (int32 index into the slot's branches), 'residual', 'se_on' (0/1) and,
    where the slot has them, 'exp' (expansion mask), 'se' (SE width mask), 'ds_k' / 'mb_k' (kernel masks),
    'ds_kv' / 'mb_kv' (int32: which of the slot's kernels runs) and 'mb_wv' (int32: which expanded width
    an expanding mb op is computed at, the masks doing the rest).
    """
    check_arch(space, arch)
    lay = layout(space)
    sizes = input_sizes(space, arch.resolution)
    layers = slots_of(space, arch)
    out: Candidate = {"stem": _mask(lay.stem, arch.stem.channels), "head": _mask(lay.head, arch.head.channels)}
    stage_ch = [lay.stages[s] for s in range(len(space.stages))]
    widths = []
    for s in range(len(space.stages)):
        first = next(ly for sl, ly in zip(lay.slots, layers) if sl.stage == s and ly is not None)
        widths.append(first.out_channels)
    out["stages"] = tuple(_mask(n, c) for n, c in zip(stage_ch, widths))
    for slot, ly, size in zip(lay.slots, layers, sizes):
        out[slot.name] = _slot_arrays(slot, ly, size)
    return out


def _slot_kind(slot: Slot, ly: Layer | None) -> tuple[str, str]:
    if ly is None:
        return ("off", "")
    if ly.block == "ds":
        return ("ds", ly.act)
    if ly.block == "mb":
        return ("mb" if ly.expanded_channels != ly.in_channels else "mb_noexp", ly.act)
    return ("skip_id", "") if ly.residual else ("skip_conv", "")


def _slot_arrays(slot: Slot, ly: Layer | None, size: int) -> dict[str, np.ndarray]:
    kind = _slot_kind(slot, ly)
    d = {"branch": np.int32(slot.branches.index(kind)),
         "residual": np.float32(ly is not None and ly.residual and ly.block == "mb"),
         "se_on": np.float32(ly is not None and ly.block == "mb" and ly.se > 0)}
    if slot.expanded:
        d["exp"] = _mask(slot.expanded, ly.expanded_channels if ly is not None and ly.block == "mb" else 0)
    if slot.se:
        d["se"] = _mask(slot.se, ly.se_channels if ly is not None and ly.block == "mb" else 0)
    for block, big, kernels in (("ds", slot.ds_kernel, slot.ds_kernels), ("mb", slot.mb_kernel, slot.mb_kernels)):
        if big:
            m = np.zeros((big, big), np.float32)
            mine = ly is not None and ly.block == block
            if mine:
                o = kernel_window(size, ly.kernel, big, slot.stride)
                m[o:o + ly.kernel, o:o + ly.kernel] = 1.0
            d[f"{block}_k"] = m
            d[f"{block}_kv"] = np.int32(kernels.index(ly.kernel) if mine else 0)  # which kernel runs
    if slot.mb_widths:
        e = ly.expanded_channels if kind[0] == "mb" else 0
        d["mb_wv"] = np.int32(next(i for i, w in enumerate(slot.mb_widths) if w >= e))  # which width runs
    return d


def stack_candidates(cands: list[Candidate]) -> Candidate:
    """Stack candidates of one space along a new leading axis (for `lax.scan`/`lax.map` over them)."""
    if not cands:
        raise SpaceError("stack_candidates: no candidates given")
    try:
        return jax.tree.map(lambda *xs: np.stack(xs), *cands)
    except ValueError as e:
        raise SpaceError(f"stack_candidates: candidates of different spaces ({e})") from None


# ==================================================================== largest / smallest
def _op_rank(op) -> tuple:
    return (_BLOCK_RANK[op.block], op.expansion, op.kernel, op.se)


def extreme(space: SearchSpace, largest: bool) -> Architecture:
    """The largest (widest, deepest, biggest op per layer) or smallest architecture of `space`."""
    pick = max if largest else min
    choices = {}
    for d in space.decisions():
        if d.layer is not None or d.name.endswith(".op"):
            idx = pick(range(len(d.options)), key=lambda i: _op_rank(d.options[i]))
        else:
            idx = pick(range(len(d.options)), key=lambda i: d.options[i])
        choices[d.name] = idx
    return space.from_choices(choices)
