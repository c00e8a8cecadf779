"""Cost of one candidate on the CPU, JAX (this framework) against PyTorch eager on the same networks.

Architectures: `mbv2_6` (below: a MobileNetV2-style net of 6 inverted-bottleneck blocks on
28x28x1, 8.70 M MACs) and `--samples` seeded samples of
`mobile_small`. The PyTorch twin (benchmarks/_torch_models.py) has exactly the same parameter
count (asserted) and MACs. JAX and PyTorch are measured alternately in the same run, each
figure `--repeats` times; the median is reported. Per architecture:

  train step   one optimizer step at batch 128 (AdamW, cross-entropy, BatchNorm in training
               mode): JAX = `evaluators.step.train_step` compiled ahead of time; PyTorch =
               eager, channels_last
  candidate    wall time of a fresh candidate: `evaluators.train.train(arch, mnist5k,
               TrainConfig(epochs=3, batch_size=128))` (init, XLA compile, 3 epochs, validation
               after each) against the same loop in PyTorch (model construction, 3 epochs with
               AdamW + cosine, validation after each). The JAX program cache is cleared before
               every JAX run, and the persistent compilation cache is off: every run compiles.
  inference    latency of one forward pass in eval mode at batch 1 and 32 (jax.jit / torch eager
               channels_last under inference_mode)

plus GFLOP/s (training = 3 x forward = 6 x MACs per image) and its fraction of the machine's
fp32 peak (`--peak`, default 520 GFLOP/s: 2 cores x 2 AVX-512 FMA units; a 2048^2 float32 matmul
in JAX reached ~490 GFLOP/s on the development machine), and the share of a JAX candidate spent in init + compile.
Ratios are JAX / PyTorch (below 1 = JAX faster). The machine's load average is printed:
on a shared machine absolute figures move a lot, ratios from the same run much less.

    python benchmarks/candidate_speed.py                # table
    python benchmarks/candidate_speed.py --json         # one JSON object (medians over archs)
    python benchmarks/candidate_speed.py --quick        # 1 sample, fewer repeats (smoke)

Needs the `bench` extra (torch==2.13.0).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# PyTorch's OpenMP threads spin-wait by default; on a machine whose cores are busy with other
# work that made its steps 5x slower here (b1 inference 9.3 ms -> 3.3 ms, train step 3.3 s ->
# 0.66 s with passive waiting at load ~5). Passive waiting costs little on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from evaluators.optim import OPTIMIZERS, SCHEDULES, TrainConfig  # noqa: E402
from evaluators.packing import Packing  # noqa: E402
from evaluators.programs import compiled_programs  # noqa: E402
from evaluators.step import make_loss, train_step  # noqa: E402
from evaluators.train import train  # noqa: E402
from evaluators.variables import TrainState, initialize, variable_shapes  # noqa: E402
from evaluators.cost import analytic_cost  # noqa: E402
from evaluators.datasets import Dataset, load_dataset  # noqa: E402
from search_spaces.architecture import Architecture  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402
from search_spaces.model import build_model, input_shape  # noqa: E402
from search_spaces.space import SearchSpace  # noqa: E402

BATCH = 128
PEAK_GFLOPS = 520.0

# The 6-block MobileNetV2-style reference net, as a one-point space:
# stem 3x3/24, three stride-2 stages of two MobileNetV2 blocks (3x3, expansion 6, relu6) with
# 24, 32, 64 channels, head 1x1/256: 8,704,208 MACs, 137,570 parameters.
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


def median_time(fn, n: int) -> float:
    """Median seconds of `fn()` over n calls (fn must block until its result is ready)."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ==================================================================== JAX
def jax_train_step(arch: Architecture, cfg: TrainConfig):
    """A compiled framework train step at batch 128, with its state and batch: call `run()`."""
    model = build_model(arch, cfg.conv_impl)
    tx = OPTIMIZERS.get(cfg.optimizer)(SCHEDULES.get(cfg.schedule)(cfg, 100), cfg)
    v = initialize(arch, seed=0, conv_impl=cfg.conv_impl)
    packing = Packing.of(v["params"])
    state = TrainState.create(apply_fn=model.apply, params=jax.device_put(packing.pack(v["params"])), tx=tx,
                                     batch_stats=v["batch_stats"], key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal(input_shape(arch, BATCH), np.float32)),
             "y": jnp.asarray(rng.integers(0, arch.num_classes, BATCH).astype(np.int32))}
    step = jax.jit(functools.partial(train_step, loss_fn=make_loss(cfg), packing=packing),
                   donate_argnums=0)
    step = step.lower(state, batch, {}).compile()
    box = [state]

    def run():
        box[0], loss = step(box[0], batch, {})
        loss.block_until_ready()

    run()
    return run


def jax_infer(arch: Architecture, batch: int):
    model = build_model(arch)
    v = initialize(arch, seed=0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(input_shape(arch, batch), np.float32))
    f = jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).compile()
    f(v, x).block_until_ready()
    return lambda: f(v, x).block_until_ready()


