# Two commands do all set-up: `make run` (the quickstart job) and `make test` (the tests).
# Each creates the virtual environment in .venv first if it is missing or pyproject.toml changed.
VENV := .venv
BIN := $(VENV)/bin
OUT := build/quickstart

.PHONY: run test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/factory make-scenes build/scenes --count 16 --size 64
	$(BIN)/factory run jobs/quickstart.yaml
	$(BIN)/factory status $(OUT)
	$(BIN)/factory preview $(OUT) --out build/quickstart-preview.png

# The report test renders HTML in headless Chromium, which comes from the system's packages (Debian).
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Every tier (unit, integration, e2e): what CI runs.
test: $(BIN)/.installed /usr/bin/chromium
	$(BIN)/python -m pytest -q --durations=25 tests

# The edit loop: unit and integration tests (no CLI subprocess, no cluster, no full-size model).
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "unit or integration" tests

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf build
