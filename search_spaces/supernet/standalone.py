"""Stand-alone variables of one candidate: the supernet's weights sliced for `build_model(arch)`,
so every stage that takes a stand-alone network (distill, export, nas.load) takes a supernet winner.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from search_spaces.architecture import Architecture
from search_spaces.space import SearchSpace
from search_spaces.supernet.candidates import check_arch, slots_of
from search_spaces.supernet.structure import input_sizes, kernel_window, layout
from search_spaces.supernet.trees import plain, put


def extract(space: SearchSpace, arch: Architecture, variables: Mapping[str, Any]) -> dict[str, Any]:
    """{'params', 'batch_stats'} of `build_model(arch)` sliced from the supernet's `variables`
    (NumPy), so every stage that takes a stand-alone network (distill, export, nas.load) takes this one."""
    check_arch(space, arch)
    lay = layout(space)
    P = jax.tree.map(np.asarray, plain(variables["params"]))
    S = jax.tree.map(np.asarray, plain(variables["batch_stats"]))
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def conv(dst: tuple[str, ...], src: str, cin: int, cout: int, window: tuple[int, int] | None = None) -> None:
        k = P[src]["kernel"]
        if window is None:
            k = k[:, :, :cin, :cout]
        else:  # depthwise: (k, k, 1, channels)
            o, n = window
            k = k[o:o + n, o:o + n, :, :cout]
        put(params, dst, {"kernel": k, "bn": {n_: a[:cout] for n_, a in P[src]["bn"].items()}})
        put(stats, dst, {"bn": {n_: a[:cout] for n_, a in S[src]["bn"].items()}})

    def dense(dst: tuple[str, ...], src: str, cin: int, cout: int) -> None:
        put(params, dst, {"kernel": P[src]["kernel"][:cin, :cout], "bias": P[src]["bias"][:cout]})

    conv(("stem",), "stem", arch.in_channels, arch.stem.channels)
    sizes = input_sizes(space, arch.resolution)
    i = 0
    for sl, ly, size in zip(lay.slots, slots_of(space, arch), sizes):
        if ly is None:
            continue
        name, pre = f"layer{i}", sl.name
        i += 1
        if ly.block == "ds":
            conv((name, "dw"), f"{pre}_ds_dw", 1, ly.in_channels,
                 (kernel_window(size, ly.kernel, sl.ds_kernel, sl.stride), ly.kernel))
            conv((name, "pw"), f"{pre}_ds_pw", ly.in_channels, ly.out_channels)
        elif ly.block == "mb":
            e = ly.expanded_channels
            if e != ly.in_channels:
                conv((name, "expand"), f"{pre}_mb_expand", ly.in_channels, e)
            conv((name, "dw"), f"{pre}_mb_dw", 1, e, (kernel_window(size, ly.kernel, sl.mb_kernel, sl.stride), ly.kernel))
            if ly.se:
                dense((name, "se", "reduce"), f"{pre}_mb_se_reduce", e, ly.se_channels)
                dense((name, "se", "expand"), f"{pre}_mb_se_expand", ly.se_channels, e)
            conv((name, "project"), f"{pre}_mb_project", e, ly.out_channels)
        elif not ly.residual:
            conv((name, "shortcut"), f"{pre}_skip_shortcut", ly.in_channels, ly.out_channels)
    last = arch.layers[-1].out_channels if arch.layers else arch.stem.channels
    conv(("head",), "head", last, arch.head.channels)
    dense(("classifier",), "classifier", arch.head.channels, arch.num_classes)
    copy = lambda a: np.array(a, copy=True)  # noqa: E731  (slices would pin the whole supernet array)
    return {"params": jax.tree.map(copy, params), "batch_stats": jax.tree.map(copy, stats)}
