"""The search objective: accuracy times soft cost penalties, subject to hard constraints.

Costs are looked up by name: `params`, `macs`, `activation_bytes`, `weight_bytes_fp32`,
`weight_bytes_int8`, `latency_ms@PROFILE[:PRECISION]` (predicted latency on a named hardware
profile; `:int8` from the measured int8 look-up table, `evaluators.latency`) and
`energy_mj@PROFILE[:PRECISION]` (energy per inference, `evaluators.energy`).
Soft penalty (MnasNet, Tan et al. 2019): score = acc * (cost / target) ** w with w = alpha when
cost <= target and beta otherwise. Hard constraints are checked from the cost model *before*
training, so an infeasible candidate is never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from evaluators.cost import analytic_cost
from evaluators.energy import PREFIX as ENERGY_PREFIX
from evaluators.energy import energy_mj, parse_cost_name
from evaluators.latency import PREFIX as LATENCY_PREFIX
from evaluators.latency import int8_table, latency_ms
from evaluators.latency import parse_cost_name as parse_latency_name
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.registry import Registry

CostFn = Callable[[Architecture], float]
COSTS: Registry[CostFn] = Registry("cost")
COSTS.register("params", lambda a: float(analytic_cost(a).params))
COSTS.register("macs", lambda a: float(analytic_cost(a).macs))
COSTS.register("activation_bytes", lambda a: float(analytic_cost(a).activation_bytes))
COSTS.register("weight_bytes_fp32", lambda a: float(analytic_cost(a).weight_bytes["fp32"]))
COSTS.register("weight_bytes_int8", lambda a: float(analytic_cost(a).weight_bytes["int8"]))


OWN_LATENCY = "latency_ms"  # a device's own latency, in specialization targets: latency_ms[:PRECISION]


def own_latency(cost: str, profile: str) -> str | None:
    """`latency_ms` or `latency_ms:PRECISION` spelled as `profile`'s own cost
    (`latency_ms@PROFILE[:PRECISION]`); None for any other cost name."""
    base, sep, precision = cost.partition(":")
    return f"{LATENCY_PREFIX}{profile}{sep}{precision}" if base == OWN_LATENCY else None


def latency_profile(name: str) -> str | None:
    """The profile of a `latency_ms@PROFILE[:PRECISION]` cost (checked), None for other costs."""
    return parse_latency_name(name)[0] if name.startswith(LATENCY_PREFIX) else None


def check_cost_name(name: str, where: str) -> None:
    """Raise a one-line error unless `name` is a known cost (latency_ms@<known profile>[:fp32|int8]:
    at int8 the profile's measured int8 table must exist and load)."""
    if name.startswith(LATENCY_PREFIX):
        try:
            profile, precision = parse_latency_name(name)
            if precision == "int8":
                int8_table(profile)
        except NasError as e:
            raise NasError(f"{where}: {e}") from None
        return
    if name.startswith(ENERGY_PREFIX):
        try:
            parse_cost_name(name)
        except NasError as e:
            raise NasError(f"{where}: {e}") from None
        return
    if name not in COSTS:
        raise NasError(f"{where}: unknown cost '{name}'; allowed: {', '.join(COSTS.names())}, "
                       f"{LATENCY_PREFIX}PROFILE[:int8], {ENERGY_PREFIX}PROFILE[:PRECISION]")


def cost_value(name: str, arch: Architecture) -> float:
    """The value of one named cost for `arch`."""
    if name.startswith(LATENCY_PREFIX):
        return float(latency_ms(arch, name))
    if name.startswith(ENERGY_PREFIX):
        return energy_mj(arch, name)
    return COSTS.get(name)(arch)


@dataclass(frozen=True)
class SoftPenalty:
    """acc * (cost/target)^w, w = alpha under target, beta over (MnasNet's soft constraint)."""

    cost: str
    target: float
    alpha: float = -0.07
    beta: float = -0.07

    def factor(self, costs: Mapping[str, float]) -> float:
        ratio = costs[self.cost] / self.target
        return ratio ** (self.alpha if ratio <= 1 else self.beta)


@dataclass(frozen=True)
class Constraint:
    """A hard upper bound on one cost."""

    cost: str
    maximum: float

    def violation(self, costs: Mapping[str, float]) -> str | None:
        value = costs[self.cost]
        return None if value <= self.maximum else f"{self.cost} {value:g} > {self.maximum:g}"


@dataclass(frozen=True)
class Objective:
    """Score = accuracy x product of soft penalties; feasible = every constraint holds."""

    penalties: tuple[SoftPenalty, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    record: tuple[str, ...] = ("params", "macs")

    @classmethod
    def from_config(cls, cfg, where: str = "objective") -> "Objective":
        """Build from an `ObjectiveConfig` (nas.config), checking every cost name."""
        penalties = ()
        if cfg.cost is not None:
            check_cost_name(cfg.cost, f"{where}.cost")
            penalties = (SoftPenalty(cfg.cost, float(cfg.target), float(cfg.alpha), float(cfg.beta)),)
        constraints = []
        for name, maximum in cfg.constraints.items():
            check_cost_name(name, f"{where}.constraints.{name}")
            constraints.append(Constraint(name, float(maximum)))
        record = ["params", "macs"] + [f"{LATENCY_PREFIX}{p}" for p in cfg.profiles]
        for p in cfg.profiles:
            check_cost_name(f"{LATENCY_PREFIX}{p}", f"{where}.profiles")
        return cls(tuple(penalties), tuple(constraints), tuple(dict.fromkeys(record)))

    def cost_names(self) -> tuple[str, ...]:
        names = list(self.record) + [p.cost for p in self.penalties] + [c.cost for c in self.constraints]
        return tuple(dict.fromkeys(names))

    def costs(self, arch: Architecture) -> dict[str, float]:
        """Every cost this objective needs or records, for `arch`."""
        return {name: cost_value(name, arch) for name in self.cost_names()}

    def violations(self, costs: Mapping[str, float]) -> list[str]:
        return [v for c in self.constraints if (v := c.violation(costs))]

    def feasible(self, arch: Architecture) -> bool:
        return not self.violations(self.costs(arch))

    def score(self, accuracy: float, costs: Mapping[str, float]) -> float:
        s = float(accuracy)
        for p in self.penalties:
            s *= p.factor(costs)
        return s
