"""`nas supernet train experiments/supernet_quickstart.yaml` for 1 epoch: the `supernet_run` fixture trains
it without specialization, the quickstart's test with it. Both have the same training program, so
whichever trains second loads it from the session's compile cache instead of compiling it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nas.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "supernet_quickstart.yaml"
ONE_EPOCH = ("supernet.epochs=1", "supernet.recalibration_images=200")


def _overrides(output_dir: Path, sets: tuple[str, ...]) -> list[str]:
    """The KEY=VALUE overrides of a 1-epoch quickstart into OUTPUT_DIR, then `sets`."""
    return [f"output_dir={output_dir}", *ONE_EPOCH, *sets]


def train_quickstart(output_dir: Path, *sets: str) -> int:
    """`nas supernet train` of the quickstart into OUTPUT_DIR/supernet_quickstart, 1 epoch, with more --set."""
    flags = [a for kv in _overrides(output_dir, sets) for a in ("--set", kv)]
    return main(["supernet", "train", str(QUICKSTART), *flags])


# What the supernet trial runs, without Ray (start-up, and a trial's compile slowed by the other worker's
# tests): a child process, as the trial is one
_TRAIN = """
import sys
from evaluators.supernet import train_supernet
from nas.config import load_config
from nas.rundir import enable_compilation_cache
from nas.supernet import check_out_dir, load_data, prepare, write_outputs
enable_compilation_cache()
job = prepare(load_config(sys.argv[1], sys.argv[2:]))
check_out_dir(job, resume=False, force=False)
result = train_supernet(job.space, load_data(job.cfg, job.space), job.train)
write_outputs(job, result.variables, result.history)
"""


def train_quickstart_without_ray(output_dir: Path, *sets: str) -> Path:
    """The quickstart's supernet trained as its Ray trial trains it, in a child process; its run directory."""
    r = subprocess.run([sys.executable, "-c", _TRAIN, str(QUICKSTART), *_overrides(output_dir, sets)],
                       capture_output=True, text=True, cwd=QUICKSTART.parents[1], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(output_dir) / "supernet_quickstart"
