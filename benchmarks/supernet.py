"""Benchmark the weight-sharing supernet route against stand-alone training (issue 22).

On `mobile_small` and a dataset (default mnist5k), in one process, no Ray:

* ranking: Kendall tau between inherited accuracy (BatchNorm re-estimated, whole validation
  split) and stand-alone accuracy (mean of 2 seeds trained at the search's budget with
  `evaluators.train.train`) on `--candidates` random candidates, beside tau between the two
  stand-alone seeds (the noise ceiling);
* throughput: candidates scored per CPU-minute (process CPU time) on the supernet and trained
  per CPU-minute stand-alone; XLA compilations while scoring `--compile-probe` candidates;
  predictions per minute and the predictor's held-out tau against measured inherited accuracy;
* specialization: seconds per hardware profile (all built-in profiles, each constrained to its
  median sampled latency);
* end to end at equal wall clock (`--seeds` seeds): supernet training + batched search on the
  supernet + fine-tuning of the winner, against a stand-alone random search given the same wall
  time, both under the same latency constraint; the winners' test accuracy;
* inheritance: the supernet winner fine-tuned from its inherited weights against the same
  architecture trained from scratch with the same schedule (test accuracy, points).
* bias: Kendall tau of inherited and of stand-alone accuracy with each candidate's number of
  `ds`, `mb` and `skip` layers, its depth and MACs (`ranking_bias`): which kinds of network the
  supernet under- or over-rates against training.

    python benchmarks/supernet.py [--json] [--quick]
    python benchmarks/supernet.py --throughput-only [--candidates N] [--json]
    python benchmarks/supernet.py --bias-from OUT.json     # the bias table of an earlier --out file

--throughput-only measures only the scoring cost per candidate (BatchNorm re-estimation on
`--recalibration-images` training images + the whole validation split) on freshly initialised
weights: the work per candidate does not depend on the weights' values, so no training is needed.
Run it alternately from two checkouts to compare versions (A/B rounds in separate processes).

The last line with --json is one JSON object (keys listed in `SUMMARY_KEYS`). Timings on a shared
machine are noisy: the figures are ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from evaluators.cost import analytic_cost  # noqa: E402
from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.predictor import PredictorConfig, fit_predictor  # noqa: E402
from evaluators.supernet import SupernetConfig, load_supernet, save_supernet, train_supernet  # noqa: E402
from evaluators.supernet_score import RECAL_IMAGES, score  # noqa: E402
from evaluators.optim import TrainConfig  # noqa: E402
from evaluators.predict import evaluate  # noqa: E402
from evaluators.train import train  # noqa: E402
from nas.objective import cost_value  # noqa: E402
from nas.specialize import SpecializeConfig, Target, specialize_target  # noqa: E402
from nas.objective import Constraint  # noqa: E402
from nas.config import apply_overrides  # noqa: E402
from search_spaces.catalog import load_space  # noqa: E402
from search_spaces.supernet import extract  # noqa: E402

SUMMARY_KEYS = ("kendall_tau", "seed_tau", "candidates", "evals_per_cpu_minute", "predicted_per_minute",
                "predictor_tau", "standalone_per_cpu_minute", "compiles_per_1000", "specialize_s_max",
                "e2e_seeds_won", "inherit_vs_scratch_pt")


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring duration events) while active."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **kw) -> None:
        if self.active and event.endswith("backend_compile_duration"):
            self.count += 1


def cpu_s() -> float:
    return time.process_time()  # every thread of this process: XLA's included


def sample(space, n, rng, feasible=None):
    keys, out = set(), []
    while len(out) < n:
        a = space.sample(rng)
        if a.key not in keys and (feasible is None or feasible(a)):
            keys.add(a.key)
            out.append(a)
    return out


def standalone(arch, data, cfg):
    r = train(arch, data, cfg)
    return r.val_accuracy, r


def ranking_bias(space, keys, inherited, standalone) -> dict[str, dict[str, float]]:
    """Kendall tau of inherited and of stand-alone (mean over seeds) accuracy with each candidate's
    count of `ds`/`mb`/`skip` layers, depth and MACs: where the two disagree, the supernet rates a
    kind of network differently from training."""
    archs = [space.decode(k) for k in keys]
    counts = {f"n_{b}": [sum(ly.block == b for ly in x.layers) for x in archs] for b in ("ds", "mb", "skip")}
    counts["depth"] = [len(x.layers) for x in archs]
    counts["macs"] = [analytic_cost(x).macs for x in archs]
    sa = np.asarray(standalone, float).reshape(-1, len(keys)).mean(axis=0)
    return {name: {"standalone": float(kendalltau(sa, v).statistic),
                   "inherited": float(kendalltau(np.asarray(inherited, float), v).statistic)}
            for name, v in counts.items()}


def tau_within_groups(x, y, groups) -> float:
    """Kendall's tau-a of x and y over the pairs in the same group only (pairs tied in x or y count as
    neither): how well x orders y among candidates alike in `groups`."""
    x, y, g = (np.asarray(v, float) for v in (x, y, groups))
    i, j = np.triu_indices(len(x), 1)
    same = g[i] == g[j]
    s = np.sign(x[i] - x[j])[same] * np.sign(y[i] - y[j])[same]
    return float(s.sum() / max(np.count_nonzero(s), 1))


def within_same_ds(space, keys, inherited, standalone) -> dict[str, float]:
    """The ranking among candidates with the same number of `ds` layers (the block the supernet rates
    lowest): inherited against stand-alone (mean over seeds) and, with 2+ seeds, seed against seed."""
    n_ds = [sum(ly.block == "ds" for ly in space.decode(k).layers) for k in keys]
    acc = np.asarray(standalone, float).reshape(-1, len(keys))
    out = {"inherited_vs_standalone": tau_within_groups(inherited, acc.mean(axis=0), n_ds)}
    if len(acc) >= 2:
        out["seed_to_seed"] = tau_within_groups(acc[0], acc[1], n_ds)
    return out


def reference_ceiling(seed_tau: float, inherited_tau: float, n_seeds: int = 2) -> dict[str, float]:
    """How far a noisy stand-alone reference lets the ranking go. Under a Gaussian model (Kendall's tau
    = 2/pi * arcsin(Pearson r)) two training seeds that agree at `seed_tau` each correlate r with the
    candidates' expected accuracy; the mean of `n_seeds` correlates sqrt(R) with it, R = k*r/(1+(k-1)*r).
    `tau_ceiling`: the tau a perfect ranker of expected accuracy gets against that mean; `tau_vs_expected`:
    the inherited ranking's tau against expected accuracy, its measured tau corrected for that noise."""
    r = np.sin(np.pi * max(seed_tau, 1e-9) / 2)
    reliability = n_seeds * r / (1 + (n_seeds - 1) * r)
    rho = np.sin(np.pi * inherited_tau / 2) / np.sqrt(reliability)
    return {"tau_ceiling": float(2 / np.pi * np.arcsin(np.sqrt(reliability))),
            "tau_vs_expected": float(2 / np.pi * np.arcsin(np.clip(rho, -1.0, 1.0)))}


