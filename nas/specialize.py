"""Specialization without training: the best candidate of a trained supernet for each device (Ray-free).

For each target (a hardware profile and its hard constraints, e.g. ``latency_ms@pixel4 <= 3``)
an aging evolution (`nas.strategies.evolution`) searches the space with the accuracy predictor
as its fitness (propose: thousands of candidates, microseconds each) and only candidates that
meet the constraints (predicted latency from the profile's cost model, as `nas.objective`);
the `confirm` best predicted candidates are then measured on the supernet (confirm) and ranked
by measured inherited accuracy. Each target writes ``RUN_DIR/specialized/PROFILE/`` as a run
directory of its own (config.yaml, winners.json, winners/NN/ with extracted weights,
specialize.json), so `nas distill` and `nas export` take it like a search's run directory.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from evaluators.cost import analytic_cost
from evaluators.hardware import PROFILES
from evaluators.predictor import Predictor
from evaluators.variables import save_variables
from nas.config import SpecializeConfig
from search_spaces.schema import to_plain
from nas.inherited import Scorer, SupernetScorer, fitted_predictor
from nas.objective import LATENCY_PREFIX, Constraint, Objective, check_cost_name, latency_profile, own_latency
from nas.rundir import ARCHITECTURE, CONFIG, VARIABLES, WINNERS_DIR, Winner, write_winners
from nas.strategies import make_strategy
from nas.teacher import largest
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

FEASIBILITY_PROBES = 2000


@dataclass(frozen=True)
class Target:
    """One device to specialize for: a hardware profile and the hard constraints its winner must meet."""

    profile: str
    constraints: tuple[Constraint, ...] = ()

    def objective(self) -> Objective:
        record = ("params", "macs", f"{LATENCY_PREFIX}{self.profile}")
        return Objective(constraints=self.constraints, record=record)

    def describe(self) -> str:
        return " and ".join(f"{c.cost} <= {c.maximum:g}" for c in self.constraints) or "no constraint"


# ==================================================================== targets from the command line or the config
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w@.:-]*)\s*(?:<=|=)\s*([0-9.eE+-]+)\s*$")


def parse_targets(profiles: Sequence[str], constraints: Sequence[str], *, all_profiles: bool = False) -> list[Target]:
    """Targets from `--profile P` and `--constraint COST=MAX` (or `COST<=MAX`) arguments.

    A constraint on `latency_ms@P[:PRECISION]` belongs to profile P (which must be one of the targets);
    a constraint on `latency_ms[:PRECISION]` without a profile applies to every target's own latency
    (`:int8`: its measured int8 table); any other
    cost (params, macs, ...) applies to every target. `all_profiles` targets every registered profile.
    """
    if all_profiles and profiles:
        raise NasError("--all-profiles: give either --all-profiles or --profile, not both")
    names = list(PROFILES.names()) if all_profiles else list(dict.fromkeys(profiles))
    if not names:
        raise NasError("specialize: give at least one --profile PROFILE (or --all-profiles); allowed: "
                       + ", ".join(PROFILES.names()))
    for n in names:
        PROFILES.get(n)  # unknown profile: one line listing the registered ones
    per: dict[str, list[Constraint]] = {n: [] for n in names}
    for text in constraints:
        m = _CONSTRAINT.match(text)
        if not m:
            raise NasError(f"--constraint {text!r}: expected COST=MAX, e.g. latency_ms@pixel4=3.0 or params=50000")
        cost, value = m.group(1), float(m.group(2))
        if not math.isfinite(value) or value <= 0:
            raise NasError(f"--constraint {text!r}: the maximum must be a positive number")
        own = {n: own_latency(cost, n) for n in names}  # latency_ms[:PRECISION]: each target's own
        if None not in own.values():
            for n, name in own.items():
                check_cost_name(name, f"--constraint {text!r}")
                per[n].append(Constraint(name, value))
            continue
        check_cost_name(cost, f"--constraint {text!r}")
        prof = latency_profile(cost)
        if prof is not None:
            if prof not in per:
                raise NasError(f"--constraint {text!r}: profile '{prof}' is not a target; allowed: {', '.join(names)} "
                               f"(add --profile {prof})")
            per[prof].append(Constraint(cost, value))
        else:
            for n in names:
                per[n].append(Constraint(cost, value))
    return [Target(n, tuple(per[n])) for n in names]


def config_targets(cfg: SpecializeConfig) -> list[Target]:
    """The targets of an experiment's `specialize.targets` (validated when the config was loaded)."""
    return [Target(p, tuple(Constraint(c, v) for c, v in limits.items())) for p, limits in cfg.constraints().items()]


def with_effort(cfg: SpecializeConfig, *, budget: int | None = None, confirm: int | None = None,
                measure: int | None = None) -> SpecializeConfig:
    """`cfg` with the command line's effort (None: unchanged), validated; population and top_k shrink to
    fit a smaller budget / confirm."""
    raw = to_plain(cfg)
    if budget is not None:
        raw.update(budget=budget, population=min(cfg.population, budget) if budget >= 1 else cfg.population)
    if confirm is not None:
        raw.update(confirm=confirm, top_k=min(cfg.top_k, confirm) if confirm >= 1 else cfg.top_k)
    if measure is not None:
        raw["measure"] = measure
    return SpecializeConfig.from_dict(raw, "nas specialize: specialize")


