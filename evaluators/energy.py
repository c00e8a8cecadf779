"""Energy per inference on a hardware profile: arithmetic plus weight and activation traffic.

A profile's `energy_pj` gives the energy of one multiply and one add per precision and of reading
one 32-bit word from DRAM and from on-chip SRAM (each figure's source in the profile's
`sources.energy_pj`; validated with the profile, `evaluators.hardware.parse_energy`). For one inference at batch 1 and precision p:

    arithmetic  = sum over conv/dense MACs (mult[p] + add[p]) + elementwise ops (pool: add,
                  SE scaling: mult, residual: add); BatchNorm and activations are folded/fused
                  into the preceding kernel at deployment, as in the latency model
    weights     = every weight read once from DRAM: bytes(p) / 4 words x dram_read_32bit
    activations = every kernel's input and output through SRAM: bytes(p) / 4 words x sram_read_32bit

The operator list is `search_spaces.graph.network_ops`, the same the cost and latency models read.
It is a first-order model (no reuse beyond one weight read, no leakage, no caches of weights):
useful for ranking networks and precisions, not as a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from evaluators.hardware import PRECISION_BYTES, PROFILES, get_profile, op_class, op_work
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.graph import network_ops

PREFIX = "energy_mj@"  # the cost name: energy_mj@PROFILE or energy_mj@PROFILE:PRECISION


@dataclass(frozen=True)
class EnergyEstimate:
    """Energy of one inference (millijoules) and its three terms."""

    total_mj: float
    arithmetic_mj: float
    weights_mj: float
    activations_mj: float
    profile: str
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def energy(arch: Architecture, profile: Any, precision: str | None = None) -> EnergyEstimate:
    """Energy per inference of `arch` at batch 1 on `profile` (name, YAML path or Profile).

    Raises NasError if the profile has no energy figures or does not support `precision`."""
    prof = get_profile(profile)
    if prof.energy_pj is None:
        raise NasError(f"profile '{prof.name}': no energy figures (energy_pj); energy_mj needs them")
    prec = prof.check_precision(precision)
    e = prof.energy_pj
    mult, add = e["mult"][prec], e["add"][prec]
    words = PRECISION_BYTES[prec] / 4
    arith = weights = acts = 0.0
    for op in network_ops(arch):
        cls = op_class(op)
        if cls is None:
            continue
        ops, w, a = op_work(op)
        if op.kind in ("conv", "pwconv", "dwconv", "dense"):
            arith += ops / 2 * (mult + add)  # op_work counts 2 operations per MAC
        elif op.kind == "mul":
            arith += ops * mult
        else:  # pool, residual add
            arith += ops * add
        weights += w * words * e["dram_read_32bit"]
        acts += a * words * e["sram_read_32bit"]
    to_mj = 1e-9
    return EnergyEstimate((arith + weights + acts) * to_mj, arith * to_mj, weights * to_mj, acts * to_mj,
                          prof.name, prec)


def parse_cost_name(name: str) -> tuple[str, str | None]:
    """'energy_mj@PROFILE[:PRECISION]' -> (profile, precision or None); checks both exist."""
    prof, _, prec = name[len(PREFIX):].partition(":")
    p = PROFILES.get(prof)
    if p.energy_pj is None:
        raise NasError(f"{name}: profile '{prof}' has no energy figures; allowed profiles: "
                       f"{', '.join(n for n in PROFILES.names() if PROFILES.get(n).energy_pj is not None)}")
    if prec:
        p.check_precision(prec)
    return prof, prec or None


def energy_mj(arch: Architecture, name: str) -> float:
    """The value of the cost `energy_mj@PROFILE[:PRECISION]` for `arch`."""
    prof, prec = parse_cost_name(name)
    return energy(arch, prof, prec).total_mj
