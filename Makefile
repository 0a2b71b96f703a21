# Two commands do all set-up: `make run` (the quickstart job) and `make test` (the tests).
# Each creates the virtual environment in .venv first if it is missing or the lock changed.
VENV := .venv
BIN := $(VENV)/bin
OUT := build/quickstart
# What ruff checks and formats (mypy's files are in pyproject.toml).
PY_DIRS := factory tests bench
# The one place the version is written is pyproject.toml: `factory --version` and the image tag read it.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: run test test-fast lint fmt lock image bench clean

# Exactly the locked set (requirements.lock, every extra and the test tools), then the project itself
# without dependencies; `pip check` fails if the lock no longer covers what pyproject.toml requires.
$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $@

run: $(BIN)/.installed
	$(BIN)/factory make-scenes build/scenes --count 16 --size 64
	$(BIN)/factory run jobs/quickstart.yaml
	$(BIN)/factory status $(OUT)
	$(BIN)/factory preview $(OUT) --out build/quickstart-preview.png

# The report test renders HTML in headless Chromium, which comes from the system's packages (Debian).
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# The GPU machine's own transformers and huggingface-hub, ahead of the project's in the CPU rehearsal of
# bench/device/run.sh (tests/bench/test_device_rehearsal.py).
REHEARSAL := .device-rehearsal
$(REHEARSAL)/.installed: bench/device/machine-packages.txt $(BIN)/.installed
	rm -rf $(REHEARSAL)
	$(BIN)/pip install --quiet --no-deps --target $(REHEARSAL) -r bench/device/machine-packages.txt
	touch $@

# The unit tier runs on every core (pytest-xdist: no test of it shares anything). The tiers with Ray run in
# two worker processes, each with its own shared Ray and S3 server, a whole module at a time (its fixtures
# serve all its tests), longest modules first (tests/support/tiers.py): one process left a core idle
# a third of the time, while a test waited on a process start, a retry's backoff or a gate.
UNIT_TIER := $(BIN)/python -m pytest -q -m unit -n auto tests
# pip byte-compiles what it installs, but not the project's own sources (an editable install) or the tests'
# support modules; where PYTHONDONTWRITEBYTECODE is set (as on this machine) no process writes their .pyc, and
# every process the tests start (Ray workers, CLI subprocesses) compiled them again: compiled once first, the
# tiers with Ray used 10-13 % less CPU time (two subsets of four modules, 2026-12-08).
COMPILE := $(BIN)/python -m compileall -q factory tests bench
RAY_TIERS := $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Every tier (unit, integration, e2e), after the lint and type checks: what CI runs.
test: lint $(BIN)/.installed $(REHEARSAL)/.installed /usr/bin/chromium
	$(COMPILE)
	$(UNIT_TIER)
	$(RAY_TIERS) --durations=25 -m "integration or e2e" tests

lint: $(BIN)/.installed
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy

# Fixes what the linter and the formatter can fix.
fmt: $(BIN)/.installed
	$(BIN)/ruff check --fix $(PY_DIRS)
	$(BIN)/ruff format $(PY_DIRS)

# Rewrites requirements.lock from pyproject.toml, keeping every pin that still fits; UPGRADE=1 moves every
# package to its newest allowed release. The lock is universal (any platform, Python >= 3.11).
lock: $(BIN)/.installed
	$(BIN)/uv pip compile pyproject.toml --extra test --universal --python-version 3.11 \
		--custom-compile-command "make lock" --quiet $(if $(UPGRADE),--upgrade) -o requirements.lock

# The edit loop: unit and integration tests (no CLI subprocess, no cluster, no full-size model).
test-fast: $(BIN)/.installed
	$(COMPILE)
	$(UNIT_TIER)
	$(RAY_TIERS) -m integration tests

# The cluster image, tagged with the version (the manifests in cluster/ name that tag; a test checks).
image:
	$(if $(REGISTRY),,$(error set REGISTRY, e.g. make image REGISTRY=registry.example.com/team))
	docker build -t $(REGISTRY)/factory:$(VERSION) .

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf build
