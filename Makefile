# Aeterna: every entry point bootstraps what it needs (venv, dependencies, local servers).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= bench/data/locomo-dev.json
# The all-MiniLM-L6-v2 ONNX model (fp32 and int8): a build artifact, made once by `make model`
# and read by the service from AETERNA_MEMORY_MODEL_DIR.
MODEL_DIR ?= .var/models
MODEL := $(MODEL_DIR)/manifest.json
export AETERNA_MEMORY_MODEL_DIR ?= $(abspath $(MODEL_DIR))
export AETERNA_KNOWLEDGE_MODEL_DIR ?= $(abspath $(MODEL_DIR))
# Every deployable unit is its own package; development installs them all, editable, pinned
# by the one constraints file.
PACKAGES := -e libs/sdk -e libs/common[model-export] -e libs/devstack -e 'libs/cli[dev]' -e services/memory -e services/governance -e services/knowledge -e services/sync
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: help venv constraints gen check-gen lint lint-py lint-protos lint-envoy lint-charts lint-docker lint-packages model test run train-ranker bench bench-locomo bench-scale bench-vectors bench-tenancy bench-query-lane bench-authz bench-events bench-audit bench-knowledge deps-system bench-tracing drill clean

help:
	@echo "make run            start PostgreSQL, Redis, two replicas each of memory, governance, knowledge and sync and Envoy on 127.0.0.1:8080"
	@echo "make test           run the test suite (starts its own throwaway servers)"
	@echo "make lint           ruff, mypy --strict, generated code fresh, buf, envoy --mode validate, Helm charts, hadolint, package checks"
	@echo "make model          export all-MiniLM-L6-v2 to ONNX (fp32, int8) into MODEL_DIR (.var/models)"
	@echo "make gen            regenerate the Python SDK from protos/, the charts' Envoy configs, alert rules and dashboards"
	@echo "make deps-system    install the Debian packages the checks and the drill need (promtool, pgBackRest, Sentinel), if missing"
	@echo "make train-ranker   train the LambdaMART search ranker on the LoCoMo dev file (DATA=path) into services/memory/aeterna_memory/ranker/"
	@echo "make bench-locomo   LoCoMo retrieval benchmark (DATA=path), with BM25 and dense baselines"
	@echo "make bench-scale    100k memories in one tenant: ingest rate and search latency"
	@echo "make bench-tenancy  sealed tenant binding against the settable app.tenant_id (baseline)"
	@echo "make bench-query-lane  search latency while a 1,000-memory batch embeds (query lane vs shared queue)"
	@echo "make bench-authz    authorization decision p50/p99, and an authorised memory search against an unchecked one"
	@echo "make bench-audit    audit chain appends per second: single against the consumer's batches"
	@echo "make bench-events   outbox relay to Redis Streams: backlog drain rate, commit-to-consumer latency, 1,000 live subscribers vs bare XREAD"
	@echo "make bench-knowledge  knowledge search: ingest rate, p50/p95, recall@3, BM25-only baseline (ITEMS=50000)"
	@echo "make bench-tracing  search latency with a sampled, exported trace vs an unsampled one"
	@echo "make drill          backup and restore drill (pgBackRest to S3 on SeaweedFS): prints RPO and RTO"

$(STAMP): constraints.txt pyproject.toml libs/*/pyproject.toml services/*/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=25.1'
	# torch's CPU build lies on this machine's disk (pip's find-links); the constraints pin
	# that build, so pip never reaches for a multi-GB CUDA one.
	$(PIP) $(PACKAGES) --group dev
	@touch $(STAMP)

venv: $(STAMP)

# Re-pin every dependency to what the venv holds now (after changing a pyproject.toml).
constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^aeterna' > constraints.txt

# The chart Envoy configs embed the SDK's descriptor set: protos first. The permission table
# is evaluated from the Cedar policies; alert rules and dashboards are code too.
GENERATED := libs/sdk 'charts/*/files/envoy*.json' docs/permissions.md 'charts/*/files/prometheus-rules.yaml' 'charts/*/files/dashboards'

gen: $(STAMP)
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_envoy.py
	$(PY) scripts/gen_permissions.py
	$(PY) scripts/gen_alerts.py
	$(PY) scripts/gen_dashboards.py

# Debian packages of the checks and the drill: prometheus ships promtool (rule unit tests),
# pgBackRest and Redis Sentinel serve the drill and the failover test. Installs only what is
# missing, so it costs a few `dpkg -s` when everything is there.
SYSTEM_PACKAGES := prometheus pgbackrest redis-sentinel
deps-system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing" $$missing "with apt-get"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

