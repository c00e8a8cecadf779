"""`nas supernet train experiments/supernet_quickstart.yaml` for 1 epoch: the `supernet_run` fixture trains
it without specialization, the quickstart's test with it. Both have the same training program, so
whichever trains second loads it from the session's compile cache instead of compiling it."""

from __future__ import annotations

from pathlib import Path

from nas.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "supernet_quickstart.yaml"
ONE_EPOCH = ("supernet.epochs=1", "supernet.recalibration_images=200")


def train_quickstart(output_dir: Path, *sets: str) -> int:
    """`nas supernet train` of the quickstart into OUTPUT_DIR/supernet_quickstart, 1 epoch, with more --set."""
    args = (f"output_dir={output_dir}", *ONE_EPOCH, *sets)
    return main(["supernet", "train", str(QUICKSTART), *[a for kv in args for a in ("--set", kv)]])
