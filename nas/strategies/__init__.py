"""Ray-free ask/tell search strategies, built by name with `make_strategy`.

Registered names: ``random``, ``evolution``, ``bayesopt`` and ``default`` (= ``bayesopt``).
"""

from nas.strategies.base import STRATEGIES, BaseStrategy, Strategy, make_strategy
from nas.strategies import bayesopt, evolution, random_search  # noqa: F401  (registration)

__all__ = ["STRATEGIES", "BaseStrategy", "Strategy", "make_strategy"]
