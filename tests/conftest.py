from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The persistent JAX compile cache of trials (nas.rundir.enable_compilation_cache reads NAS_JAX_CACHE) starts empty in every test
# session and is never the user's ~/.cache: a test that times or interrupts training must not find its
# programs compiled by an earlier run. Set before any test starts a driver, a Ray node or a trial.
_JAX_CACHE = tempfile.TemporaryDirectory(prefix="nas-test-jax-cache-")
os.environ["NAS_JAX_CACHE"] = _JAX_CACHE.name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def macro_table_path() -> Path:
    """The NAS-Bench-Macro table shipped with the package (evaluators/tables/)."""
    from evaluators.table import resolve_table

    return resolve_table("nas-bench-macro")


@pytest.fixture(scope="session")
def supernet_run(tmp_path_factory) -> Path:
    """A run directory with a tiny trained supernet (mobile_small on 8x8 digits, 1 epoch), as
    `nas supernet train` leaves it (RUN_DIR/supernet/ with the experiment in its manifest)."""
    from evaluators.datasets import load_dataset
    from evaluators.supernet import SupernetConfig, save_supernet, train_supernet
    from nas.config import config_from_dict
    from search_spaces.catalog import load_space

    run = tmp_path_factory.mktemp("runs") / "tiny-supernet"
    cfg = SupernetConfig(epochs=1, batch_size=64, recalibration_images=200)
    exp = config_from_dict({"name": run.name, "space": "mobile_small", "space_input": {"resolution": 8},
                            "dataset": "digits", "output_dir": str(run.parent), "objective": {"cost": None},
                            "supernet": cfg.to_dict()})
    space = load_space("mobile_small").with_input(resolution=8)
    result = train_supernet(space, load_dataset("digits", seed=0), cfg)
    save_supernet(run / "supernet", space, result.variables, space_ref="mobile_small",
                  space_input={"resolution": 8}, config=cfg, history=result.history,
                  extra={"experiment": exp.to_dict()})
    return run
