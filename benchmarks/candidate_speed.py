"""Cost of one candidate on the CPU: JAX (this framework) against PyTorch eager and torch.compile.

One framework per process, each at its own defaults: the parent spawns a child process per
(framework, network, measurement), the frameworks alternating in a rotating order within every
round (A B C, then B C A, ...), several rounds. A child imports one framework only, warms up its
runtime, measures, and prints one JSON line; the parent sets no thread or wait-policy variable
and aggregates min/median/max per framework and the paired JAX/PyTorch ratio of every round
(below 1 = JAX faster). Per network and measurement, a figure is the median over rounds of the
paired ratios; the summary is the median over networks.

Networks: `mbv2_6` (a MobileNetV2-style net of 6 inverted-bottleneck blocks on 28x28x1, 8.70 M
MACs) and `--samples` seeded samples of `mobile_small`. The PyTorch twin
(benchmarks/_torch_models.py) has exactly the same parameter count (asserted) and MACs.
Measurements:

  step       one optimizer step at batch 128 (AdamW, cross-entropy, BatchNorm in training mode),
             median of `--steps` steps after two untimed ones: JAX = `evaluators.step.train_step`
             compiled ahead of time; PyTorch = eager channels_last; torch.compile = the same
             model under `torch.compile` (its defaults; its compiled-kernel cache is the user's
             default one, so later rounds compile from a warm cache: only steps are timed)
  candidate  wall time of a fresh candidate: `evaluators.train.train(arch, mnist5k,
             TrainConfig(epochs=3, batch_size=128))` (init, XLA compile, 3 epochs, validation
             after each; the persistent compilation cache off) against the same loop in PyTorch
             (model construction, 3 epochs of AdamW + cosine, validation after each); for
             torch.compile the child gets an empty compiled-kernel cache of its own
             (TORCHINDUCTOR_CACHE_DIR), as an unseen network finds nothing to reuse
  infer      latency of one forward pass in eval mode at batch 1 and 32 (jax.jit / PyTorch
             under inference_mode)

plus the share of a JAX candidate spent in init + compile, and training GFLOP/s (3 x forward =
6 x MACs per image). The machine's load average is recorded before and after every child. On a
shared machine absolute figures move a lot; the paired ratios of one round much less.

    python benchmarks/candidate_speed.py                 # table; JSON summary on the last line
    python benchmarks/candidate_speed.py --json          # the JSON summary only
    python benchmarks/candidate_speed.py --quick         # smoke: 1 network, 1 round, few steps
    python benchmarks/candidate_speed.py --frameworks jax torch --measures step

Needs the `bench` extra (torch==2.13.0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluators.cost import analytic_cost  # noqa: E402  (no JAX: the parent runs no framework)
from search_spaces.architecture import Architecture  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402
from search_spaces.space import SearchSpace  # noqa: E402

BATCH = 128
FRAMEWORKS = ("jax", "torch", "torch_compile", "torch_passive")
MEASURES = ("step", "candidate", "infer")
LABEL = {"jax": "JAX", "torch": "PyTorch", "torch_compile": "torch.compile", "torch_passive": "PyTorch PASSIVE"}

# The 6-block MobileNetV2-style net: stem 3x3/24, three stride-2 stages of two blocks (3x3,
# expansion 6, relu6) with 24, 32, 64 channels, head 1x1/256: 8,704,208 MACs, 137,570 parameters.
MBV2_6 = {
    "name": "mbv2_6", "input": {"resolution": 28, "channels": 1}, "num_classes": 10,
    "stem": {"kernel": 3, "channels": 24, "stride": 1, "act": "relu6"},
    "stages": [{"stride": 2, "channels": c, "depth": 2, "act": "relu6",
                "ops": [{"block": "mb", "kernel": 3, "expansion": 6}]} for c in (24, 32, 64)],
    "head": {"channels": 256, "act": "relu6", "dropout": 0.0},
}


def architectures(samples: int, seed: int) -> list[Architecture]:
    archs = [SearchSpace.from_dict(MBV2_6).decode("")]
    space, rng = SPACES.get("mobile_small"), np.random.default_rng(seed)
    archs += [space.sample(rng) for _ in range(samples)]
    return archs


def network_name(arch: Architecture) -> str:
    return arch.key or arch.space


# ==================================================================== child: one framework alone
def child(framework: str, measure: str, arch: Architecture, args) -> dict:
    """Measure `measure` of `arch` with `framework` in this process and return its figures."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    if framework == "jax":
        import _jax_speed as fw
    else:
        import _torch_models as fw
    extra = {} if framework == "jax" else {"compiled": framework == "torch_compile"}  # torch_passive: eager
    fw.warm_up()
    out: dict = {}
    if measure == "step":
        run, first_s = fw.train_step_fn(arch, BATCH, **extra)
        run()  # a second untimed step: torch.compile may specialise again on the second call
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        out = {"step_s": statistics.median(times), "step_min_s": min(times), "first_s": first_s}
    elif measure == "infer":
        for b in (1, 32):
            run = fw.infer_fn(arch, b, **extra)
            times = []
            for _ in range(args.infer_calls):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            out[f"infer_b{b}_s"] = statistics.median(times)
    else:
        from evaluators.datasets import load_dataset

        out = fw.candidate(arch, load_dataset("mnist5k"), args.epochs, BATCH, **extra)
    out["versions"] = fw.versions()
    out["frameworks_started"] = _frameworks_started()
    return out


