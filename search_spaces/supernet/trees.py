"""Small helpers over nested dicts of arrays (params / batch_stats trees) addressed by key paths."""

from __future__ import annotations

from typing import Any, Mapping


def put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set `value` at `path` in `tree`, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def plain(tree: Any) -> Any:
    """`tree` with every Mapping (e.g. a FrozenDict) turned into a plain dict."""
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    return tree


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` in `tree`."""
    for k in path:
        tree = tree[k]
    return tree
