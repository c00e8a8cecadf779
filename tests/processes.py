"""Process-tree helpers for the tests that kill or interrupt a search (by process id, never by name:
other Ray instances on the machine are not the test's)."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> set[int]:
    """Process ids of every descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out