check-gen: gen
	@git diff --exit-code --stat -- $(GENERATED) || (echo "generated code is stale: run make gen and commit" && exit 1)
	@test -z "$$(git status --porcelain -- $(GENERATED))" || (git status --porcelain -- $(GENERATED); echo "generated code is stale: run make gen and commit"; exit 1)

lint: lint-py check-gen lint-protos lint-envoy lint-charts lint-docker lint-packages

# envoy --mode validate on the config make run renders and on every chart config.
lint-envoy: $(STAMP)
	$(PY) scripts/gen_envoy.py --validate

lint-py: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check libs/common libs/devstack libs/cli services tests bench scripts
	$(PY) -m mypy libs/common/aeterna_common libs/devstack/aeterna_devstack libs/cli/aeterna_cli services/memory/aeterna_memory services/governance/aeterna_governance services/knowledge/aeterna_knowledge services/sync/aeterna_sync

# buf lint on protos/, and buf breaking against the merge base with main (see the script).
lint-protos: $(STAMP)
	$(PY) scripts/check_protos.py

# Helm charts offline: lint --strict, render, kubernetes-validate --strict, envoy --mode validate.
lint-charts: $(STAMP)
	@# Editable installs hide these packages from mypy: name their directories.
	MYPYPATH=libs/sdk:libs/common:libs/devstack $(PY) -m mypy --strict scripts/check_charts.py tests/test_charts.py
	$(PY) scripts/check_charts.py

# Every service image is linted statically (no Docker engine here; images are not built).
lint-docker: $(STAMP)
	$(VENV)/bin/hadolint --failure-threshold warning services/*/Dockerfile

# What each package pulls in, resolved offline, and the SDK alone in a fresh venv.
lint-packages: $(STAMP)
	$(PY) scripts/check_packages.py

# A file target: built once, redone only when the export code changes. The venv is an
# order-only prerequisite so that reinstalling packages does not export again.
$(MODEL): libs/common/aeterna_common/embedding/export.py | $(STAMP)
	$(PY) -m aeterna_common.embedding.export --out $(MODEL_DIR) --force

model: $(MODEL)

test: $(STAMP) $(MODEL)
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

run: $(STAMP) $(MODEL)
	$(PY) -m aeterna_devstack.stack

train-ranker: $(STAMP) $(MODEL)
	$(PY) bench/locomo_rank.py train --data $(DATA)

bench-locomo: $(STAMP) $(MODEL)
	$(PY) bench/locomo.py --data $(DATA)

bench-scale: $(STAMP) $(MODEL)
	$(PY) bench/scale.py

bench-vectors: $(STAMP) $(MODEL)
	$(PY) bench/bench_vectors.py

bench-tenancy: $(STAMP)
	$(PY) bench/tenancy.py

# Search latency while 1,000-memory batches embed: query lane vs one shared queue (baseline).
bench-query-lane: $(STAMP) $(MODEL)
	$(PY) bench/query_lane.py

# Decision latency in process, and an authorised memory search against an unchecked one.
bench-authz: $(STAMP) $(MODEL)
	$(PY) bench/authz.py

# Outbox relay to Redis Streams: backlog drain (rows/s) and commit-to-consumer latency.
bench-events: $(STAMP)
	$(PY) bench/events.py

# Audit chain appends: one tenant, several tenants, and the consumer's batches against single
# appends.
bench-audit: $(STAMP)
	$(PY) bench/audit_append.py

# Knowledge search: ingest rate, latency and recall@3 against a BM25-only baseline.
ITEMS ?= 50000
bench-knowledge: $(STAMP) $(MODEL)
	$(PY) bench/knowledge.py --items $(ITEMS)
# Search latency with a sampled, exported trace against an unsampled one (baseline).
bench-tracing: $(STAMP) $(MODEL)
	$(PY) bench/tracing.py

bench: bench-locomo bench-scale

# Backup and restore drill: pgBackRest full backup + WAL archiving to S3 (SeaweedFS), writes
# flowing, data directory destroyed, restore, restart, indexes rebuilt, bus replayed; prints
# RPO and RTO. DRILL_ARGS=--quick is the reduced form the test suite runs.
drill: $(STAMP) $(MODEL) deps-system
	$(PY) scripts/drill.py $(DRILL_ARGS)

clean:
	rm -rf .var .mypy_cache .ruff_cache .pytest_cache
