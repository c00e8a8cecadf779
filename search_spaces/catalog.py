"""Where spaces come from: the built-in YAML declarations, user YAML files, and the Python API."""

from __future__ import annotations

from pathlib import Path

import yaml

from search_spaces.errors import SpaceError
from search_spaces.registry import Registry
from search_spaces.space import SearchSpace

BUILTIN_DIR = Path(__file__).parent / "spaces"
SPACES: Registry[SearchSpace] = Registry("search space")


def read_yaml(path: str | Path) -> object:
    """Load a YAML file, turning a missing file or a syntax error into a one-line SpaceError."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpaceError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None


def space_from_yaml(path: str | Path) -> SearchSpace:
    """Parse one space declaration file."""
    return SearchSpace.from_dict(read_yaml(path) or {}, source=str(path))


def register_space(space: SearchSpace) -> SearchSpace:
    """Add a space (from a file or the Python API) to the registry by its name."""
    return SPACES.register(space.name, space)


def load_space(name_or_path: str) -> SearchSpace:
    """A built-in/registered space by name, or a YAML file by path."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return space_from_yaml(name_or_path)
    return SPACES.get(name_or_path)


def _load_builtins() -> None:
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        space = space_from_yaml(path)
        if space.name != path.stem:
            raise SpaceError(f"{path}: name '{space.name}' must match the file name '{path.stem}'")
        register_space(space)


_load_builtins()