def jax_candidate(arch: Architecture, data: Dataset, epochs: int) -> dict[str, float]:
    compiled_programs.cache_clear()  # a new candidate: nothing compiled or traced yet
    variable_shapes.cache_clear()
    jax.clear_caches()
    t = time.perf_counter()
    res = train(arch, data, TrainConfig(epochs=epochs, batch_size=BATCH))
    wall = time.perf_counter() - t
    return {"wall_s": wall, "compile_s": res.compile_s, "init_s": res.init_s, "train_s": res.train_s,
            "val_accuracy": res.val_accuracy}


# ==================================================================== PyTorch
def torch_model(arch: Architecture):
    import torch

    from _torch_models import TorchNet, num_params

    m = TorchNet(arch).to(memory_format=torch.channels_last)
    expect = analytic_cost(arch).params
    assert num_params(m) == expect, f"PyTorch twin has {num_params(m)} parameters, analytic cost {expect}"
    return m


def torch_optimizer(model, cfg: TrainConfig, total_steps: int):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total_steps))


def torch_train_step(arch: Architecture, cfg: TrainConfig):
    import torch

    torch.manual_seed(0)
    m = torch_model(arch).train()
    opt, _ = torch_optimizer(m, cfg, 100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, arch.in_channels, arch.resolution, arch.resolution, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, arch.num_classes, (BATCH,), generator=g)
    lossf = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = lossf(m(x), y)
        loss.backward()
        opt.step()
        loss.item()

    run()
    return run


def torch_infer(arch: Architecture, batch: int):
    import torch

    m = torch_model(arch).eval()
    x = torch.randn(batch, arch.in_channels, arch.resolution, arch.resolution).contiguous(
        memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            m(x)

    run()
    return run


def torch_candidate(arch: Architecture, data: Dataset, epochs: int) -> dict[str, float]:
    import torch

    t = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH)
    torch.manual_seed(0)

    def nchw(a):
        return torch.from_numpy(np.array(a.transpose(0, 3, 1, 2))).contiguous(
            memory_format=torch.channels_last)

    xt, yt = nchw(data.x_train), torch.from_numpy(data.y_train.astype(np.int64))
    xv, yv = nchw(data.x_val), torch.from_numpy(data.y_val.astype(np.int64))
    m = torch_model(arch)
    steps = len(yt) // BATCH
    opt, sched = torch_optimizer(m, cfg, steps * epochs)
    lossf = torch.nn.CrossEntropyLoss()
    order = np.random.default_rng([cfg.seed, 1])
    acc = 0.0
    for _ in range(epochs):
        m.train()
        perm = torch.from_numpy(order.permutation(len(yt))[: steps * BATCH].reshape(steps, BATCH))
        for rows in perm:
            opt.zero_grad(set_to_none=True)
            loss = lossf(m(xt[rows]), yt[rows])
            loss.backward()
            opt.step()
            sched.step()
        m.eval()
        with torch.inference_mode():
            correct = sum(int((m(xv[i:i + 256]).argmax(1) == yv[i:i + 256]).sum()) for i in range(0, len(yv), 256))
        acc = correct / len(yv)
    return {"wall_s": time.perf_counter() - t, "val_accuracy": acc}


# ==================================================================== driver
def measure(arch: Architecture, data: Dataset | None, args) -> dict:
    macs = analytic_cost(arch).macs
    cfg = TrainConfig(batch_size=BATCH)
    out: dict = {"arch": arch.key or arch.space, "space": arch.space, "macs": macs, "tokens": arch.describe()}
    runs = {"jax": jax_train_step(arch, cfg), "torch": torch_train_step(arch, cfg)}
    step = {k: [] for k in runs}
    for _ in range(args.repeats):  # alternate blocks of steps
        for k, fn in runs.items():
            step[k].append(median_time(fn, args.steps))
    out["train_step_s"] = {k: statistics.median(v) for k, v in step.items()}
    for b in (1, 32):
        runs = {"jax": jax_infer(arch, b), "torch": torch_infer(arch, b)}
        lat = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                lat[k].append(median_time(fn, args.infer_calls))
        out[f"infer_b{b}_s"] = {k: statistics.median(v) for k, v in lat.items()}
    if data is not None:
        cand = {"jax": [], "torch": []}
        for _ in range(args.candidate_repeats):
            cand["jax"].append(jax_candidate(arch, data, args.epochs))
            cand["torch"].append(torch_candidate(arch, data, args.epochs))
        med = {k: statistics.median(r["wall_s"] for r in v) for k, v in cand.items()}
        jx = cand["jax"]
        out["candidate_s"] = med
        out["jax_compile_s"] = statistics.median(r["compile_s"] for r in jx)
        out["jax_init_s"] = statistics.median(r["init_s"] for r in jx)
        out["compile_share"] = statistics.median((r["compile_s"] + r["init_s"]) / r["wall_s"] for r in jx)
        out["val_accuracy"] = {k: statistics.median(r["val_accuracy"] for r in v) for k, v in cand.items()}
    flops = 6 * macs * BATCH
    out["train_gflops"] = {k: flops / t / 1e9 for k, t in out["train_step_s"].items()}
    out["train_peak_fraction"] = {k: g / args.peak for k, g in out["train_gflops"].items()}
    return out


