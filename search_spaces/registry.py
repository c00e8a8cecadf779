"""A tiny name -> object registry that fails loudly (duplicates, unknown names)."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from search_spaces.errors import NasError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. Registering a name twice raises; a failed lookup lists what exists."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None, *, replace: bool = False):
        """Register `item` under `name`; usable as a decorator when `item` is omitted."""

        def add(obj: T) -> T:
            if name in self._items and not replace:
                raise NasError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        if item is None:
            return add
        return add(item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            allowed = ", ".join(sorted(self._items)) or "(none)"
            raise NasError(f"unknown {self.kind} '{name}'; allowed: {allowed}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
