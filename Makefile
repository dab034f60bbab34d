# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Each creates .venv, installs the project, fetches Kafka from Maven Central when needed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test test-fast lint typecheck fmt bench kafka-up kafka-down migrate schemas clean help

help:
	@echo "make run        start the whole pipeline (local Kafka + embedded ClickHouse) on http://127.0.0.1:8080"
	@echo "make test       run the whole test suite (starts its own broker)"
	@echo "make bench      pipeline and query benchmarks (prints figures, last line JSON)"
	@echo "make lint | typecheck | kafka-up | kafka-down | migrate | schemas"

# The client distribution (client/, `usage-metering-client`) holds the event models the server
# imports too: installed first, from this checkout, never from a package index.
$(STAMP): pyproject.toml client/pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e ./client -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)
.PHONY: install

run: $(STAMP)
	$(BIN)/metering run

# promtool (alert rules) and redis-server (shared rate limits), for the tests: see the script.
tools:
	@bash deploy/tools/install-test-tools.sh
.PHONY: tools

test: $(STAMP) tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) tools
	$(BIN)/python -m pytest -m "not kafka and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run

kafka-up: $(STAMP)
	$(BIN)/python -m deploy.kafka.local_broker up

kafka-down: $(STAMP)
	$(BIN)/python -m deploy.kafka.local_broker down

migrate: $(STAMP)
	$(BIN)/metering migrate

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
