"""Image datasets: streaming loader throughput, the in-memory path against main's, folder vs npz accuracy.

Data: scikit-learn's 1,797 digits rendered as 32x32 RGB JPEG files in class folders (train/ and
test/, val carved from train; tests/image_folders.py), and the equivalent .npz holding exactly the
pixels decoded from those files, in the same order.

  loader      images/s that the Grain pipeline (evaluators/data/stream.py: shuffle, JPEG decode,
              normalise, batch, worker processes) delivers, after its first batch (worker start-up
              is reported apart), for --workers 0 (in process), 1 and 2
  step        images/s the training step consumes: the compiled epoch program (with crop, flip
              and cutout inside it) on a chunk of batches, as the streaming path calls it; the
              target is loader >= 1.5 x step
  streamed    wall time of training the candidate streamed from the JPEG folder vs from memory
  in-memory   A/B of `train()` on digits (in memory, no augmentation) between this branch and
              main's code (`git archive main`), alternated in separate processes, --rounds times
  accuracy    the same candidate and seeds trained from the folder and from the npz

The machine is shared: absolute figures move with its load (printed); compare ratios from the
same run. Prints a table, then one JSON line last.

    python benchmarks/datasets.py [--rounds 3] [--epochs 3] [--seeds 2] [--key 002-002--002--0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from evaluators import train as jtrain  # noqa: E402
from evaluators.optim import TrainConfig  # noqa: E402
from evaluators.predict import evaluate  # noqa: E402
from evaluators.programs import compiled_programs  # noqa: E402
from evaluators.variables import TrainState, initialize  # noqa: E402
from evaluators.data.stream import train_batches  # noqa: E402
from evaluators.datasets import decode_rows, load_dataset  # noqa: E402
from image_folders import write_digits_folder  # noqa: E402
from search_spaces.catalog import SPACES  # noqa: E402

RES, BATCH = 32, 64
AUGMENT = {"crop_padding": 4, "flip": True, "cutout": 8}

# one in-memory training run, printed as JSON; runs in a child process against either code tree
CHILD = """
import json, os, sys, time
sys.path.insert(0, os.environ["CODE"])
from evaluators.datasets import load_dataset
from evaluators.train import TrainConfig, train
from search_spaces.catalog import SPACES
arch = SPACES.get("mobile_small").with_input(resolution=8).decode(os.environ["KEY"])
data = load_dataset("digits", seed=0)
r = train(arch, data, TrainConfig(epochs=int(os.environ["EPOCHS"]), batch_size=64))
print(json.dumps({"train_s": r.train_s, "compile_s": r.compile_s, "acc": r.val_accuracy}))
"""


def _loader_rate(ds, workers: int, batches: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch)."""
    t0 = time.perf_counter()
    it = train_batches(ds.stream, BATCH, seed=0, epochs=100, workers=workers)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - t1)
    getattr(it, "close", lambda: None)()
    return rate, first


def _step_rate(arch, ds, chunk: int, repeats: int) -> float:
    """Images/s of the compiled epoch program (augmentation inside) on `chunk` batches per call."""
    cfg = TrainConfig(epochs=1, batch_size=BATCH)
    progs = compiled_programs(arch, cfg, chunk, chunk * BATCH, (1, 8), None, (), None, ds.augment, chunk)
    variables = initialize(arch, seed=0)
    params = jax.device_put(progs.packing.pack(dict(variables["params"])))
    state = TrainState(step=jnp.zeros((), jnp.int32), apply_fn=progs.model.apply, params=params,
                              tx=progs.tx, opt_state=progs.opt_init(params),
                              batch_stats=jax.device_put(progs.state_stats(variables["batch_stats"])),
                              key=jax.random.PRNGKey(0))
    x = np.asarray(ds.x_val[:1].repeat(chunk * BATCH, axis=0), np.float32)
    data = {"x": x, "y": np.zeros(chunk * BATCH, np.int32)}
    idx = np.arange(chunk * BATCH, dtype=np.int32).reshape(chunk, BATCH)
    state, loss = progs.epoch(state, data, idx, {})
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, loss = progs.epoch(state, data, idx, {})
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    return chunk * BATCH / statistics.median(times)


