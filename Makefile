# Two commands do everything on a fresh machine with Python 3.11 and the package registries:
#   make demo   set up .venv and run the main job on the built-in default
#   make test   set up .venv and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default; GPU users: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ...
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# the suite runs in 2 pytest-xdist workers (one torch thread each, tests/conftest.py), each file's tests on one
# worker (--dist loadfile: a module's fixtures are built once); PYTEST_WORKERS=0 runs it in this one process
PYTEST_WORKERS ?= 2
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-all lint bench-wkv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rwkvseg demo --overwrite

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(PYTEST_XDIST)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"  # in one process: the slow tests are not yet checked under xdist

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench-wkv: $(STAMP)
	$(BIN)/rwkvseg bench wkv --json runs/bench_wkv_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
