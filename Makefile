# The two commands a new user needs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mnistops-installed
DEV_STAMP := $(VENV)/.mnistops-dev-installed
WHEELS := $(VENV)/.wheels

.PHONY: setup setup-dev demo test test-fast coverage lint bench prefect-template

# `setup`: what mnistops needs to run (`make demo`); `setup-dev` adds the test and lint
# tools on top (every other target).
setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# Reinstalls only when the dependencies change; constraints.txt pins a known-good set
# so that the resolver does not spend minutes on boto3/botocore/aiobotocore.
# pip fetches torch's wheel (it finds a local CPU wheel where one is provided, see
# pip.conf's find-links; uv does not look there) and installs uv; uv installs that wheel
# with the rest, about 5x faster than pip: `make setup` from empty caches 17.6 s against
# 21.2 s when pip installed torch (medians of 4 and 5 runs, alternating).
# Bytecode: `setup` compiles none (compiling every installed file took 19 s of a first
# `make demo`; the demo writes the bytecode of what it imports, about 8 s of it, see
# `demo`). `setup-dev` compiles all of it, in parallel: where PYTHONDONTWRITEBYTECODE
# is set, every process of the suite would otherwise compile mlflow, prefect and torch
# again (seconds per process); a few of torch's files are templates that do not
# compile, so that exit code is ignored.
# The venv is made without pip (bootstrapping pip into it took 4 s of the install): the
# host's pip installs torch and uv into it (`pip --python`, pip >= 22.3; an older pip is
# bootstrapped into the venv instead), and uv installs pip there with the rest.
$(STAMP): pyproject.toml constraints.txt
	# (a venv cut off before uv was in is made again, not reused)
	$(BIN)/uv --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear --without-pip $(VENV)
	if $(PYTHON) -m pip --python $(BIN)/python --version >/dev/null 2>&1; then \
		pip=($(PYTHON) -m pip --python $(BIN)/python); \
	else \
		$(BIN)/python -m ensurepip --upgrade >/dev/null; pip=($(BIN)/python -m pip); \
	fi; \
	"$${pip[@]}" install --quiet --disable-pip-version-check --no-compile \
		-c constraints.txt uv 2>&1 | { grep -v 'is ignored: it is neither' || true; }; \
	rm -rf $(WHEELS); \
	"$${pip[@]}" download --quiet --disable-pip-version-check --no-deps --dest $(WHEELS) \
		-c constraints.txt 'torch==2.13.0' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e . pip \
		$(WHEELS)/torch-*.whl
	rm -rf $(WHEELS)
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib/python3*/site-packages >/dev/null || true
	touch $(DEV_STAMP)

# The demo's processes write the bytecode of what they import, into .venv (and src/),
# even where PYTHONDONTWRITEBYTECODE is set: later commands start faster.
demo: setup
	PYTHONDONTWRITEBYTECODE= $(BIN)/mnistops demo

# The whole suite, in TEST_WORKERS processes: most of its time is waiting on services,
# so more workers than cores pays (four measured best: README, Tests). Each group of
# tests (a file, or all the tests on the demo's stack) stays on one worker, so a
# module's stack starts once (tests/conftest.py: worker_group).
# OMP_WAIT_POLICY: the workers run more trainings at once than there are cores, and an
# OpenMP thread that spins while it waits for its partner burns the time others need.
TEST_WORKERS ?= 4
test: setup-dev
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest \
		-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# The same suite under coverage (branch) of src/mnistops, the `mnistops` commands and
# workers it starts included: every Python process writes its own data file, combined
# and reported at the end. Its tracer costs a third more CPU in every process of ours,
# on a suite bound by its two cores, so it has a target of its own (README, Tests).
coverage: setup-dev
	rm -f .coverage .coverage.*
	OMP_WAIT_POLICY=PASSIVE COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/coverage run -m pytest \
		-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder
	$(BIN)/coverage combine -q
	$(BIN)/coverage report --format=total | xargs -I{} echo "branch coverage of src/mnistops: {} %"

# The unit tier: pure logic, no services (seconds, not minutes), in two processes: some
# of its tests wait on a subprocess or a timer, and a lone pytest leaves a core idle.
# Files that mark no test `unit` are not imported (tests/conftest.py).
TEST_FAST_WORKERS ?= 2
test-fast: setup-dev
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -m unit -q -n $(TEST_FAST_WORKERS)

# The same checks as .pre-commit-config.yaml: ruff, then the type checker on src/.
lint: setup-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: setup-dev
	$(BIN)/python bench/stack_footprint.py

# The Prefect database template mnistops ships for the Prefect version constraints.txt
# pins (src/mnistops/stack/prefect_db.py): made again after a change of that pin.
prefect-template: setup
	$(BIN)/python -c "from mnistops.stack.prefect_db import write_shipped; print(write_shipped())"
