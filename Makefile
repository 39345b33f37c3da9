# liferaft — developer tasks. GNU make.
# `make test` is what CI runs (.ci/run); it installs into .venv on first use, and
# promtool with apt when run as root (`make tools`).

PY ?= python3
VENV = .venv
NODES ?= n1 n2 n3
PYTEST_ARGS ?=

BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
comma := ,
empty :=
space := $(empty) $(empty)

.DEFAULT_GOAL := help
.PHONY: help install tools deploy-tools test test-slow chaos lint fmt typecheck demo certs cluster clean

help:
	@echo "liferaft make targets:"
	@echo "  install    create $(VENV) and install liferaft with the test extras (editable)"
	@echo "  tools      programs some tests need besides Python: promtool (apt, when run as root)"
	@echo "             and, for tests/deploy, kubectl and systemd-analyze (deploy-tools)"
	@echo "  test       lint, format check, mypy, import contracts, then pytest (what CI runs)"
	@echo "             extra pytest arguments: make test PYTEST_ARGS='-k election -x'"
	@echo "  test-slow  the slow soak/chaos tests only (pytest -m slow)"
	@echo "  chaos      liferaft check, CHAOS_RUNS (100) runs of CHAOS_SECONDS (60) s, to chaos.jsonl"
	@echo "  lint       ruff check, ruff format --check, lint-imports"
	@echo "  fmt        ruff format and ruff check --fix"
	@echo "  typecheck  mypy"
	@echo "  demo       simulate a 5-node cluster for 3000 ticks (seed 1)"
	@echo "  certs      make the CA, node certificates and JWT keys in certs/ (NODES=\"n1 n2 n3\")"
	@echo "  cluster    run a local 3-node cluster from config/node1..3.toml (Ctrl-C stops it)"
	@echo "  clean      remove $(VENV), caches and build artifacts"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# promtool (Prometheus' own checker) validates /metrics in tests/observability; that test
# skips without it. As root on Debian (CI), install it from the `prometheus` package
# (~19 MB download); otherwise say how, and let `make test` go on without it.
tools:
	@if command -v promtool >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "tools: installing promtool (Debian package prometheus)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
	  command -v promtool >/dev/null 2>&1 || \
	  { echo "tools: could not install promtool with apt-get" >&2; exit 1; }; \
	else \
	  echo "tools: promtool not found; its test will skip. To install it:"; \
	  echo "tools:   sudo apt-get install --no-install-recommends prometheus  (Debian/Ubuntu)"; \
	  echo "tools:   or put promtool from a Prometheus release on PATH"; \
	fi

# tests/deploy builds deploy/k8s with `kubectl kustomize` and checks the systemd unit with
# `systemd-analyze verify` (hadolint comes with the test extra). As root on Debian (CI),
# install what is missing: kubectl from kubernetes-client, systemd-analyze from systemd.
# Otherwise say how; those tests skip on a developer's machine, and fail under CI=true.
tools: deploy-tools
deploy-tools:
	@missing=""; \
	command -v kubectl >/dev/null 2>&1 || missing="$$missing kubernetes-client"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -z "$$missing" ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "deploy-tools: installing$$missing (Debian packages)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null && \
	  command -v kubectl >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 || \
	  { echo "deploy-tools: could not install$$missing with apt-get" >&2; exit 1; }; \
	else \
	  echo "deploy-tools: missing$$missing; their tests in tests/deploy will skip. To install:"; \
	  echo "deploy-tools:   sudo apt-get install --no-install-recommends$$missing  (Debian/Ubuntu)"; \
	fi

test: install tools
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

CHAOS_RUNS ?= 100
CHAOS_SECONDS ?= 60
chaos: install
	$(BIN)/python bench/chaos.py --runs $(CHAOS_RUNS) --seconds $(CHAOS_SECONDS)

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

typecheck: install
	$(BIN)/mypy

demo: install
	$(BIN)/liferaft sim --nodes 5 --ticks 3000 --seed 1

certs: install
	$(BIN)/liferaft certs --dir certs --nodes $(subst $(space),$(comma),$(strip $(NODES)))

# Three `liferaft node` processes in the foreground; Ctrl-C (SIGINT to the whole
# process group) or SIGTERM stops all of them. The trap resets itself first: `kill 0`
# signals this shell too, and a trap that ran again on it recursed until the shell
# crashed (make said "Segmentation fault").
cluster: install
	@[ -f certs/ca.pem ] || $(MAKE) --no-print-directory certs
	@trap 'trap - TERM; kill 0' TERM; \
	for i in 1 2 3; do $(BIN)/liferaft node --config config/node$$i.toml & done; \
	wait

clean:
	rm -rf $(VENV) build dist src/*.egg-info
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
	find src tests -type d -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
