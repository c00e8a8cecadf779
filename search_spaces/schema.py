"""Frozen dataclasses from plain data (YAML mappings): the one config builder of the project.

A config section is a frozen dataclass whose fields declare what they accept; `build(cls, raw,
source)` checks every key and value once and returns the instance, or raises a one-line
`NasError` naming the file, the dotted key and what is allowed. What a field accepts comes from
its type hint (bool, int, float, str, tuple[str, ...], Mapping, a nested section, `X | None`)
and from `spec(...)` metadata (choices, bounds, a shorthand, a custom check). A section with
rules between fields defines `check(self, err)`.

Numbers: YAML 1.1 reads `2e-3` (no dot) as a string; a float field takes such a string here, and
nowhere else. Hand-written rather than pydantic: the sections are a dozen plain dataclasses that
other floors construct directly, and the error format (`FILE: a.b: what is allowed`) is the
project's; pydantic would add a model layer and a message translator of about this size.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping, Union

from search_spaces.errors import NasError


def spec(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
         choices: tuple[Any, ...] | None = None, ge: float | None = None, gt: float | None = None,
         le: float | None = None, shorthand: str | None = None,
         check: Callable[[Any], str | None] | None = None, what: str = "") -> Any:
    """A dataclass field with validation rules.

    choices: the allowed values; ge/gt/le: bounds of a number; shorthand: a nested section may be
    given as a scalar, which becomes that field of the section (`dataset: digits`); check: a
    function returning an error message (what is allowed) or None; what: the noun of a value not
    among `choices` ("unknown format 'x'; allowed: ...").
    """
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "shorthand": shorthand, "check": check, "what": what}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Errors:
    """Raises `NasError("SOURCE: KEY: message")` for one section; `at(key)` for a nested one."""

    def __init__(self, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def at(self, name: str) -> "Errors":
        return Errors(self.source, self.key(name))

    def __call__(self, name: str, message: str) -> NasError:
        where = self.key(name) if name else (self.prefix or "(top level)")
        return NasError(f"{self.source}: {where}: {message}" if self.source else f"{where}: {message}")


def build(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """`cls` built from the mapping `raw` (a value already of type `cls` is returned as it is)."""
    if isinstance(raw, cls):
        return raw
    err = Errors(source, prefix)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise err("", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in raw.items():
        if k not in fields:
            raise err(str(k), f"unknown key; allowed: {', '.join(sorted(fields))}")
        kwargs[k] = coerce(hints[k], v, fields[k].metadata, err, k)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise err(missing[0], "missing required key")
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(err)
    return obj


def coerce(hint: Any, v: Any, meta: Mapping[str, Any], err: Errors, key: str) -> Any:
    """One value checked against its type hint and `spec` rules; returns it converted."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if meta.get("shorthand") and not isinstance(v, (Mapping, hint)) and v is not None:
            v = {meta["shorthand"]: v}
        return build(hint, v, err.source, err.key(key))
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        if not isinstance(v, bool):
            raise err(key, f"expected true or false, got {v!r}")
    elif hint is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise err(key, f"expected an integer, got {v!r}")
    elif hint is float:
        v = number(v, err, key)
    elif hint is str:
        if not isinstance(v, str):
            raise err(key, f"expected a string, got {v!r}")
    elif origin is tuple:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, (list, tuple)):
            raise err(key, f"expected a list, got {v!r}")
        v = tuple(v)
    elif origin in (collections.abc.Mapping, dict):
        if not isinstance(v, Mapping):
            raise err(key, f"expected a mapping, got {v!r}")
        v = dict(v)
    return _rules(v, meta, err, key)


def number(v: Any, err: Errors, key: str) -> float:
    """A finite float from a number or a numeric string (YAML 1.1 reads '2e-3' as a string)."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise err(key, f"expected a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise err(key, f"expected a number, got {v!r}")
    return float(v)


def _rules(v: Any, meta: Mapping[str, Any], err: Errors, key: str) -> Any:
    choices = meta.get("choices")
    if choices is not None:
        for item in (v if isinstance(v, tuple) else (v,)):
            if item not in choices:
                what = f"unknown {meta['what']} " if meta.get("what") else ""
                raise err(key, f"{what}{item!r}; allowed: {', '.join(str(c) for c in choices)}")
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if ge is not None and le is not None and not ge <= v <= le:
            raise err(key, f"must be in [{ge:g}, {le:g}], got {v!r}")
        for bound, ok, words in ((ge, v >= (ge or 0), ">="), (gt, v > (gt or 0), ">"), (le, v <= (le or 0), "<=")):
            if bound is not None and not ok:
                raise err(key, f"must be {words} {bound:g}, got {v!r}")
    check = meta.get("check")
    if check is not None:
        problem = check(v)
        if problem:
            raise err(key, problem)
    return v


def to_plain(x: Any) -> Any:
    """A config (dataclasses, tuples, mappings) as YAML/JSON-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x
