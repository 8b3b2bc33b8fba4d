# The README's commands, CI's commands and a developer's shell are the same commands.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

LOCKS   = requirements/runtime.lock requirements/dev.lock requirements/build.lock
# uv only writes the locks; plain pip installs from them (CI and the image need no uv).
UV_VERSION ?= 0.13.9
LOCK_VENV  ?= .venv-lock
UV_COMPILE  = $(LOCK_VENV)/bin/uv pip compile --quiet --generate-hashes --universal \
              --python-version 3.11

.PHONY: demo test lint typecheck check services bench lock clean

# Exactly the locked versions (hash-checked), then the project itself without touching them;
# the locked setuptools builds it (no unpinned build environment is fetched).
$(STAMP): pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

## Re-resolve every dependency from pyproject.toml (+ requirements/build.in) into the locks.
lock:
	test -x $(LOCK_VENV)/bin/uv || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(UV_COMPILE) pyproject.toml -o requirements/runtime.lock
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra dev -o requirements/dev.lock
	$(UV_COMPILE) requirements/build.in -o requirements/build.lock

services:
	@scripts/services.sh

## The whole pipeline on emulated clouds with a simulated fleet; Ctrl-C stops it.
demo: $(STAMP) services
	$(BIN)/blynk-bridge demo

## The whole test suite against the real Redis and Mosquitto.
test: $(STAMP) services
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy pipeline workers blynk_bridge bench

check: lint typecheck test

## Benchmarks (minutes; figures go into BENCHMARKS.md).
bench: $(STAMP) services
	$(BIN)/python -m bench.e2e

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
