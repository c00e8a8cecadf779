"""Random search: a uniform choice per decision, never repeating a seen key, feasible only."""

from __future__ import annotations

from nas.strategies.base import STRATEGIES, BaseStrategy, bool_option


@STRATEGIES.register("random")
class RandomSearch(BaseStrategy):
    """Uniform sampling per decision. Options: ``dedupe`` (default true: skip seen keys)."""

    name = "random"
    OPTIONS = {"dedupe": bool_option(True)}

    def _propose(self) -> str | None:
        if self.opts["dedupe"]:
            return self.random_key()
        for _ in range(self.MAX_TRIES):
            key = self.key_of(self.random_vec())
            if self.is_feasible(key):
                return key
        return self.scan_key()
