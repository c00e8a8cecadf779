"""Channel groups: every tensor axis that carries one shared set of channels, ranked by importance
and re-ordered together (`permute_channels`), so narrow candidates use the strongest channels
without changing the largest candidate's function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from search_spaces.space import SearchSpace
from search_spaces.supernet.structure import layout
from search_spaces.supernet.trees import get_path, plain, put


Axis = tuple[tuple[str, ...], int]  # (path inside a params/batch_stats tree, axis)


@dataclass(frozen=True)
class ChannelGroup:
    """One set of channels shared by several tensor axes; permuting all of them together leaves the
    largest candidate's function unchanged. `kernels` are the weights whose magnitude ranks a channel."""

    name: str
    size: int
    params: tuple[Axis, ...]
    stats: tuple[Axis, ...]
    kernels: tuple[Axis, ...]


@functools.lru_cache(maxsize=32)
def channel_groups(space: SearchSpace) -> tuple[ChannelGroup, ...]:
    """The supernet's permutable channel groups: stem, each stage, each mb expansion and SE width, head.

    Groups that a candidate can tie together with different sizes (an mb layer without expansion
    reads its input channels as expanded ones; an identity shortcut between a stem and a stride-1
    stage of other widths) are left out: no permutation of one alone keeps every candidate's meaning.
    """
    lay = layout(space)
    members: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    sizes: dict[str, int] = {}
    parent: dict[str, str] = {}

    def group(name: str, size: int) -> str:
        sizes.setdefault(name, size)
        parent.setdefault(name, name)
        members.setdefault(name, [])
        return name

    def find(g: str) -> str:
        while parent[g] != g:
            g = parent[g]
        return g

    def conv(module: str, axis: int, g: str) -> None:  # a kernel axis (and BN when it is the output axis)
        members[g].append(("kernel", (module, "kernel"), axis))
        if axis == 3:
            for leaf in ("scale", "bias"):
                members[g].append(("param", (module, "bn", leaf), 0))
            for leaf in ("mean", "var"):
                members[g].append(("stats", (module, "bn", leaf), 0))

    def dense(module: str, g_in: str, g_out: str) -> None:
        members[g_in].append(("kernel", (module, "kernel"), 0))
        members[g_out].append(("kernel", (module, "kernel"), 1))
        members[g_out].append(("param", (module, "bias"), 0))

    conv("stem", 3, group("stem", lay.stem))
    for s in range(len(space.stages)):
        group(f"stage{s}", lay.stages[s])
    for sl in lay.slots:
        g_in = ("stem" if sl.stage == 0 else f"stage{sl.stage - 1}") if sl.index == 0 else f"stage{sl.stage}"
        g_out = f"stage{sl.stage}"
        kinds = {k for k, _ in sl.branches}
        if sl.ds_kernel:
            conv(f"{sl.name}_ds_dw", 3, g_in)
            conv(f"{sl.name}_ds_pw", 2, g_in)
            conv(f"{sl.name}_ds_pw", 3, g_out)
        if sl.mb_kernel:
            g_exp = group(f"{sl.name}.exp", sl.expanded)
            if "mb" in kinds:
                conv(f"{sl.name}_mb_expand", 2, g_in)
                conv(f"{sl.name}_mb_expand", 3, g_exp)
            conv(f"{sl.name}_mb_dw", 3, g_exp)
            if sl.se:
                g_se = group(f"{sl.name}.se", sl.se)
                dense(f"{sl.name}_mb_se_reduce", g_exp, g_se)
                dense(f"{sl.name}_mb_se_expand", g_se, g_exp)
            conv(f"{sl.name}_mb_project", 2, g_exp)
            conv(f"{sl.name}_mb_project", 3, g_out)
            if "mb_noexp" in kinds:
                parent[find(g_exp)] = find(g_in)
        if sl.shortcut:
            conv(f"{sl.name}_skip_shortcut", 2, g_in)
            conv(f"{sl.name}_skip_shortcut", 3, g_out)
        if g_in != g_out and sl.stride == 1 and ("skip_id" in kinds or "mb" in kinds or "mb_noexp" in kinds):
            parent[find(g_in)] = find(g_out)  # a residual may add the input to the output
    conv("head", 2, f"stage{len(space.stages) - 1}")
    conv("head", 3, group("head", lay.head))
    members["head"].append(("kernel", ("classifier", "kernel"), 0))

    unions: dict[str, list[str]] = {}
    for g in members:
        unions.setdefault(find(g), []).append(g)
    out = []
    for root, names in unions.items():
        if len({sizes[n] for n in names}) > 1:
            continue  # tied groups of different widths: not permutable
        mem = [m for n in names for m in members[n]]
        out.append(ChannelGroup(
            name="+".join(names), size=sizes[root],
            params=tuple((p, a) for kind, p, a in mem if kind in ("kernel", "param")),
            stats=tuple((p, a) for kind, p, a in mem if kind == "stats"),
            kernels=tuple((p, a) for kind, p, a in mem if kind == "kernel")))
    return tuple(out)


def channel_importance(space: SearchSpace, params: Mapping[str, Any]) -> list[np.ndarray]:
    """Per channel group, the permutation that sorts its channels by decreasing importance: the L1 norm
    of every kernel slice the channel owns (its producing filters and its consuming weights)."""
    params = plain(params)
    perms = []
    for g in channel_groups(space):
        score = np.zeros(g.size)
        for path, axis in g.kernels:
            w = np.abs(np.asarray(get_path(params, path), np.float64))
            score += w.sum(axis=tuple(i for i in range(w.ndim) if i != axis))
        perms.append(np.argsort(-score, kind="stable"))
    return perms


def permute_channels(space: SearchSpace, tree: Mapping[str, Any], perms: list[np.ndarray],
                     collection: str = "params") -> dict[str, Any]:
    """`tree` (a params-shaped tree, e.g. parameters or an optimizer's moments, or with
    collection='batch_stats' the running statistics) with every channel group re-ordered by `perms`."""
    out = jax.tree.map(lambda a: a, plain(tree))
    for g, perm in zip(channel_groups(space), perms):
        for path, axis in (g.params if collection == "params" else g.stats):
            a = get_path(out, path)
            put(out, path, jnp.take(a, jnp.asarray(perm), axis=axis) if isinstance(a, jax.Array)
                 else np.take(np.asarray(a), perm, axis=axis))
    return out