def _ab_in_memory(rounds: int, key: str, epochs: int) -> dict:
    """Alternate child processes on main's code and on this tree; epoch time (train_s) per round."""
    out: dict[str, list[float]] = {"main": [], "branch": []}
    with tempfile.TemporaryDirectory() as tmp:
        main_code = Path(tmp) / "main"
        main_code.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "main"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(main_code)], input=archive, check=True)
        for _ in range(rounds):
            for name, code in (("main", main_code), ("branch", REPO)):
                env = {**os.environ, "CODE": str(code), "KEY": key, "EPOCHS": str(epochs), "JAX_PLATFORMS": "cpu"}
                res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                                     cwd=tmp, check=True)
                out[name].append(json.loads(res.stdout.strip().splitlines()[-1])["train_s"])
    ratios = [b / a for a, b in zip(out["main"], out["branch"])]
    return {"main_train_s": out["main"], "branch_train_s": out["branch"],
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40, help="batches timed per loader figure")
    ap.add_argument("--key", default="002-002--002--0", help="mobile_small candidate (at 32x32x3)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root, _, _ = write_digits_folder(Path(tmp) / "jpegs", size=RES, fmt="jpg")
        folder = lambda **k: load_dataset("folder", root=str(root), resolution=RES, channels=3, **k)  # noqa: E731
        streamed = folder(streaming=True, augment=AUGMENT)
        # the equivalent npz: the pixels decoded from the same files, in the loader's order
        from evaluators.data import folder as folder_source
        from evaluators.data.spec import DataSpec
        from evaluators.data.source import Shape

        cat = folder_source.load_folder(DataSpec.from_dict({"name": "folder", "root": str(root)}), Shape(RES, 3))
        xtr, ytr = decode_rows(cat.train, np.arange(len(cat.train)))
        xte, yte = decode_rows(cat.test, np.arange(len(cat.test)))
        npz = Path(tmp) / "digits.npz"
        np.savez(npz, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)

        arch = SPACES.get("mobile_small").with_input(resolution=RES, in_channels=3).decode(args.key)
        chunk = 8
        step = _step_rate(arch, streamed, chunk, repeats=5)
        loaders = {w: _loader_rate(streamed, w, args.batches) for w in (0, 1, 2)}
        best_workers = max(loaders, key=lambda w: loaders[w][0])

        cfg = TrainConfig(epochs=args.epochs, batch_size=BATCH, learning_rate=5e-3)
        t_stream = jtrain.train(arch, streamed, cfg).train_s
        t_memory = jtrain.train(arch, folder(augment=AUGMENT), cfg).train_s

        acc = {"folder": [], "npz": []}
        for seed in range(args.seeds):
            c = TrainConfig(epochs=args.epochs, batch_size=BATCH, learning_rate=5e-3, seed=seed)
            for name, ds in (("folder", folder()), ("npz", load_dataset("npz", path=str(npz)))):
                res = jtrain.train(arch, ds, c)
                acc[name].append(float(evaluate(arch, res.variables, ds.x_test, ds.y_test)[0]))
    ab = _ab_in_memory(args.rounds, "002-002--002--0", args.epochs)

    print(f"machine load average at start: {load:.1f} (shared machine: compare ratios)")
    print(f"step (epoch program, augmentation inside, {chunk} x {BATCH} per call): {step:,.0f} images/s")
    for w, (rate, first) in loaders.items():
        print(f"loader, {w} worker process(es): {rate:,.0f} images/s ({rate / step:.2f} x the step); "
              f"first batch after {first:.1f} s")
    print(f"training {args.epochs} epochs from the JPEG folder: streamed {t_stream:.2f} s, in memory {t_memory:.2f} s "
          f"({t_stream / t_memory:.2f} x)")
    print(f"test accuracy by seed: folder {acc['folder']}, npz {acc['npz']}")
    print(f"in-memory train_s, main vs this branch, {args.rounds} alternated rounds: main {ab['main_train_s']}, "
          f"branch {ab['branch_train_s']}; branch/main min {ab['ratio_min']:.3f} median {ab['ratio_median']:.3f} "
          f"max {ab['ratio_max']:.3f}")
    print(json.dumps({
        "load_average": load, "step_images_per_s": step,
        "loader_images_per_s": {str(w): r for w, (r, _) in loaders.items()},
        "loader_first_batch_s": {str(w): f for w, (_, f) in loaders.items()},
        "loader_over_step": loaders[best_workers][0] / step, "loader_workers_best": best_workers,
        "streamed_train_s": t_stream, "in_memory_train_s": t_memory,
        "test_accuracy_folder": acc["folder"], "test_accuracy_npz": acc["npz"],
        "in_memory_ab": ab,
    }))


if __name__ == "__main__":
    main()