def _frameworks_started() -> list[str]:
    """Which frameworks ran in this process: a JAX backend started, PyTorch imported."""
    started = []
    jx = sys.modules.get("jax")
    if jx is not None and jx._src.xla_bridge._backends:
        started.append("jax")
    if "torch" in sys.modules:
        started.append("torch")
    return started


# ==================================================================== parent: spawn, alternate, aggregate
def spawn(framework: str, measure: str, arch: Architecture, args, env: dict[str, str]) -> dict:
    """Run one child; its JSON line, or {"error": ...} naming how it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", framework, measure, arch.to_json(),
           "--steps", str(args.steps), "--infer-calls", str(args.infer_calls), "--epochs", str(args.epochs)]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout:g} s", "load": [load0, os.getloadavg()[0]]}
    res: dict = {"process_s": time.perf_counter() - t, "load": [load0, os.getloadavg()[0]]}
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        res["error"] = f"exit {p.returncode}: " + (err[-1] if err else "no output")[:400]
        return res
    res.update(json.loads(lines[-1]))
    return res


def child_env(framework: str, measure: str, tmp: str) -> dict[str, str]:
    """The user's environment unchanged, except a torch.compile candidate's own empty kernel cache
    and the deviation `torch_passive` (PyTorch eager with OMP_WAIT_POLICY=PASSIVE, not its default)."""
    env = dict(os.environ)
    if framework == "torch_passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if framework == "torch_compile" and measure == "candidate":
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=tmp)
    return env


def spread(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


FIGURE = {"step": ["step_s"], "candidate": ["wall_s"], "infer": ["infer_b1_s", "infer_b32_s"]}


def summarize_network(runs: dict, frameworks: list[str]) -> dict:
    """Per measurement figure: each framework's min/median/max over rounds, and the paired
    JAX/other ratio of every round in which both children succeeded (median, min, max)."""
    out: dict = {}
    for measure, per_fw in runs.items():
        for fig in FIGURE[measure]:
            entry: dict = {}
            for fw in frameworks:
                rows = per_fw.get(fw, [])
                ok = [r[fig] for r in rows if fig in r]
                entry[fw] = spread(ok) if ok else {"error": next((r["error"] for r in rows if "error" in r), "not run")}
            for other in frameworks:
                if other == "jax" or "jax" not in per_fw:
                    continue
                pairs = [a[fig] / b[fig] for a, b in zip(per_fw["jax"], per_fw.get(other, [])) if fig in a and fig in b]
                if pairs:
                    entry[f"ratio_{other}"] = spread(pairs)
                    entry[f"ratios_{other}"] = pairs
            out[fig] = entry
        if measure == "candidate" and per_fw.get("jax"):
            shares = [r["compile_share"] for r in per_fw["jax"] if "compile_share" in r]
            if shares:
                out["compile_share"] = spread(shares)
    return out


def _med_ratio(fig: dict | None, other: str) -> float | None:
    r = (fig or {}).get(f"ratio_{other}")
    return r["median"] if r else None


def per_network_ratios(s: dict) -> dict:
    """The headline ratios of one network (None where a child failed or was not run)."""
    share = s.get("compile_share")
    return {
        "train_step_ratio": _med_ratio(s.get("step_s"), "torch"),
        "candidate_wall_ratio": _med_ratio(s.get("wall_s"), "torch"),
        "compile_share": share["median"] if share else None,
        "train_step_ratio_compile": _med_ratio(s.get("step_s"), "torch_compile"),
        "candidate_wall_ratio_compile": _med_ratio(s.get("wall_s"), "torch_compile"),
        "train_step_ratio_passive": _med_ratio(s.get("step_s"), "torch_passive"),
        "candidate_wall_ratio_passive": _med_ratio(s.get("wall_s"), "torch_passive"),
        "infer_b1_ratio": _med_ratio(s.get("infer_b1_s"), "torch"),
        "infer_b32_ratio": _med_ratio(s.get("infer_b32_s"), "torch"),
    }


def median_over(per_network: dict, key: str) -> float | None:
    xs = [v[key] for v in per_network.values() if v.get(key) is not None]
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4, help="mobile_small samples besides mbv2_6 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--networks", nargs="+", metavar="NAME", help="measure only these of the networks (names as printed)")
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS[:3]),
                   help="default jax torch torch_compile; torch_passive = PyTorch eager with "
                        "OMP_WAIT_POLICY=PASSIVE, a deviation from its defaults shown as its own column")
    p.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of step and infer children")
    p.add_argument("--candidate-rounds", type=int, default=2, help="alternating rounds of candidate children")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per step child")
    p.add_argument("--infer-calls", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--child-timeout", type=float, default=1200.0, help="seconds before a child is stopped")
    p.add_argument("--quick", action="store_true", help="smoke: mbv2_6 only, 1 round, 3 steps, 5 calls")
    p.add_argument("--json", action="store_true", help="print only the JSON summary line")
    p.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    p.add_argument("--child", nargs=3, metavar=("FRAMEWORK", "MEASURE", "ARCH_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fw, measure, arch_json = args.child
        print(json.dumps(child(fw, measure, Architecture.from_json(arch_json), args)))
        return 0
    if args.quick:
        args.samples, args.rounds, args.candidate_rounds, args.steps, args.infer_calls = 0, 1, 1, 3, 5
    if any(f.startswith("torch") for f in args.frameworks) and importlib.util.find_spec("torch") is None:
        p.error("PyTorch is not installed: pip install -e '.[bench]' (torch==2.13.0)")
    frameworks = args.frameworks if args.frameworks[0] == "jax" else ["jax"] + [f for f in args.frameworks if f != "jax"]

    load_start, t_start = os.getloadavg(), time.time()
    archs = architectures(args.samples, args.seed)
    if args.networks:
        unknown = sorted(set(args.networks) - {network_name(a) for a in archs})
        if unknown:
            p.error(f"--networks: {unknown} not among {[network_name(a) for a in archs]}")
        archs = [a for a in archs if network_name(a) in args.networks]
    runs: dict = {network_name(a): {m: {f: [] for f in frameworks} for m in args.measures} for a in archs}
    order = [(r, m) for r in range(max(args.rounds, args.candidate_rounds)) for m in args.measures
             if r < (args.candidate_rounds if m == "candidate" else args.rounds)]
    k, interrupted = 0, False
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="candidate-speed-") as tmp:
            for rnd, measure in order:
                for arch in archs:
                    name = network_name(arch)
                    for fw in frameworks[k % len(frameworks):] + frameworks[:k % len(frameworks)]:
                        res = spawn(fw, measure, arch, args, child_env(fw, measure, tmp))
                        res["round"] = rnd
                        runs[name][measure][fw].append(res)
                        if not args.json:
                            print(f"round {rnd + 1} {measure:9s} {name:18s} {LABEL[fw]:13s} " + _short(res), flush=True)
                    k += 1
    except KeyboardInterrupt:  # keep what was measured: summarise the children that finished
        interrupted = True
    summary = summarize(archs, runs, frameworks, args)
    summary.update({"interrupted": interrupted, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "minutes": (time.time() - t_start) / 60})
    if not args.json:
        print_table(summary["networks"], summary, frameworks)
    line = json.dumps(summary, default=float)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def summarize(archs: list[Architecture], runs: dict, frameworks: list[str], args) -> dict:
    """The JSON summary: per-network figures and ratios, and their medians over networks."""
    networks = {}
    for arch in archs:
        name = network_name(arch)
        s = summarize_network(runs[name], frameworks)
        cost = analytic_cost(arch)
        networks[name] = {"macs": cost.macs, "params": cost.params, "tokens": arch.describe(), "figures": s,
                          "ratios": per_network_ratios(s), "runs": runs[name]}
    per_network = {n: v["ratios"] for n, v in networks.items()}
    summary: dict = {k: median_over(per_network, k) for k in next(iter(per_network.values()))}
    summary.update({
        "per_network": per_network,
        "protocol": "one framework per child process, own defaults, rotating order per round; "
                    "ratios are medians over rounds of paired JAX/other ratios, summary = median over networks",
        "rounds": args.rounds, "candidate_rounds": args.candidate_rounds, "steps": args.steps,
        "batch": BATCH, "epochs": args.epochs, "frameworks": frameworks,
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS")},
        "networks": networks,
    })
    return summary


def _short(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    figs = " ".join(f"{k} {res[k]:.4g}" for k in ("step_s", "first_s", "wall_s", "compile_share",
                                                   "infer_b1_s", "infer_b32_s", "val_accuracy") if k in res)
    return f"{figs}  (load {res['load'][0]:.1f})"


def print_table(networks: dict, summary: dict, frameworks: list[str]) -> None:
    others = [f for f in frameworks if f != "jax"]
    print(f"\nper network: each framework's median over rounds [min-max]; ratio = median paired JAX/{'/'.join(LABEL[o] for o in others)}")
    for name, net in networks.items():
        print(f"\n{name}: {net['macs'] / 1e6:.2f} M MACs  {' '.join(net['tokens'])}")
        for fig, entry in net["figures"].items():
            if fig == "compile_share":
                print(f"  {'JAX init+compile':16s} {entry['median']:.0%} of a candidate [{entry['min']:.0%}-{entry['max']:.0%}]")
                continue
            if not any("median" in entry[fw] for fw in frameworks):
                continue
            unit, scale = ("s", 1.0) if fig == "wall_s" else ("ms", 1e3)
            cells = []
            for fw in frameworks:
                e = entry[fw]
                cells.append(f"{LABEL[fw]} " + (f"ERROR {e['error'][:60]}" if "error" in e else
                                                f"{e['median'] * scale:.1f} [{e['min'] * scale:.1f}-{e['max'] * scale:.1f}] {unit}"))
            for o in others:
                r = entry.get(f"ratio_{o}")
                cells.append(f"x{LABEL[o]} " + (f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" if r else "-"))
            print(f"  {fig:16s} " + "   ".join(cells))
    print("\nmedian over networks:")
    for k in ("train_step_ratio", "candidate_wall_ratio", "compile_share", "train_step_ratio_compile",
              "candidate_wall_ratio_compile", "train_step_ratio_passive", "candidate_wall_ratio_passive",
              "infer_b1_ratio", "infer_b32_ratio"):
        if summary.get(k) is not None:
            print(f"  {k:30s} {summary[k]:.2f}")
    print(f"  load average {summary['loadavg_start'][0]:.1f} at start, {summary['loadavg_end'][0]:.1f} at end; "
          f"{summary['minutes']:.0f} min")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
