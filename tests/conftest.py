from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' XLA:CPU programs are built with LLVM's -O1 instead of -O2 (this process, its pytest-xdist
# workers, the CLI subprocesses and Ray nodes they start all inherit it): compiling is most of this suite's
# time, and -O1 compiles for about 16% less CPU on this 2-core machine (docs/performance.md, the `make test` table).
# The tests assert behaviour and numerics within tolerances, which hold at any optimization level; the
# product sets no flag.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()
# The persistent JAX compile cache of the session's processes (the test processes, see pytest_configure, and
# the drivers, trials and actors they start; nas.rundir.enable_compilation_cache reads NAS_JAX_CACHE) starts
# empty in every test session and is never the user's ~/.cache: a test that times or interrupts training must
# not find its programs compiled by an earlier run. Set before any test starts a driver, a Ray node or a
# trial. The pytest-xdist workers of one session share the controller's (they inherit its environment): a
# program one worker compiled, the other loads.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("NAS_TEST_SESSION_JAX_CACHE"):
    os.environ["NAS_JAX_CACHE"] = os.environ["NAS_TEST_SESSION_JAX_CACHE"]
else:
    _JAX_CACHE = tempfile.TemporaryDirectory(prefix="nas-test-jax-cache-")
    os.environ["NAS_JAX_CACHE"] = os.environ["NAS_TEST_SESSION_JAX_CACHE"] = _JAX_CACHE.name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def macro_table_path() -> Path:
    """The NAS-Bench-Macro table shipped with the package (evaluators/tables/)."""
    from evaluators.table import resolve_table

    return resolve_table("nas-bench-macro")


@pytest.fixture(scope="session")
def supernet_run(tmp_path_factory, worker_id) -> Path:
    """A run directory with a tiny trained supernet (mobile_small on 8x8 digits, 1 epoch): what
    `nas supernet train` of the supernet quickstart leaves in RUN_DIR/supernet/, without its
    specialization (no targets); trained as its Ray trial trains it, without Ray.

    Trained once per session: the first pytest-xdist worker to need it trains it under a file lock in
    the session's shared base folder, and each worker gets its own copy (tests write into it)."""
    from filelock import FileLock
    from supernet_quickstart import train_quickstart_without_ray

    copy = tmp_path_factory.mktemp("runs")
    if worker_id == "master":  # no xdist: nothing to share
        return train_quickstart_without_ray(copy, "specialize.targets={}")
    shared = tmp_path_factory.getbasetemp().parent / "supernet_run"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "trained").exists():
            shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
            run = train_quickstart_without_ray(shared, "specialize.targets={}")
            (shared / "trained").write_text(run.name)
    name = (shared / "trained").read_text()
    return Path(shutil.copytree(shared / name, copy / name))


def pytest_configure(config):
    """Every test process (each pytest-xdist worker too) compiles through the session's persistent cache, as the
    CLI subprocesses, trials and scoring actors the tests start already do: a program one process compiled,
    the others load (374 loads in the two workers of one parallel phase, docs/performance.md)."""
    from nas.rundir import enable_compilation_cache

    enable_compilation_cache()
