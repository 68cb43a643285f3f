# fedseg: the two commands a fresh clone needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install

# Flower must never try to install runtime dependencies (it would pull a CUDA torch), phone home,
# or write outside the project.
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test lint bench clean wheelhouse

install: $(STAMP)

# torch first, pinned to the CPU wheel; every later pip call is held to the same pins.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/fedseg study --out runs/study

# Two workers: the network drills (mostly waiting) on one, the other modules on the other
# (tests/conftest.py, NETWORK_MODULES); `pytest -n 0` runs the suite in one process.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadscope

# ruff (lint and format) and mypy (its settings, strict modules included: pyproject.toml).
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The quick benchmarks (a few minutes); the long ones are listed in benchmarks/run_all.py.
bench: install
	$(BIN)/python benchmarks/run_all.py

# Every wheel a hospital without internet needs (CPU torch included), for
# `pip install --no-index --find-links wheelhouse fedseg` (docs/deployment.md).
wheelhouse: install
	$(BIN)/pip wheel -q --disable-pip-version-check --wheel-dir wheelhouse \
		-c requirements/constraints.txt torch==2.13.0 .

clean:
	rm -rf runs data/synthetic .flwr
