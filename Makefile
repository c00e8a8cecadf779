# Two set-up commands: `make demo` and `make test`. Each creates .venv in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test install install-dev bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "uv>=0.9,<1"

# The install does not byte-compile (uv's default, pip's --no-compile); compileall does it on every
# core (here 32 + 36 s against 90-106 s for pip's one-core compile). The .pyc files matter: where
# PYTHONDONTWRITEBYTECODE is set (it is on the machine of docs/performance.md's figures) no process
# writes them, and every CLI subprocess, trial and Ray worker would compile what it imports from
# source. A file that does not compile just runs from source: `|| true`.
BYTE_COMPILE = $(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	nas evaluators search_spaces || true

# uv resolves and installs the same versions as pip (the two venvs' `pip freeze` compared equal) in 27 s
# against pip's 86 s (wall, a fresh venv each, median of 3 alternated runs on this machine, 2026-12-07);
# where uv cannot (say, an index only pip is configured for), pip installs. --native-tls: the system's
# certificates, as pip is configured to use here.
INSTALL = $(VENV)/bin/uv pip install -q --native-tls --python $(PY) $(1) || $(PY) -m pip install -q --no-compile $(1)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(call INSTALL,-e .)
	$(BYTE_COMPILE)
	touch $@

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(call INSTALL,-e ".[dev]")
	$(BYTE_COMPILE)
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
