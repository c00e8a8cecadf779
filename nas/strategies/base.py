"""The ask/tell contract every search strategy follows, shared bookkeeping, and the registry.

A strategy proposes configs (decision name -> option index, exactly the keys of
`SearchSpace.to_param_space()`) and learns from their scores. It never imports Ray: one
adapter in `nas/search.py` turns any strategy into a Tune searcher.

Bookkeeping shared by all strategies (in `BaseStrategy`):
  * every proposal is identified by its canonical architecture key, so two configs that
    differ only in inactive layers are the same candidate;
  * keys already observed or pending (suggested, not yet observed) are never proposed again
    while an unseen candidate can be found;
  * the optional `feasible(arch)` predicate is checked (and cached per key) before proposing;
  * `save()` returns the RNG state, the observation history, the pending keys and any
    strategy-specific extras as plain JSON data; `restore()` rebuilds the strategy so that
    its future suggestions equal those of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.registry import Registry
from search_spaces.space import ALPHABET, INACTIVE, SearchSpace

Config = dict[str, int]
Feasible = Callable[[Architecture], bool]
STATE_VERSION = 1
ENUMERATE_FALLBACK = 200_000  # spaces up to this size are scanned when random sampling finds nothing new


@runtime_checkable
class Strategy(Protocol):
    """An ask/tell search strategy over the decisions of one search space."""

    name: str

    def suggest(self) -> Config | None:
        """The next config to evaluate, or None when no unseen (feasible) candidate is left."""

    def observe(self, config: Mapping[str, int], score: float | None, feasible: bool = True) -> None:
        """Report a config's score (higher is better); None means the trial failed."""

    def save(self) -> dict[str, Any]:
        """JSON-serialisable state (RNG included)."""

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a `save()` state of a strategy built with the same arguments."""


@dataclass(frozen=True)
class Option:
    """A strategy option: default value, a validity check and the text shown when it fails."""

    default: Any
    check: Callable[[Any], bool]
    allowed: str


def int_option(default: int, low: int = 1, high: int | None = None) -> Option:
    ok = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
    return Option(default, ok, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def float_option(default: float, low: float = 0.0, high: float = float("inf")) -> Option:
    ok = lambda v: isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and low <= v <= high
    return Option(default, ok, f"a number in [{low}, {high}]")


def choice_option(default: str, choices: tuple[str, ...]) -> Option:
    return Option(default, lambda v: v in choices, "one of " + ", ".join(choices))


def bool_option(default: bool) -> Option:
    return Option(default, lambda v: isinstance(v, bool), "true or false")


class BaseStrategy:
    """Shared bookkeeping; subclasses implement `_propose()` (and optionally the hooks)."""

    name: ClassVar[str] = "base"
    OPTIONS: ClassVar[dict[str, Option]] = {}
    MAX_TRIES: ClassVar[int] = 200

    def __init__(self, space: SearchSpace, *, seed: int, options: Mapping[str, Any] | None = None,
                 feasible: Feasible | None = None, budget: int | None = None):
        self.space = space
        self.seed = int(seed)
        self.opts = self._parse_options(options or {})
        self.feasible_fn = feasible
        self.budget = budget
        self.decisions = space.decisions()
        self.n_options = np.array([len(d.options) for d in self.decisions], dtype=np.int64)
        self.rng = np.random.default_rng(self.seed)
        self.history: list[tuple[str, float | None, bool]] = []  # (key, score, feasible) in order
        self.pending: dict[str, None] = {}  # insertion-ordered set of suggested, unobserved keys
        self.seen: set[str] = set()  # observed or pending keys
        self._feasible_cache: dict[str, bool] = {}
        self._key_cache: dict[tuple[int, ...], str] = {}
        self._gates = self._layer_gates()
        self._check_budget()

    # ------------------------------------------------------------------ options
    @classmethod
    def _parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(options, Mapping):
            raise NasError(f"strategy '{cls.name}': options must be a mapping, got {type(options).__name__}")
        out = {k: o.default for k, o in cls.OPTIONS.items()}
        for k, v in options.items():
            if k not in cls.OPTIONS:
                allowed = ", ".join(sorted(cls.OPTIONS)) or "(none)"
                raise NasError(f"strategy '{cls.name}': unknown option '{k}'; allowed: {allowed}")
            if not cls.OPTIONS[k].check(v):
                raise NasError(f"strategy '{cls.name}': option '{k}' = {v!r}; allowed {cls.OPTIONS[k].allowed}")
            out[k] = v
        return out

    def _check_budget(self) -> None:
        """Subclasses raise NasError when an option does not fit the budget."""

    def _budget_at_least(self, option: str) -> None:
        n = self.opts[option]
        if self.budget is not None and n > self.budget:
            raise NasError(
                f"strategy '{self.name}': option '{option}' = {n} is larger than the budget of "
                f"{self.budget} trials; allowed <= {self.budget}"
            )

    # ------------------------------------------------------------------ keys and configs
    def _layer_gates(self) -> list[tuple[int | None, tuple[int, ...], int] | None]:
        """Per decision: None, or (index of its stage's depth decision, depths, layer index)."""
        names = [d.name for d in self.decisions]
        gates = []
        for d in self.decisions:
            if d.layer is None:
                gates.append(None)
                continue
            depth_name = f"s{d.stage}.depth"
            depths = self.space.stages[d.stage].depths
            gates.append((names.index(depth_name) if depth_name in names else None, depths, d.layer))
        return gates

    def key_of(self, vec: tuple[int, ...] | np.ndarray) -> str:
        """Canonical key of an option-index vector: a layer beyond its stage's depth is '-'.

        The same rule as `SearchSpace.from_choices(...).key`, without building the architecture.
        """
        t = tuple(int(v) for v in vec)
        key = self._key_cache.get(t)
        if key is None:
            chars = []
            for v, gate in zip(t, self._gates):
                if gate is not None:
                    pos, depths, layer = gate
                    if layer >= (depths[t[pos]] if pos is not None else depths[0]):
                        chars.append(INACTIVE)
                        continue
                chars.append(ALPHABET[v])
            key = "".join(chars)
            if len(self._key_cache) < 1_000_000:
                self._key_cache[t] = key
        return key

    def vec_of(self, key: str) -> np.ndarray:
        """Option-index vector of a key (inactive layers -> 0)."""
        return np.array([0 if c == INACTIVE else ALPHABET.index(c) for c in key], dtype=np.int64)

    def config_of(self, key: str) -> Config:
        return {d.name: (0 if c == INACTIVE else ALPHABET.index(c)) for d, c in zip(self.decisions, key)}

    def canonical(self, config: Mapping[str, int]) -> str:
        return self.space.from_choices(config).key

    def is_feasible(self, key: str) -> bool:
        """The user's predicate on the decoded architecture, cached per key."""
        if self.feasible_fn is None:
            return True
        ok = self._feasible_cache.get(key)
        if ok is None:
            ok = bool(self.feasible_fn(self.space.decode(key)))
            self._feasible_cache[key] = ok
        return ok

    def acceptable(self, key: str) -> bool:
        """Unseen and feasible."""
        return key not in self.seen and self.is_feasible(key)

    # ------------------------------------------------------------------ sampling helpers
    def random_vec(self) -> np.ndarray:
        return self.rng.integers(self.n_options)

    def random_key(self, tries: int | None = None) -> str | None:
        """A uniformly sampled unseen feasible key; scans small spaces when sampling fails."""
        for _ in range(tries or self.MAX_TRIES):
            key = self.key_of(self.random_vec())
            if self.acceptable(key):
                return key
        return self.scan_key()

    def scan_key(self) -> str | None:
        """A random acceptable key from a full scan (small spaces only), else None."""
        if self.space.size() > ENUMERATE_FALLBACK:
            return None
        keys = [k for k in self.space.keys() if self.acceptable(k)]
        return keys[int(self.rng.integers(len(keys)))] if keys else None

    def mutate(self, key: str, k: int = 1) -> str:
        """Change `k` distinct active decisions of `key` to another option each."""
        vec = self.vec_of(key)
        active = [i for i, c in enumerate(key) if c != INACTIVE and self.n_options[i] > 1]
        k = min(k, len(active))
        for i in self.rng.choice(active, size=k, replace=False):
            shift = int(self.rng.integers(1, self.n_options[i]))
            vec[i] = (vec[i] + shift) % self.n_options[i]
        return self.key_of(vec)

    # ------------------------------------------------------------------ ask / tell
    def suggest(self) -> Config | None:
        key = self._propose()
        if key is None:
            return None
        self.pending[key] = None
        self.seen.add(key)
        return self.config_of(key)

    def observe(self, config: Mapping[str, int], score: float | None, feasible: bool = True) -> None:
        key = self.canonical(config)
        if score is not None:
            score = float(score)
            if not np.isfinite(score):
                score = None
        self._record(key, score, bool(feasible))

    def _record(self, key: str, score: float | None, feasible: bool) -> None:
        self.pending.pop(key, None)
        self.seen.add(key)
        self.history.append((key, score, feasible))
        self._on_observe(key, score, feasible)

    # ------------------------------------------------------------------ hooks
    def _propose(self) -> str | None:
        raise NotImplementedError

    def _on_observe(self, key: str, score: float | None, feasible: bool) -> None:
        """Update derived state; must not draw from the RNG (restore replays it)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _restore_extra(self, extra: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ persistence
    def save(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "version": STATE_VERSION,
            "seed": self.seed,
            "rng": _jsonable(self.rng.bit_generator.state),
            "history": [[k, s, f] for k, s, f in self.history],
            "pending": list(self.pending),
            "extra": self._extra_state(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("strategy") != self.name:
            got = state.get("strategy") if isinstance(state, Mapping) else type(state).__name__
            raise NasError(f"strategy '{self.name}': cannot restore a state saved by '{got}'")
        if state.get("version") != STATE_VERSION:
            raise NasError(f"strategy '{self.name}': state version {state.get('version')!r}, allowed {STATE_VERSION}")
        self.history, self.pending, self.seen = [], {}, set()
        self._reset()
        for key, score, feasible in state["history"]:
            self.space.decode(key)
            self._record(key, None if score is None else float(score), bool(feasible))
        for key in state["pending"]:
            self.pending[key] = None
            self.seen.add(key)
        self._restore_extra(state.get("extra", {}))
        self.rng.bit_generator.state = state["rng"]

    def _reset(self) -> None:
        """Clear derived state before a restore replays the history."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


STRATEGIES: Registry[type[BaseStrategy]] = Registry("search strategy")


def make_strategy(name: str, space: SearchSpace, *, seed: int, options: Mapping[str, Any] | None = None,
                  feasible: Feasible | None = None, budget: int | None = None) -> BaseStrategy:
    """Build a registered strategy by name.

    Args:
        name: a registered name (see `STRATEGIES.names()`), e.g. ``"default"``.
        space: the search space whose decisions are searched.
        seed: seeds the strategy's own generator (fixed seed + sequential use = same suggestions).
        options: strategy-specific options; an unknown or invalid one raises `NasError`.
        feasible: optional predicate; only architectures passing it are proposed.
        budget: the planned number of trials (checked against population sizes).

    Example:
        >>> s = make_strategy("evolution", space, seed=0, options={"population": 20}, budget=100)
        >>> cfg = s.suggest(); s.observe(cfg, 91.2)
    """
    cls = STRATEGIES.get(name)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1):
        raise NasError(f"strategy '{name}': budget {budget!r}; allowed a positive integer")
    return cls(space, seed=seed, options=options, feasible=feasible, budget=budget)
