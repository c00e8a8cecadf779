"""Process-tree helpers for the tests that kill or interrupt a search (by process id, never by name:
other Ray instances on the machine are not the test's)."""

from __future__ import annotations

import time
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


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def alive(pids: set[int], wait_s: float) -> set[int]:
    """The processes of `pids` still running after up to `wait_s` seconds."""
    deadline = time.time() + wait_s
    while True:
        left = {p for p in pids if running(p)}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)
