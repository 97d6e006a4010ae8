# Every workflow of the project. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# tritonclient pins protobuf < 7 and cannot share a process with our `inference` stubs: its own venv, for tests.
TRITON_VENV := $(VENV)/triton
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITON_REQUIREMENTS := tests/integration/tritonclient-requirements.txt
PERF_ANALYZER ?= ../shared/tools/perf_analyzer
ADDRESS ?= 127.0.0.1:8001
REPOSITORY ?= examples/models
# Prometheus /metrics of `make run`; empty turns metrics off.
METRICS_ADDRESS ?= 127.0.0.1:8002
# How long `make soak` keeps the load up, in seconds.
SOAK_SECONDS ?= 180

.PHONY: help install run test test-gpu soak lint format proto models bench compose clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./client -e '.[dev]'
	touch $(STAMP)

$(TRITON_STAMP): $(TRITON_REQUIREMENTS) | $(STAMP)
	$(PYTHON) -m venv --clear $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(TRITON_REQUIREMENTS)
	touch $(TRITON_STAMP)

install: $(STAMP) $(TRITON_STAMP) ## create .venv (server, client, tools) and .venv/triton (tritonclient, for tests)

run: $(STAMP) ## serve examples/models on 127.0.0.1:8001 (metrics on :8002) until Ctrl-C (ADDRESS=, REPOSITORY=, METRICS_ADDRESS=)
	$(BIN)/tensorgate serve --address $(ADDRESS) --repository $(REPOSITORY) --metrics-address "$(METRICS_ADDRESS)"

test: install lint ## lint, then run the whole test suite (unit + integration + an 8 s soak)
	@command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	$(BIN)/pytest

test-gpu: $(STAMP) ## install the tensorrt extra, then run the tests that need a real NVIDIA GPU (tests/gpu)
	$(BIN)/python -m pip install --quiet -e '.[tensorrt]'
	$(BIN)/pytest -m gpu tests/gpu

soak: $(STAMP) ## steady load for SOAK_SECONDS (180) against a server; flat memory, no errors; writes bench/results/soak.md
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/results/soak.md $(BIN)/pytest tests/soak -q

lint: $(STAMP) ## ruff (lint + format check) and mypy strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy client/tensorgate server/tensorgate engines/tensorgate typings tests bench examples proto

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: install ## regenerate the committed stubs from proto/
	$(BIN)/python proto/generate.py

models: install ## build the benchmark models into bench/models (deterministic, not committed)
	$(BIN)/python -m bench.models --out bench/models

bench: install models ## run the benchmarks and write bench/results/
	@command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }
	$(BIN)/python -m bench.serving --models bench/models --out bench/results --perf-analyzer $(PERF_ANALYZER)
	$(BIN)/python -m bench.streams --out bench/results
	$(BIN)/python -m bench.tracing --models bench/models --out bench/results

compose: ## the observability stack: tensorgate, OTel collector, Jaeger, Prometheus, Grafana (needs Docker)
	docker compose up --build

clean: ## remove the virtual environment and build outputs
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache bench/models