def ratio(d: dict) -> float:
    return d["jax"] / d["torch"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4, help="mobile_small samples besides mbv2_6 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5, help="train steps per timing block")
    p.add_argument("--repeats", type=int, default=3, help="alternating JAX/PyTorch blocks per figure")
    p.add_argument("--infer-calls", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--candidate-repeats", type=int, default=1)
    p.add_argument("--no-candidate", action="store_true", help="skip the mnist5k candidate runs")
    p.add_argument("--peak", type=float, default=PEAK_GFLOPS, help="machine fp32 peak, GFLOP/s")
    p.add_argument("--quick", action="store_true", help="1 sample, 2 repeats, 3 steps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.steps, args.infer_calls = 1, 2, 3, 10
    try:
        import torch
    except ImportError:
        p.error("PyTorch is not installed: pip install -e '.[bench]' (torch==2.13.0)")
    jax.config.update("jax_enable_compilation_cache", False)

    load0 = os.getloadavg()
    data = None if args.no_candidate else load_dataset("mnist5k")
    results = []
    for arch in architectures(args.samples, args.seed):
        r = measure(arch, data, args)
        results.append(r)
        if not args.json:
            print_arch(r, args)
    summary = {
        "train_step_ratio": statistics.median(ratio(r["train_step_s"]) for r in results),
        "infer_b1_ratio": statistics.median(ratio(r["infer_b1_s"]) for r in results),
        "infer_b32_ratio": statistics.median(ratio(r["infer_b32_s"]) for r in results),
        "jax_train_peak_fraction": statistics.median(r["train_peak_fraction"]["jax"] for r in results),
        "torch_train_peak_fraction": statistics.median(r["train_peak_fraction"]["torch"] for r in results),
    }
    if data is not None:
        summary["candidate_wall_ratio"] = statistics.median(ratio(r["candidate_s"]) for r in results)
        summary["compile_share"] = statistics.median(r["compile_share"] for r in results)
    summary.update({"loadavg_start": load0, "loadavg_end": os.getloadavg(), "torch_threads": torch.get_num_threads(),
                    "torch_version": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "jax_version": jax.__version__,
                    "batch": BATCH, "epochs": args.epochs, "archs": results})
    if args.json:
        print(json.dumps(summary, indent=1, default=float))
    else:
        print(f"\nmedians over {len(results)} architectures (JAX / PyTorch):")
        for k in ("train_step_ratio", "candidate_wall_ratio", "infer_b1_ratio", "infer_b32_ratio"):
            if k in summary:
                print(f"  {k:22s} {summary[k]:.2f}")
        if "compile_share" in summary:
            print(f"  {'compile_share':22s} {summary['compile_share']:.0%} of a JAX candidate is init + compile")
        print(f"  train fraction of peak JAX {summary['jax_train_peak_fraction']:.1%}, "
              f"PyTorch {summary['torch_train_peak_fraction']:.1%} (peak {args.peak:g} GFLOP/s)")
        print(f"  load average {load0[0]:.1f} at start, {summary['loadavg_end'][0]:.1f} at end; "
              f"torch threads {summary['torch_threads']}")
    return 0


def print_arch(r: dict, args) -> None:
    ms = 1e3
    print(f"\n{r['space']} {r['arch']}: {r['macs'] / 1e6:.2f} M MACs  {' '.join(r['tokens'])}")
    row = "  {:18s} JAX {:9.2f} ms   PyTorch {:9.2f} ms   ratio {:.2f}"
    t = r["train_step_s"]
    print(row.format("train step b128", t["jax"] * ms, t["torch"] * ms, ratio(t))
          + f"   GFLOP/s {r['train_gflops']['jax']:.1f} / {r['train_gflops']['torch']:.1f}")
    for b in (1, 32):
        t = r[f"infer_b{b}_s"]
        print(row.format(f"inference b{b}", t["jax"] * ms, t["torch"] * ms, ratio(t)))
    if "candidate_s" in r:
        t = r["candidate_s"]
        print(f"  {'candidate (3 ep)':18s} JAX {t['jax']:9.2f} s    PyTorch {t['torch']:9.2f} s    ratio {ratio(t):.2f}"
              f"   JAX init {r['jax_init_s']:.2f} s + compile {r['jax_compile_s']:.2f} s = {r['compile_share']:.0%};"
              f" val acc {r['val_accuracy']['jax']:.3f} / {r['val_accuracy']['torch']:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