def print_within(within, log) -> None:
    log("tau among candidates with the same number of ds layers: "
        + ", ".join(f"{k} {v:.3f}" for k, v in within.items()))


def print_ceiling(ceiling, log) -> None:
    log(f"reference noise: a perfect ranker of expected accuracy would reach tau {ceiling['tau_ceiling']:.3f} "
        f"against this reference; the inherited ranking against expected accuracy: {ceiling['tau_vs_expected']:.3f}")


def print_bias(bias, log) -> None:
    log("bias: Kendall tau with      stand-alone  inherited")
    for name, t in bias.items():
        log(f"  {name:<24}{t['standalone']:+11.3f}{t['inherited']:+11.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, few candidates, 1 seed")
    p.add_argument("--bias-from", default=None, help="only print the ranking bias of an earlier --out file")
    p.add_argument("--dataset", default=None)
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--supernet-epochs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="stand-alone training budget (the search's)")
    p.add_argument("--out", default=None, help="write the summary JSON here too")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: ranking,e2e,specialize")
    p.add_argument("--throughput-only", action="store_true",
                   help="only candidates scored per CPU-minute, on initialised weights (no training)")
    p.add_argument("--recalibration-images", type=int, default=RECAL_IMAGES)
    p.add_argument("--supernet-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="supernet training settings (keys of the supernet: section), e.g. candidates_per_step=4")
    p.add_argument("--supernet-dir", default=None,
                   help="keep the trained supernet here; a later run with the same settings loads it instead")
    p.add_argument("--standalone-cache", default=None,
                   help="JSON file: reuse the ranking candidates' stand-alone accuracies from it when it holds the "
                        "same candidates, budget and dataset, else train them and write it")
    p.add_argument("--recalibration-sweep", default="250,1000,2000",
                   help="also score the ranking candidates with these numbers of re-estimation images")
    p.add_argument("--workers", type=int, default=0, help="--throughput-only: score over N Ray actors (0: in-process)")
    a = p.parse_args()
    if a.throughput_only:
        return throughput_only(a)
    if a.bias_from:
        saved = json.loads(Path(a.bias_from).read_text())
        r = saved["ranking_candidates"]
        space = load_space("mobile_small").with_input(resolution=load_dataset(saved["dataset"], seed=0).resolution)
        bias = ranking_bias(space, r["keys"], r["inherited"], r["standalone"])
        within = within_same_ds(space, r["keys"], r["inherited"], r["standalone"])
        ceiling = reference_ceiling(saved["seed_tau"], saved["kendall_tau"], len(r["standalone"]))
        print_bias(bias, print)
        print_within(within, print)
        print_ceiling(ceiling, print)
        if a.json:
            print(json.dumps({"ranking_bias": bias, "tau_within_same_ds": within, "reference": ceiling}))
        return 0
    quick = a.quick
    dataset = a.dataset or ("digits" if quick else "mnist5k")
    n_cand = a.candidates or (8 if quick else 40)
    seeds = a.seeds or (1 if quick else 3)
    sn_epochs = a.supernet_epochs or (2 if quick else 15)
    epochs = a.epochs or (2 if quick else 4)
    skip = set(filter(None, a.skip.split(",")))
    recal_sweep = [int(v) for v in a.recalibration_sweep.split(",") if v]
    log = (lambda *x: print(*x, file=sys.stderr, flush=True)) if a.json else (lambda *x: print(*x, flush=True))

    data = load_dataset(dataset, seed=0)
    space = load_space("mobile_small").with_input(resolution=data.resolution)
    tcfg = TrainConfig(epochs=epochs, batch_size=64)
    out: dict = {"dataset": dataset, "space": space.name, "quick": quick, "supernet_epochs": sn_epochs,
                 "standalone_epochs": epochs}
    counter = CompileCounter()

    # ---------------------------------------------------------------- supernet training
    recipe = {"epochs": sn_epochs, "batch_size": 64, "seed": 0, "recalibration_images": a.recalibration_images}
    scfg = SupernetConfig.from_dict(apply_overrides(recipe, a.supernet_set, "--supernet-set"), "--supernet-set")
    out["supernet_config"] = scfg.to_dict()
    saved = None
    if a.supernet_dir and Path(a.supernet_dir, "manifest.json").is_file():
        saved = load_supernet(a.supernet_dir, load_space)
        if saved.manifest.get("config") != scfg.to_dict() or saved.manifest.get("dataset") != dataset:
            saved = None  # another recipe or dataset: train
    if saved is not None:
        variables = saved.variables
        out["supernet_train_s"] = saved.manifest["train_s"]
        out["supernet_train_cpu_s"] = saved.manifest["train_cpu_s"]
        out["supernet_from"] = a.supernet_dir
    else:
        t0, c0 = time.perf_counter(), cpu_s()
        res = train_supernet(space, data, scfg)
        out["supernet_train_s"] = time.perf_counter() - t0
        out["supernet_train_cpu_s"] = cpu_s() - c0
        variables = res.variables
        if a.supernet_dir:
            save_supernet(a.supernet_dir, space, variables, space_ref="mobile_small",
                          space_input={"resolution": data.resolution}, config=scfg, history=res.history,
                          extra={"dataset": dataset, "train_s": out["supernet_train_s"],
                                 "train_cpu_s": out["supernet_train_cpu_s"]})
    log(f"supernet: {sn_epochs} epochs in {out['supernet_train_s']:.0f} s")

    def inherited(archs, split="val"):
        return np.asarray(score(space, variables, archs, data, n_images=scfg.recalibration_images, split=split))

    rng = np.random.default_rng(0)
    cands = sample(space, n_cand, rng)
    inherited(cands[:1])  # compile outside the timed region
    counter.active = True
    t0, c0 = time.perf_counter(), cpu_s()
    inh = inherited(cands)
    sn_cpu = cpu_s() - c0
    counter.active = False
    out["evals_per_cpu_minute"] = len(cands) / (sn_cpu / 60)
    out["evals_per_wall_minute"] = len(cands) / ((time.perf_counter() - t0) / 60)
    out["compiles_scoring_n"] = counter.count

    # ---------------------------------------------------------------- compile count for many candidates
    probe = 200 if quick else 1000
    more = sample(space, probe, np.random.default_rng(5))
    counter.count, counter.active = 0, True
    t0, c0 = time.perf_counter(), cpu_s()
    more_acc = inherited(more)
    counter.active = False
    out["compiles_per_1000"] = counter.count
    out["compiles_measured_on"] = probe
    out["evals_per_cpu_minute_probe"] = probe / ((cpu_s() - c0) / 60)
    out["probe_candidates"] = {"keys": [m.key for m in more], "inherited": np.asarray(more_acc).tolist()}
    log(f"scoring: {out['evals_per_cpu_minute']:.0f} candidates per CPU-minute; {counter.count} compiles for {probe}")

    # ---------------------------------------------------------------- predictor
    n_fit = int(len(more) * 0.8)
    keys = [m.key for m in more]
    pred = fit_predictor(space, keys[:n_fit], more_acc[:n_fit], PredictorConfig())
    out["predictor_tau"] = pred.evaluate(keys[n_fit:], more_acc[n_fit:])["kendall_tau"]
    out["predictor_fit_on"] = n_fit
    big = [s.key for s in sample(space, 2000, np.random.default_rng(9))] * 50
    pred.predict(big[:1000])
    t0 = time.perf_counter()
    pred.predict(big)
    out["predicted_per_minute"] = len(big) / ((time.perf_counter() - t0) / 60)
    log(f"predictor: tau {out['predictor_tau']:.3f} on {len(more) - n_fit} held out; "
        f"{out['predicted_per_minute']:,.0f} per minute")

    # ---------------------------------------------------------------- ranking vs stand-alone
    if "ranking" not in skip:
        cand_keys = [c.key for c in cands]
        acc = np.zeros((2, len(cands)))
        cached = (json.loads(Path(a.standalone_cache).read_text())
                  if a.standalone_cache and Path(a.standalone_cache).is_file() else None)
        if cached and cached.get("keys") == cand_keys and cached.get("epochs") == epochs \
                and cached.get("dataset") == dataset:
            acc = np.asarray(cached["accuracy"])  # the same candidates, budget and data: trained before
            out["standalone_from"] = a.standalone_cache
        else:
            t0, c0 = time.perf_counter(), cpu_s()
            for s in range(2):
                for i, arch in enumerate(cands):
                    acc[s, i], _ = standalone(arch, data, dataclasses.replace(tcfg, seed=s))
            out["standalone_per_cpu_minute"] = 2 * len(cands) / ((cpu_s() - c0) / 60)
            out["standalone_per_wall_minute"] = 2 * len(cands) / ((time.perf_counter() - t0) / 60)
            if a.standalone_cache:
                Path(a.standalone_cache).write_text(json.dumps({"keys": cand_keys, "epochs": epochs,
                                                                "dataset": dataset, "accuracy": acc.tolist()}))
        out["ranking_candidates"] = {"keys": cand_keys, "inherited": inh.tolist(),
                                     "standalone": acc.tolist()}
        out["kendall_tau"] = float(kendalltau(inh, acc.mean(axis=0)).statistic)
        out["seed_tau"] = float(kendalltau(acc[0], acc[1]).statistic)
        out["candidates"] = len(cands)
        out["ranking_bias"] = ranking_bias(space, cand_keys, inh, acc)
        out["tau_within_same_ds"] = within_same_ds(space, cand_keys, inh, acc)
        out["reference"] = reference_ceiling(out["seed_tau"], out["kendall_tau"], len(acc))
        if "standalone_per_cpu_minute" in out:
            out["throughput_ratio"] = out["evals_per_cpu_minute"] / out["standalone_per_cpu_minute"]
        log(f"ranking: tau(inherited, stand-alone) {out['kendall_tau']:.3f}, seed tau {out['seed_tau']:.3f} "
            f"on {len(cands)}; stand-alone {out.get('standalone_per_cpu_minute', float('nan')):.1f} per CPU-minute")
        print_bias(out["ranking_bias"], log)
        print_within(out["tau_within_same_ds"], log)
        print_ceiling(out["reference"], log)

        # fewer BatchNorm re-estimation images: ranking kept vs scoring cost (each size compiles once)
        sweep = {}
        for n_img in recal_sweep:
            if n_img == scfg.recalibration_images:
                continue
            score(space, variables, cands[:1], data, n_images=n_img)
            c0 = cpu_s()
            inh_n = np.asarray(score(space, variables, cands, data, n_images=n_img))
            sweep[n_img] = {"evals_per_cpu_minute": len(cands) / ((cpu_s() - c0) / 60),
                            "tau_vs_default_recalibration": float(kendalltau(inh_n, inh).statistic),
                            "kendall_tau": float(kendalltau(inh_n, acc.mean(axis=0)).statistic),
                            "mean_abs_diff_pt": float(100 * np.mean(np.abs(inh_n - inh)))}
            log(f"recalibration on {n_img} images: {sweep[n_img]['evals_per_cpu_minute']:.0f} per CPU-minute, "
                f"tau vs {scfg.recalibration_images} images {sweep[n_img]['tau_vs_default_recalibration']:.3f}, "
                f"tau vs stand-alone {sweep[n_img]['kendall_tau']:.3f}")
        out["recalibration_sweep"] = sweep

    # ---------------------------------------------------------------- specialization
    class _Scorer:
        cache_dir = None

        def __init__(self):
            self.space = space

        def score(self, archs):
            return inherited(archs)

        def extract(self, arch):
            return extract(space, arch, variables)

    scorer = _Scorer()
    if "specialize" not in skip:
        from evaluators.hardware import PROFILES

        per = {}
        lat_sample = sample(space, 100, np.random.default_rng(3))
        for prof in PROFILES.names():
            cap = float(np.median([cost_value(f"latency_ms@{prof}", x) for x in lat_sample]))
            t0 = time.perf_counter()
            r = specialize_target(scorer, pred, Target(prof, (Constraint(f"latency_ms@{prof}", cap),)),
                                  SpecializeConfig(budget=300 if quick else 1000))
            per[prof] = {"seconds": time.perf_counter() - t0, "cap_ms": cap, "winner": r.winners[0]["key"],
                         "inherited": r.winners[0]["measured"]}
        out["specialize"] = per
        out["specialize_s_max"] = max(v["seconds"] for v in per.values())
        log("specialize: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in per.items()))

    # ---------------------------------------------------------------- end to end + inheritance
    if "e2e" not in skip:
        cap_prof = "pixel4"
        lat = [cost_value(f"latency_ms@{cap_prof}", x) for x in sample(space, 100, np.random.default_rng(4))]
        cap = float(np.percentile(lat, 30))
        feasible = lambda x: cost_value(f"latency_ms@{cap_prof}", x) <= cap  # noqa: E731
        target = Target(cap_prof, (Constraint(f"latency_ms@{cap_prof}", cap),))
        runs, won, gains = [], 0, []
        for seed in range(seeds):
            t_start = time.perf_counter()
            r = specialize_target(scorer, pred, target, SpecializeConfig(budget=300 if quick else 1000, seed=seed,
                                                                          top_k=1))
            arch = r.winners[0]["architecture"]
            stats = scorer_recal(space, variables, arch, data, scfg.recalibration_images)
            init = extract(space, arch, {"params": variables["params"], "batch_stats": stats})
            ft = train(arch, data, dataclasses.replace(tcfg, seed=seed), init_variables=init)
            sn_test = evaluate(arch, ft.variables, data.x_test, data.y_test)[0]
            sn_wall = out["supernet_train_s"] + (time.perf_counter() - t_start)
            scratch = train(arch, data, dataclasses.replace(tcfg, seed=seed))
            scratch_test = evaluate(arch, scratch.variables, data.x_test, data.y_test)[0]
            gains.append(100 * (sn_test - scratch_test))
            # stand-alone random search under the same constraint for the same wall time
            t1, best, rs = time.perf_counter(), None, np.random.default_rng([seed, 77])
            n_trained = 0
            while time.perf_counter() - t1 < sn_wall:
                cand = sample(space, 1, rs, feasible)[0]
                val, tr = standalone(cand, data, dataclasses.replace(tcfg, seed=seed))
                n_trained += 1
                if best is None or val > best[0]:
                    best = (val, cand, tr.variables)
            sa_test = evaluate(best[1], best[2], data.x_test, data.y_test)[0]
            won += int(sn_test >= sa_test)
            runs.append({"seed": seed, "supernet_test": sn_test, "supernet_key": arch.key, "wall_s": sn_wall,
                         "standalone_test": sa_test, "standalone_key": best[1].key, "standalone_trained": n_trained,
                         "scratch_test": scratch_test})
            log(f"e2e seed {seed}: supernet {sn_test:.4f} vs stand-alone {sa_test:.4f} ({n_trained} trained in "
                f"{sn_wall:.0f} s); inherited+fine-tuned vs scratch {100 * (sn_test - scratch_test):+.2f} pt")
        out["e2e"] = runs
        out["e2e_seeds_won"] = won
        out["e2e_seeds"] = seeds
        out["inherit_vs_scratch_pt"] = float(np.mean(gains))

    summary = {k: out.get(k) for k in SUMMARY_KEYS}
    summary.update({k: v for k, v in out.items() if k not in summary and not isinstance(v, (dict, list))})
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps(summary, default=float) if a.json else json.dumps(out, indent=2, default=float))
    return 0


def throughput_only(a) -> int:
    """Scoring cost alone: compile once (timed), then `--candidates` random candidates (CPU and wall time).

    With `--workers N` the candidates are scored by `nas.tune.scoring.RayScorer` (N actors on a local Ray
    instance, started and warmed up before the clock starts); CPU time is this process's plus the actors'."""
    from search_spaces.supernet import initialize

    data = load_dataset(a.dataset or "mnist5k", seed=0)
    space = load_space("mobile_small").with_input(resolution=data.resolution)
    variables = initialize(space, 0)
    cands = sample(space, a.candidates or 24, np.random.default_rng(0))
    counter = CompileCounter()
    if a.workers:
        import tempfile

        from nas.inherited import SupernetScorer
        from nas.tune.connect import init_ray
        from nas.tune.scoring import RayScorer

        init_ray(None)
        local = SupernetScorer(space, variables, data, Path(tempfile.mkdtemp()), a.recalibration_images)
        scorer = RayScorer(local, a.workers)
        workers_cpu = lambda: sum(s["cpu_s"] for s in scorer.worker_stats())  # noqa: E731
        run = scorer.score
        warm = cands[:1] * (8 * a.workers)  # one chunk per worker: every actor compiles before the clock
    else:
        workers_cpu = lambda: 0.0  # noqa: E731
        run = lambda archs: score(space, variables, archs, data, n_images=a.recalibration_images)  # noqa: E731
        warm = cands[:1]
    t0, c0, w0 = time.perf_counter(), cpu_s(), workers_cpu()
    run(warm)  # the one compile (per worker)
    first_s, first_cpu = time.perf_counter() - t0, cpu_s() - c0 + workers_cpu() - w0
    counter.active = True
    t0, c0, w0 = time.perf_counter(), cpu_s(), workers_cpu()
    run(cands)
    wall = time.perf_counter() - t0
    cpu = cpu_s() - c0 + workers_cpu() - w0
    out = {"candidates": len(cands), "workers": a.workers, "evals_per_cpu_minute": len(cands) / (cpu / 60),
           "evals_per_wall_minute": len(cands) / (wall / 60), "first_call_s": first_s, "first_call_cpu_s": first_cpu,
           "compiles_while_scoring": counter.count, "recalibration_images": a.recalibration_images,
           "dataset": data.name}
    print(json.dumps(out, default=float) if a.json else json.dumps(out, indent=2, default=float))
    return 0


def scorer_recal(space, variables, arch, data, n_images):
    from evaluators.supernet_score import recalibrate

    return recalibrate(space, variables, [arch], data, n_images)[0]


if __name__ == "__main__":
    sys.exit(main())
