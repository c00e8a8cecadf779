"""Distillation students that survive a kill: finished results kept by key, unfinished ones resumed.

A student is identified by everything that decides its weights (arm, schedule and seed, starting
point, augmentation, teacher and KD settings, dataset): `student_key`. Its finished result sits in
a JSON file of the winner's folder (`baselines.json` for the no-KD arm, which does not depend on the
teacher, `kd_students.json` for the KD arm); while it trains, the whole training state after each
epoch is written atomically to `students/<key>.state` and removed when the student finishes. A
re-run after a kill skips finished students and continues an unfinished one after its last saved
epoch, with the same data order, augmentation draws and optimizer state (see
`evaluators.train.train(resume_from=...)`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

STATE_DIR = "students"


def student_key(parts: Mapping[str, Any], *files: Path) -> str:
    """16 hex digits over `parts` (plain data) and the bytes of `files` (e.g. the starting checkpoint)."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


class ResultCache:
    """Finished students' results ({key: plain dict}) in one JSON file, rewritten atomically on each add."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        self.entries[key] = dict(result)
        _atomic_write(self.path, json.dumps(self.entries, indent=2).encode())


class TrainingState:
    """The per-epoch training state of one unfinished student: `save` is a `train(checkpoint=...)` callback."""

    def __init__(self, folder: Path, key: str):
        self.path = Path(folder) / STATE_DIR / f"{key}.state"

    def load(self) -> bytes | None:
        """The last saved state, or None when the student has not started (or finished)."""
        return self.path.read_bytes() if self.path.exists() else None

    def save(self, epoch: int, blob: bytes) -> None:
        _atomic_write(self.path, blob)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