# ==================================================================== the search
@dataclass
class Specialized:
    """The result for one target: winners (measured, best first) and what the search did."""

    target: Target
    winners: list[dict[str, Any]]  # key, predicted, measured, costs
    proposed: int
    feasible_seen: int
    measured: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def check_reachable(space: SearchSpace, target: Target, seed: int = 0) -> None:
    """Raise a one-line NasError when no sampled candidate meets the target's constraints."""
    if not target.constraints:
        return
    obj = target.objective()
    rng = np.random.default_rng([seed, 3])
    best: dict[str, float] = {}
    for _ in range(FEASIBILITY_PROBES):
        arch = space.sample(rng)
        costs = obj.costs(arch)
        if not obj.violations(costs):
            return
        for c in target.constraints:
            best[c.cost] = min(best.get(c.cost, math.inf), costs[c.cost])
    lowest = ", ".join(f"{k} {v:.4g}" for k, v in best.items())
    raise NasError(f"specialize {target.profile}: no candidate of space '{space.name}' meets {target.describe()} "
                   f"({FEASIBILITY_PROBES} sampled; lowest seen: {lowest}); loosen the constraint")


def specialize_target(scorer: Scorer, predictor: Predictor, target: Target, cfg: SpecializeConfig,
                      printer: Callable[..., None] | None = None) -> Specialized:
    """Evolve with predicted accuracy over feasible candidates, then measure the best `confirm`."""
    t0 = time.perf_counter()
    space = scorer.space
    check_reachable(space, target, cfg.seed)
    obj = target.objective()
    costs: dict[str, dict[str, float]] = {}

    def feasible(arch: Architecture) -> bool:
        c = costs[arch.key] = obj.costs(arch)
        return not obj.violations(c)

    strategy = make_strategy("evolution", space, seed=cfg.seed, feasible=feasible, budget=cfg.budget,
                             options={"population": cfg.population, "sample": min(cfg.sample, cfg.population),
                                      "mutations": cfg.mutations})
    predicted: dict[str, float] = {}
    t_predict = 0.0
    while len(predicted) < cfg.budget:
        batch = []
        for _ in range(min(cfg.batch, cfg.budget - len(predicted))):
            config = strategy.suggest()
            if config is None:
                break
            batch.append(config)
        if not batch:
            break
        keys = [strategy.key_of(tuple(c[d.name] for d in strategy.decisions)) for c in batch]
        tp = time.perf_counter()
        scores = predictor.predict(keys)
        t_predict += time.perf_counter() - tp
        for config, key, s in zip(batch, keys, scores):
            predicted[key] = float(s)
            strategy.observe(config, float(s))
    if not predicted:
        raise NasError(f"specialize {target.profile}: the search found no candidate meeting {target.describe()}")
    t_search = time.perf_counter() - t0
    best = sorted(predicted, key=lambda k: (-predicted[k], k))[: cfg.confirm]
    archs = [space.decode(k) for k in best]
    tm = time.perf_counter()
    measured = scorer.score(archs)
    t_measure = time.perf_counter() - tm
    order = sorted(range(len(archs)), key=lambda i: (-float(measured[i]), -predicted[best[i]], best[i]))
    winners = [{"key": best[i], "architecture": archs[i], "predicted": predicted[best[i]],
                "measured": float(measured[i]), "costs": costs.get(best[i]) or obj.costs(archs[i])}
               for i in order[: cfg.top_k]]
    return Specialized(target, winners, proposed=len(strategy.history) + len(strategy.pending),
                       feasible_seen=len(predicted), measured=len(archs), seconds=time.perf_counter() - t0,
                       timings={"search_s": t_search, "predict_s": t_predict, "measure_s": t_measure})


