# The README's commands, CI's commands and a developer's shell are the same commands.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck check services bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

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
	$(BIN)/mypy pipeline workers blynk_bridge

check: lint typecheck test

## Benchmarks (minutes; figures go into BENCHMARKS.md).
bench: $(STAMP) services
	$(BIN)/python -m bench.e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
