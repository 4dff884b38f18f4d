# Aeterna: every entry point bootstraps what it needs (venv, dependencies, local servers).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/locomo/locomo-dev.json

.PHONY: help venv gen check-gen lint test run bench bench-locomo bench-scale bench-vectors clean

help:
	@echo "make run            start PostgreSQL, Redis, two memory replicas and Envoy on 127.0.0.1:8080"
	@echo "make test           run the test suite (starts its own throwaway servers)"
	@echo "make lint           ruff + mypy --strict + generated-code freshness"
	@echo "make gen            regenerate the Python SDK from protos/"
	@echo "make bench-locomo   LoCoMo retrieval benchmark (DATA=path), with BM25 and dense baselines"
	@echo "make bench-scale    100k memories in one tenant: ingest rate and search latency"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on this machine's disk; pinning it first keeps pip from
	# pulling a multi-GB CUDA build for sentence-transformers.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

gen: $(STAMP)
	$(PY) scripts/gen_protos.py

check-gen: gen
	@git diff --exit-code --stat -- libs/sdk || (echo "generated code is stale: run make gen and commit" && exit 1)
	@test -z "$$(git status --porcelain -- libs/sdk)" || (git status --porcelain -- libs/sdk; echo "generated code is stale: run make gen and commit"; exit 1)

lint: $(STAMP) check-gen
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check libs/common libs/cli services tests bench scripts
	$(PY) -m mypy libs/common/aeterna_common libs/cli/aeterna_cli services/memory/aeterna_memory

test: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

run: $(STAMP)
	$(PY) -m aeterna_cli.stack

bench-locomo: $(STAMP)
	$(PY) bench/locomo.py --data $(DATA)

bench-scale: $(STAMP)
	$(PY) bench/scale.py

bench-vectors: $(STAMP)
	$(PY) bench/bench_vectors.py

bench: bench-locomo bench-scale

clean:
	rm -rf .var .mypy_cache .ruff_cache .pytest_cache
