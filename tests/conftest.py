from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def macro_table_path() -> Path:
    """The NAS-Bench-Macro table shipped with the package (evaluators/tables/)."""
    from evaluators.table import resolve_table

    return resolve_table("nas-bench-macro")