# ==================================================================== writing a run directory
def write_specialized(out_dir: Path, result: Specialized, scorer: Scorer, base_config: dict[str, Any] | None,
                      *, teacher: str | None = None) -> Path:
    """RUN_DIR/specialized/PROFILE/: winners.json in a search's format, weights under winners/NN/.

    `base_config` (the supernet run's experiment config as plain data) is saved as config.yaml with
    the target's constraints, so `nas distill`/`nas export` read this folder as a run directory;
    `teacher` (a checkpoint folder) becomes `distill.teacher` when given. The predicted accuracy and
    the costs of each winner are in specialize.json.
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / WINNERS_DIR).mkdir(parents=True)
    winners = []
    for rank, w in enumerate(result.winners, start=1):
        arch: Architecture = w["architecture"]
        variables = scorer.extract(arch)
        checkpoint = None
        if variables is not None:
            dest = out_dir / WINNERS_DIR / f"{rank:02d}"
            dest.mkdir(parents=True)
            save_variables(dest / VARIABLES, variables)
            (dest / ARCHITECTURE).write_text(arch.to_json(indent=2))
            checkpoint = str(dest.relative_to(out_dir))
        cost = analytic_cost(arch)
        winners.append(Winner(rank=rank, key=w["key"], space=arch.space,
                              trial_id=f"specialized-{result.target.profile}", score=w["measured"],
                              val_accuracy=w["measured"], params=int(cost.params), macs=int(cost.macs),
                              architecture=arch, checkpoint=checkpoint))
    write_winners(out_dir, winners)
    if base_config is not None:
        cfg = json.loads(json.dumps(base_config))
        cfg["name"] = out_dir.name
        cfg.pop("output_dir", None)
        obj = cfg.setdefault("objective", {})
        obj["constraints"] = {c.cost: c.maximum for c in result.target.constraints}
        obj["profiles"] = [result.target.profile]
        if teacher:
            cfg.setdefault("distill", {})["teacher"] = {"checkpoint": teacher}
        (out_dir / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out_dir / "specialize.json").write_text(json.dumps({
        "profile": result.target.profile, "constraints": {c.cost: c.maximum for c in result.target.constraints},
        "proposed": result.proposed, "feasible_predicted": result.feasible_seen, "measured": result.measured,
        "seconds": result.seconds, **result.timings,
        "winners": [{"key": w["key"], "predicted": w["predicted"], "measured": w["measured"], **w["costs"]}
                    for w in result.winners],
    }, indent=2))
    return out_dir


# ==================================================================== the command
def run_specialize(run_dir: str | Path, targets: Sequence[Target] | None = None, cfg: SpecializeConfig | None = None,
                   *, measure: int | None = None, effort: dict[str, int | None] | None = None,
                   scorer: Scorer | None = None, printer=print) -> list[Specialized]:
    """`nas specialize`: for each target, the best candidates of the run's trained supernet.

    Args:
        run_dir: a run directory holding a trained supernet (`RUN_DIR/supernet/`, `nas supernet train`).
        targets: from `parse_targets`; None: the run's experiment config's `specialize.targets`.
        cfg: search effort per target; None: the run's experiment config's `specialize` section.
        measure: random candidates measured (once per run, cached) to fit the accuracy predictor
            (None: `cfg.measure`).
        effort: budget / confirm / measure from the command line on top of `cfg` (`with_effort`).
        scorer: the run's supernet scorer, opened by the caller (e.g. over Ray workers:
            `nas.tune.scoring.open_scorer`); None: `SupernetScorer.from_run(run_dir)`, in this process.

    Returns:
        One `Specialized` per target; each also written to RUN_DIR/specialized/PROFILE/.

    Raises:
        NasError: no supernet in the run, no target given nor declared, or a target no candidate
        meets (checked for every target before any is searched).
    """
    scorer = scorer or SupernetScorer.from_run(run_dir)
    cfg = with_effort(cfg or scorer.experiment.specialize, **(effort or {}))
    if targets is None:
        targets = config_targets(scorer.experiment.specialize)
    if not targets:
        raise NasError(f"specialize: no target; give --profile PROFILE (or --all-profiles) or declare "
                       f"specialize.targets in the experiment ({scorer.run_dir / 'supernet' / 'config.yaml'})")
    for t in targets:
        check_reachable(scorer.space, t, cfg.seed)
    predictor, info = fitted_predictor(scorer, n_measure=measure or cfg.measure, seed=cfg.seed, printer=printer)
    if not info.get("reused"):
        printer(f"accuracy predictor: {info['measured']} measured candidates ({info['measure_s']:.1f} s), held-out "
                f"Kendall tau {info['holdout_tau']:.3f}, RMSE {info['holdout_rmse']:.4f}", flush=True)
    out_root = scorer.run_dir / "specialized"
    teacher_dir = out_root / "teacher-largest"
    big = largest(scorer.space)
    if not (teacher_dir / VARIABLES).exists():
        teacher_dir.mkdir(parents=True, exist_ok=True)
        save_variables(teacher_dir / VARIABLES, scorer.extract(big))
        (teacher_dir / ARCHITECTURE).write_text(big.to_json(indent=2))
    base = scorer.experiment.to_dict()
    results = []
    for t in targets:
        r = specialize_target(scorer, predictor, t, cfg)
        write_specialized(out_root / t.profile, r, scorer, base, teacher=str(teacher_dir))
        w = r.winners[0]
        lat = w["costs"][f"{LATENCY_PREFIX}{t.profile}"]
        also = "".join(f", {c.cost} {w['costs'][c.cost]:.4g}" for c in t.constraints
                       if c.cost.startswith(LATENCY_PREFIX) and c.cost != f"{LATENCY_PREFIX}{t.profile}")
        printer(f"{t.profile}: {w['key']}  latency {lat:.3f} ms{also} ({t.describe()})  inherited accuracy "
                f"{w['measured']:.4f} (predicted {w['predicted']:.4f})  {r.feasible_seen} predicted, {r.measured} "
                f"measured, {r.seconds:.1f} s -> {out_root / t.profile / 'winners.json'}", flush=True)
        results.append(r)
    return results
