"""Tabular benchmark evaluator: look an architecture up in a NAS-Bench-Macro style JSON table.

The file maps an architecture key to `{"test_acc": [a1, a2, ...], "mean_acc": m, "std": s,
"params": p, "flops": f}` (accuracies in percent, `flops` = multiply-accumulates). Evaluating
is a dictionary look-up, which makes search strategies cheap to benchmark.

Tables shipped with the package are named in `TABLES` (e.g. ``nas-bench-macro``);
`resolve_table` turns a name or a path into the absolute path of an existing file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

_REQUIRED = ("test_acc", "mean_acc", "params", "flops")

TABLES_DIR = Path(__file__).resolve().parent / "tables"
#: Benchmark tables shipped as package data, by name (provenance and licenses in tables/README.md).
TABLES: dict[str, str] = {"nas-bench-macro": "nas-bench-macro_cifar10.json"}


def resolve_table(name_or_path: str | Path, base: str | Path | None = None) -> Path:
    """The absolute path of a table given by its name in `TABLES` or by a path (relative paths
    are taken from `base`, default the current directory).

    A name wins over a file of the same name. Raises `NasError` (one line, the known names)
    when it is neither a known name nor an existing file.
    """
    text = str(name_or_path)
    if text in TABLES:
        return TABLES_DIR / TABLES[text]
    path = Path(base if base is not None else Path.cwd()) / Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    raise NasError(f"table {text!r} is neither a known table ({', '.join(sorted(TABLES))}) nor a file "
                   f"({path.resolve()} not found)")


class TableEvaluator:
    """Accuracy, params and FLOPs of an architecture from a benchmark table.

    Args:
        path: the JSON table (e.g. ``nas-bench-macro_cifar10.json``).
        metric: the numeric per-entry field reported as ``accuracy`` (default ``mean_acc``).
        sample_repeat: report one of the repeated runs (``test_acc``), drawn with the ``rng``
            given to `evaluate` (or the evaluator's own generator seeded with ``seed``).
        seed: seed of the evaluator's own generator, used only when `evaluate` gets no rng.

    Example:
        >>> table = TableEvaluator("nas-bench-macro_cifar10.json")
        >>> table.evaluate("22212202")["accuracy"]
        93.12666320800781
    """

    def __init__(self, path: str | Path, metric: str = "mean_acc", sample_repeat: bool = False, seed: int = 0):
        self.path = Path(path)
        self.sample_repeat = bool(sample_repeat)
        self._entries = _load(self.path)
        numeric = sorted(k for k, v in next(iter(self._entries.values())).items() if _is_number(v))
        if metric not in numeric:
            raise NasError(f"{self.path}: unknown metric '{metric}'; allowed: {', '.join(numeric)}")
        for key, entry in self._entries.items():
            if not _is_number(entry.get(metric)):
                raise NasError(f"{self.path}: entry '{key}' has no numeric '{metric}'")
        self.metric = metric
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ look-ups
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[str]:
        """Every key of the table, in file order."""
        return iter(self._entries)

    def entry(self, arch_or_key: Architecture | str) -> dict[str, Any]:
        """The raw table entry (a copy) of an architecture or key."""
        key = arch_or_key.key if isinstance(arch_or_key, Architecture) else arch_or_key
        try:
            return dict(self._entries[key])
        except (KeyError, TypeError):
            raise NasError(f"{self.path}: architecture key {key!r} is not in the table") from None

    def evaluate(self, arch_or_key: Architecture | str, rng: np.random.Generator | None = None) -> dict[str, float]:
        """``{"accuracy", "params", "flops"}`` of an architecture (or its key).

        With ``sample_repeat`` the accuracy is one of the ``test_acc`` runs drawn with `rng`.
        A key missing from the table raises a `NasError` naming the file and the key.
        """
        e = self.entry(arch_or_key)
        if self.sample_repeat:
            runs = e["test_acc"]
            acc = float(runs[int((rng if rng is not None else self._rng).integers(len(runs)))])
        else:
            acc = float(e[self.metric])
        return {"accuracy": acc, "params": int(e["params"]), "flops": int(e["flops"])}

    def best(self, keep: Any = None) -> tuple[str, float]:
        """(key, accuracy) of the best entry by `metric`, among keys where `keep(key, entry)` holds."""
        pairs = [(k, float(e[self.metric])) for k, e in self._entries.items() if keep is None or keep(k, dict(e))]
        if not pairs:
            raise NasError(f"{self.path}: no entry passes the filter")
        return max(pairs, key=lambda p: p[1])

    # ------------------------------------------------------------------ validation
    def check_space(self, space: SearchSpace) -> None:
        """Raise `NasError` unless the table's keys are exactly the canonical keys of `space`."""
        n_dec = len(space.decisions())
        lengths = sorted({len(k) for k in self._entries})
        if lengths != [n_dec]:
            raise NasError(
                f"{self.path}: table keys have {'/'.join(map(str, lengths))} characters but space "
                f"'{space.name}' keys have {n_dec} (one per decision)"
            )
        if space.size() != len(self._entries):
            raise NasError(
                f"{self.path}: table has {len(self._entries)} keys but space '{space.name}' has "
                f"{space.size()} architectures"
            )
        space_keys = set(space.keys())
        extra = [k for k in self._entries if k not in space_keys]
        if extra:
            raise NasError(
                f"{self.path}: key {extra[0]!r} (and {len(extra) - 1} more) is not an architecture "
                f"of space '{space.name}'"
            )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """Read and validate the table, turning every problem into a one-line NasError."""
    if not path.is_file():
        raise NasError(f"{path}: benchmark table not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NasError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NasError(f"{path}: cannot read the table ({e.__class__.__name__})") from None
    if not isinstance(data, dict) or not data:
        raise NasError(f"{path}: expected a non-empty JSON object mapping keys to entries")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise NasError(f"{path}: entry '{key}' is not an object")
        missing = [f for f in _REQUIRED if f not in entry]
        if missing:
            raise NasError(f"{path}: entry '{key}' lacks {', '.join(missing)}; required: {', '.join(_REQUIRED)}")
        runs = entry["test_acc"]
        if not isinstance(runs, list) or not runs or not all(_is_number(a) for a in runs):
            raise NasError(f"{path}: entry '{key}': test_acc must be a non-empty list of numbers")
        if not all(_is_number(entry[f]) for f in ("params", "flops")):
            raise NasError(f"{path}: entry '{key}': params and flops must be numbers")
    return data
