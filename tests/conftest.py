from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MACRO_TABLE = SHARED / "benchmarks" / "nas-bench-macro_cifar10.json"


@pytest.fixture(scope="session")
def macro_table_path() -> Path:
    if not MACRO_TABLE.is_file():
        pytest.fail(f"NAS-Bench-Macro table not found at {MACRO_TABLE} (../shared must sit beside the repo)")
    return MACRO_TABLE
