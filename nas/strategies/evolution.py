"""Regularized (aging) evolution, Real et al. 2019, made constraint-aware and duplicate-free.

The population is the `population` most recent successful observations (the oldest dies
when a new one arrives). Until it is full, candidates are random. Then each candidate is a
mutation of the best of `sample` members drawn at random (tournament selection), changing
`mutations` decisions. A candidate that was already seen or pending, or that fails the
feasibility predicate, is re-drawn (new tournament, and after every `MAX_TRIES // 8`
failures one more mutated decision); random sampling is the last resort.
"""

from __future__ import annotations

from collections import deque

from nas.strategies.base import STRATEGIES, BaseStrategy, int_option
from search_spaces.errors import NasError


@STRATEGIES.register("evolution")
class RegularizedEvolution(BaseStrategy):
    """Aging evolution. Options: ``population`` (20), ``sample`` (5), ``mutations`` (1)."""

    name = "evolution"
    OPTIONS = {
        "population": int_option(20, low=2),
        "sample": int_option(5, low=1),
        "mutations": int_option(1, low=1),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reset()

    def _check_budget(self) -> None:
        self._budget_at_least("population")
        if self.opts["sample"] > self.opts["population"]:
            raise NasError(f"strategy '{self.name}': option 'sample' = {self.opts['sample']} is larger than 'population' = "
                               f"{self.opts['population']}; allowed <= population")

    def _reset(self) -> None:
        self.population: deque[tuple[str, float]] = deque(maxlen=self.opts["population"])

    def _on_observe(self, key: str, score: float | None, feasible: bool) -> None:
        if score is not None and feasible:
            self.population.append((key, score))

    def _propose(self) -> str | None:
        if not self.population or len(self.population) + len(self.pending) < self.opts["population"]:
            return self.random_key()
        members = list(self.population)
        for attempt in range(self.MAX_TRIES):
            idx = self.rng.choice(len(members), size=min(self.opts["sample"], len(members)), replace=False)
            parent = max((members[i] for i in idx), key=lambda m: m[1])[0]
            child = self.mutate(parent, self.opts["mutations"] + attempt // max(1, self.MAX_TRIES // 8))
            if self.acceptable(child):
                return child
        return self.random_key()

