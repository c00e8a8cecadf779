# Two set-up commands: `make demo` and `make test`. Each creates .venv in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test install install-dev bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"

# --no-compile: no byte-compiling of every installed module (about 45 s of a 90-105 s install here);
# Python compiles what a process imports, once, on first import.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	touch $(STAMP) $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/nas run experiments/quickstart.yaml --force

# Two workers (pytest-xdist, a test file per worker at a time) for everything but the tests marked
# `serial` (they kill processes on a schedule or start a two-node Ray cluster), which then run on their
# own two workers, away from the compile-heavy rest: their kills wait for conditions, not for times.
test: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not serial" --durations=15 tests
	$(PY) -m pytest -q -n 2 --dist loadfile -m serial --durations=6 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
