"""Energy per inference on a hardware profile: arithmetic plus weight and activation traffic.

A profile's `energy_pj` gives the energy of one multiply and one add per precision and of reading
one 32-bit word from DRAM and from on-chip SRAM (each figure's source in the profile's
`sources.energy_pj`). For one inference at batch 1 and precision p:

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

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.graph import network_ops

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
MEMORY_KEYS = ("dram_read_32bit", "sram_read_32bit")
PREFIX = "energy_mj@"  # the cost name: energy_mj@PROFILE or energy_mj@PROFILE:PRECISION


def parse_energy(d: Any, precisions: list[str], sources: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate a profile's `energy_pj` mapping: {mult: {p: pJ}, add: {p: pJ}, dram_read_32bit, sram_read_32bit}
    with a multiply and add figure for every declared precision, and a `sources.energy_pj` entry."""
    allowed = ("mult", "add", *MEMORY_KEYS)
    if not isinstance(d, Mapping):
        raise NasError(f"{where}: energy_pj: expected a mapping with keys {', '.join(allowed)}")
    for k in d:
        if k not in allowed:
            raise NasError(f"{where}: energy_pj.{k}: unknown key; allowed: {', '.join(allowed)}")
    out: dict[str, Any] = {}
    for k in ("mult", "add"):
        per = d.get(k)
        if not isinstance(per, Mapping):
            raise NasError(f"{where}: energy_pj.{k}: expected a mapping precision -> pJ for {', '.join(precisions)}")
        out[k] = {}
        for p in precisions:
            out[k][p] = _nonneg(per.get(p), f"{where}: energy_pj.{k}.{p}")
    for k in MEMORY_KEYS:
        out[k] = _nonneg(d.get(k), f"{where}: energy_pj.{k}")
    if not isinstance(sources.get("energy_pj"), str) or not sources["energy_pj"].strip():
        raise NasError(f"{where}: sources.energy_pj: required with energy_pj (name where the figures come from)")
    return out


def _nonneg(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise NasError(f"{where}: {v!r}; allowed a number >= 0 (picojoules)")
    return float(v)


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
    # hardware imports this module while it loads its built-in profiles: import it here, not at the top
    from evaluators.hardware import get_profile, op_class, op_work

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
    from evaluators.hardware import PROFILES

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
